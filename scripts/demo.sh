#!/usr/bin/env bash
# The README's demo command: installs what it needs (idempotent), then reproduces the
# incidents in throwaway network namespaces with the tracer attached and prints its verdicts.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/setup.sh)
cleanup() { for ns in $(ip netns list 2>/dev/null | awk '/^rstlab-/{print $1}'); do ip netns del "$ns" 2>/dev/null || true; done; }
trap cleanup EXIT
"$VENV/bin/python" scripts/demo.py "$@"
