#!/usr/bin/env bash
# The README's demo command: installs what it needs (idempotent), then reproduces the
# incidents in throwaway network namespaces with the tracer attached and prints its verdicts.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/setup.sh)
. scripts/lib/lab-run.sh
trap lab_cleanup EXIT
"$VENV/bin/python" scripts/demo.py "$@"
