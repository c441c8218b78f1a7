#!/usr/bin/env python3
"""Live demo: the tracer attached, each lab scenario in turn, the verdicts it printed."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tracer.lab import scenarios  # noqa: E402
from tracer.lab.harness import TracerProcess  # noqa: E402
from tracer.lab.topology import NatLab  # noqa: E402
from tracer.sinks.console import format_human  # noqa: E402

# (title, scenario, lab options)
PLAN = [
    ("Incident 1: segment above the window -> conntrack INVALID -> router answers RST",
     "invalid-window", {}),
    ("Incident 1 with the fix (DROP INVALID in the router): no RST",
     "invalid-window", {"drop_invalid": True}),
    ("Ordinary: SYNs to a closed port", "closed-port", {}),
]


def main() -> int:
    verbose = "-v" in sys.argv
    for title, name, opts in PLAN:
        print(f"\n=== {title}  [{name}]", flush=True)
        with TracerProcess() as tracer:
            with NatLab(**opts) as lab:
                kwargs = {"count": 3} if name == "closed-port" else {}
                outcome = scenarios.SCENARIOS[name](lab, **kwargs)
                print(f"    lab: {outcome.facts.get('client_after') or outcome.facts.get('outcomes')}", flush=True)
                tracer.stop()
        for rec in tracer.verdicts():
            print(format_human(rec, verbose), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
