#!/usr/bin/env python3
"""Lab scenarios in throwaway network namespaces (root; nothing in the root namespace is
touched; everything is removed on exit, even on failure or Ctrl-C).

    scripts/lab.py list
    scripts/lab.py run invalid-window [--drop-invalid] [--trace] [--record FILE]
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import click  # noqa: E402

from tracer.events import MASQ_NOTIFIER  # noqa: E402
from tracer.lab import scenarios  # noqa: E402
from tracer.lab.harness import TracerProcess  # noqa: E402
from tracer.lab.topology import LabError, NatLab  # noqa: E402
from tracer.recording import keep_only  # noqa: E402
from tracer.sinks.console import format_human  # noqa: E402


@click.group()
def main():
    """Reproduce the incidents in network namespaces."""


@main.command("list")
def list_():
    for name, fn in scenarios.SCENARIOS.items():
        click.echo(f"{name:16} {(fn.__doc__ or '').strip().splitlines()[0]}")


@main.command()
@click.argument("scenario", type=click.Choice(sorted(scenarios.SCENARIOS)))
@click.option("--drop-invalid", is_flag=True, help="Router drops INVALID (the incident-1 fix).")
@click.option("--random-fully", is_flag=True, help="MASQUERADE --random-fully.")
@click.option("--trace", is_flag=True, help="Run the tracer around the scenario and show its verdicts.")
@click.option("--record", default="", help="With --trace: record the kernel events to this file.")
@click.option("--json", "as_json", is_flag=True, help="Verdicts as JSON lines.")
def run(scenario, drop_invalid, random_fully, trace, record, as_json):
    """Run one scenario; print its ground truth (and the tracer's verdicts with --trace)."""
    if os.geteuid() != 0:
        raise click.ClickException("must run as root (creates network namespaces)")
    tracer = TracerProcess(record=record) if trace or record else None
    try:
        if tracer:
            tracer.start()
        with NatLab(masquerade_opts=("--random-fully",) if random_fully else (),
                    drop_invalid=drop_invalid) as lab:
            outcome = scenarios.SCENARIOS[scenario](lab)
            mine = {lab.netns_inode(ns) for ns in lab.namespaces}
    except LabError as e:
        raise click.ClickException(str(e))
    finally:
        if tracer:
            tracer.stop()
    click.echo(json.dumps({"scenario": outcome.name, "facts": outcome.facts}))
    if record:  # only this lab's events: other namespaces of the host are not the scenario.
        # The notifiers run in the namespace of the task that changed the link or address:
        # for pyroute2 calls, this process's own (root) namespace.
        keep_only(record, lambda ev: ev.netns in mine or (ev.kind == MASQ_NOTIFIER and ev.pid == os.getpid()))
    if tracer:
        for rec in tracer.records:
            click.echo(json.dumps(rec) if as_json else format_human(rec))


if __name__ == "__main__":
    main()
