"""rst-tracer command line. Every operator error is one line on stderr and a non-zero
exit (2 for bad usage, 1 for a host that cannot run the tracer), never a traceback."""
from __future__ import annotations

import ipaddress
import json
import logging
import re
import sys

import click
import structlog

from . import __version__

EXIT_USAGE, EXIT_FAILURE = 2, 1


class Failure(Exception):
    """A runtime condition the operator must fix; printed as one line, exit 1."""


def configure_logging(verbose: bool) -> None:
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"),
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


class NetnsParam(click.ParamType):
    name = "NETNS"
    _name_re = re.compile(r"^[A-Za-z0-9_.@:-]{1,255}$")   # ':' as in docker:<sandbox id>

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value.isdigit():
            n = int(value)
            if n <= 0 or n >= 1 << 32:
                self.fail(f"{value!r} is not a namespace inode number", param, ctx)
            return n
        if not self._name_re.match(value):
            self.fail(f"{value!r} is neither a namespace inode number nor a name", param, ctx)
        return value


class HostParam(click.ParamType):
    name = "ADDRESS"

    def convert(self, value, param, ctx):
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 address", param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rst-tracer")
def cli():
    """Explains why TCP connections are reset and SYNs vanish (conntrack, NAT, sockets).

    \b
    rst-tracer watch              live verdicts, one line each on a terminal
    rst-tracer watch --json       JSON lines (schema v1, see README) for log shippers
    rst-tracer doctor             this host's exposure to each incident, and the fixes
    rst-tracer doctor --json      the same, with what this kernel allows and which backend runs
    rst-tracer replay FILE        re-run attribution on a recording, offline
    rst-tracer summary FILE       counts by cause and namespace over a run
    """


class PodParam(click.ParamType):
    name = "NS/NAME"

    def convert(self, value, param, ctx):
        ns, sep, pod = value.partition("/")
        if not (sep and ns and pod) or "/" in pod:
            self.fail(f"{value!r} is not NAMESPACE/NAME", param, ctx)
        return value


class OutputParam(click.ParamType):
    name = "SPEC"

    def convert(self, value, param, ctx):
        from .sinks.outputs import parse_spec
        try:
            return parse_spec(value)
        except ValueError as e:
            self.fail(f"{value!r}: {e}", param, ctx)


class ListenParam(click.ParamType):
    name = "ADDR:PORT"

    def convert(self, value, param, ctx):
        from .sinks.metrics import parse_listen
        try:
            return parse_listen(value)
        except ValueError as e:
            self.fail(f"{value!r}: {e}", param, ctx)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of human lines (stdout).")
@click.option("-v", "--verbose", is_flag=True, help="Show evidence and full remedies.")
@click.option("--output", "outputs", multiple=True, type=OutputParam(),
              help="Where records go; repeatable (default: stdout). SPEC is stdout, "
                   "file:/path[?max_bytes=N&backups=K], unix:/path, tcp:HOST:PORT (JSON lines) "
                   "or fluent:HOST:PORT[?tag=T&ack=true] (Fluentd Forward). Network and file "
                   "outputs queue up to queue=N records (default 10000) while the destination "
                   "is down, and never slow the tracer down.")
@click.option("--metrics", "metrics", type=ListenParam(),
              help="Serve Prometheus metrics on ADDR:PORT (e.g. 127.0.0.1:9464; :9464 for all).")
@click.option("--netns", "netns", multiple=True, type=NetnsParam(),
              help="Only this network namespace (inode, or name as in `ip netns`: one created later is "
                   "matched once it appears); repeatable.")
@click.option("--port", "ports", multiple=True, type=click.IntRange(1, 65535),
              help="Only flows with this port on any side (inside or NATed); repeatable.")
@click.option("--host", "hosts", multiple=True, type=HostParam(),
              help="Only flows with this address on any side; repeatable.")
