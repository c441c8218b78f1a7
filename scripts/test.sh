#!/usr/bin/env bash
# The README's test command: installs what it needs (idempotent), then runs the unit tests
# (no root needed) and the integration tests (root: real BPF, real namespaces).
#   scripts/test.sh            all tests
#   scripts/test.sh -k invalid extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/setup.sh)
# never leave lab namespaces behind, whatever happens to pytest
cleanup() { for ns in $(ip netns list 2>/dev/null | awk '/^rstlab-/{print $1}'); do ip netns del "$ns" 2>/dev/null || true; done; }
trap cleanup EXIT
exec_pytest() { "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"; }
exec_pytest -ra tests "$@"