@click.option("--container", "containers", multiple=True, metavar="NAME|ID",
              help="Only verdicts with this container on any side (its name, its name in its pod, "
                   "or an id prefix of 4+ hex digits); repeatable.")
@click.option("--pod", "pods", multiple=True, type=PodParam(),
              help="Only verdicts with this Kubernetes pod on any side; repeatable.")
@click.option("--backend", type=click.Choice(["auto", "tracepoint", "kprobe"]), default="auto",
              show_default=True, help="Probe backend; auto picks the most precise one available.")
@click.option("--record", "record_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write the raw events and their context to FILE (see `replay`).")
@click.option("--duration", type=click.FloatRange(min=0), default=0,
              help="Stop after this many seconds (0: until SIGINT/SIGTERM).")
def watch(as_json, verbose, outputs, metrics, netns, ports, hosts, containers, pods, backend, record_path,
          duration):
    """Attach the probes and print a verdict for every reset and conntrack drop.

    \b
    Examples:
      rst-tracer watch
      rst-tracer watch --json --port 6379
      rst-tracer watch --netns 4026532246 --host 10.0.0.7 -v
      rst-tracer watch --container redis-client --pod default/web-7d4b9
      rst-tracer watch --output stdout --output tcp:127.0.0.1:5170 --metrics :9464
      rst-tracer watch --output 'file:/var/log/rst-tracer.jsonl?max_bytes=50M&backups=5'
      rst-tracer watch --output 'fluent:127.0.0.1:24224?tag=rst-tracer&ack=true'
    """
    configure_logging(verbose)
    from .filters import VerdictFilter, check_netns
    from .probes import capabilities

    if not capabilities.is_privileged():
        raise Failure("must run as root (or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load BPF programs")
    try:   # after the privilege check: only then are all namespaces visible
        for warning in check_netns(netns):
            click.echo(f"rst-tracer: warning: {warning}", err=True)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--netns") from None
    caps = capabilities.detect()
    chosen, why = capabilities.choose_backend(caps, backend)
    if not chosen:
        raise Failure(f"no usable probe backend on kernel {caps.kernel_release}: {why}")
    from .probes.btf import BTF, BTFError
    from .probes.kprobe import KprobeBackend
    from .probes.loader import LoadError
    from .probes.tracepoint import TracepointBackend

    try:
        btf = BTF.vmlinux()
    except BTFError as e:
        raise Failure(str(e)) from None
    probe_backend = {"tracepoint": TracepointBackend, "kprobe": KprobeBackend}[chosen](caps, btf)
    probe_backend.start_attach()   # compiles while the rest is imported and set up
    from .watch import Watch
    from .sinks.metrics import MetricsSink
    from .sinks.outputs import build_all, parse_spec

    # an unreachable destination only logs a warning: its sink queues and retries in the background
    sinks = build_all(outputs or [parse_spec("stdout")], as_json=as_json, verbose=verbose)
    try:
        if metrics:
            metrics_sink = MetricsSink(outputs=sinks)
            try:
                metrics_sink.serve(*metrics)
            except OSError as e:
                raise Failure(f"cannot serve metrics on {metrics[0]}:{metrics[1]}: "
                              f"{e.strerror or e}") from None
            sinks.append(metrics_sink)
        try:
            w = Watch.live(probe_backend, btf, sinks,
                           VerdictFilter(netns=set(netns), ports=set(ports), hosts=set(hosts),
                                         containers=set(containers), pods=set(pods)), record_path)
        except OSError as e:
            raise Failure(f"cannot write recording {record_path}: {e.strerror}") from None
        try:
            w.run(duration)
        except LoadError as e:
            raise Failure(str(e)) from None
    finally:
        for sink in sinks:   # flush the queues (up to 5 s each); closing twice is harmless
            sink.close()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-v", "--verbose", is_flag=True, help="Show what was observed under each finding.")
@click.option("--netns", "netns", metavar="NAME|INODE|PATH",
              help="Check this network namespace (a name from `ip netns`, an inode number, or a "
                   "path such as /proc/PID/ns/net) instead of this process's own.")
@click.option("--networkd-dir", "networkd_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Read systemd-networkd .network files from this directory (repeatable; default: "
                   "$RST_TRACER_NETWORKD_DIRS or systemd's search path).")
def doctor(as_json, verbose, netns, networkd_dirs):
    """Check the host for exposure to the conntrack/NAT reset incidents, and which probe
    backend will run. Exit status 1 when a risk is found, 0 when none.

    \b
    Checks: kernel window handling, conntrack sysctls (table usage, timeouts, be_liberal),
    MASQUERADE/SNAT without --random-fully (iptables legacy/nft, nft), INVALID packets not
    dropped before the host stack, systemd-networkd DHCP without KeepConfiguration=, and
    the probe backend. Each finding names its incident (docs/incidents.md) and a fix to paste.

    \b
    Examples:
      rst-tracer doctor
      rst-tracer doctor --json --netns rstlab-1a2b3c-nat
      rst-tracer doctor -v --netns /proc/4242/ns/net
    """
    from . import doctor as doc
    from .doctor.host import TargetError

    try:
        report = doc.run(netns=netns, networkd_dirs=list(networkd_dirs) or None)
    except TargetError as e:
        raise click.BadParameter(str(e), param_hint="--netns") from None
    except OSError as e:
        raise Failure(f"cannot read namespace {netns or 'of this process'}: "
                      f"{e.strerror or e} (run as root)") from None
    click.echo(json.dumps(report, indent=2) if as_json else doc.format_text(report, verbose))
    if any(f["severity"] == doc.RISK for f in report["findings"]):
        sys.exit(EXIT_FAILURE)


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of human lines.")
@click.option("-v", "--verbose", is_flag=True, help="Show evidence and full remedies.")
def replay(path, as_json, verbose):
    """Re-run attribution on a recording (from `watch --record`), offline, without root.

    A damaged file yields the verdicts of its good part, then a one-line error naming the
    byte offset, and exit status 1.

    \b
    Examples:
      sudo rst-tracer watch --record incident.rec --duration 300   # on the affected host
      rst-tracer replay -v incident.rec                            # anywhere, no root
      rst-tracer replay --json incident.rec | jq 'select(.cause != "no_listener")'
    """
    from .recording import RecordingError
    from .replay import replay_verdicts
    from .sinks import HumanSink, JsonLinesSink

    sink = JsonLinesSink() if as_json or not sys.stdout.isatty() else HumanSink(verbose=verbose)
    try:
        for record in replay_verdicts(path):
            sink.emit(record)
    except RecordingError as e:
        raise Failure(str(e)) from None
    finally:
        sink.flush()


@cli.command()
@click.argument("paths", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def summary(paths, as_json):
    """Counts by cause and namespace over a run.

    Reads JSON lines from `watch --json` (files, or - for stdin) or recordings from
    `watch --record` (replayed). An input that cannot be read (or read to its end) is one
    error line, after the counts of everything that could be read; exit status 1.

    \b
    Examples:
      rst-tracer watch --json --duration 600 > run.jsonl; rst-tracer summary run.jsonl
      rst-tracer summary run.rec
    """
    from .summary import InputError, Summary

    total, errors = Summary(), []
    for path in paths or ("-",):
        try:
            total.add_input(path)
        except InputError as e:
            errors.append(str(e))
    click.echo(json.dumps(total.to_dict(), indent=2) if as_json else total.format())
    if errors:
        sys.stdout.flush()
        for error in errors:
            click.echo(f"rst-tracer: error: {error}", err=True)
        sys.exit(EXIT_FAILURE)


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="rst-tracer", standalone_mode=False)
    except click.UsageError as e:  # includes BadParameter
        click.echo(f"rst-tracer: error: {e.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        click.echo(f"rst-tracer: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except Failure as e:
        click.echo(f"rst-tracer: error: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    except click.Abort:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
