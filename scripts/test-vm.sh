#!/usr/bin/env bash
# scripts/test-vm.sh SUITE [PYTEST ARGS...]
#
# The integration tests of the kprobe backend on a Debian stock kernel, inside the qemu VM
# (scripts/vm/run-in-vm.sh): SUITE is bullseye (5.10), bookworm (6.1) or trixie (6.12).
# Default tests: tests/integration/test_kprobe.py; other pytest arguments replace them
# (e.g. `scripts/test-vm.sh trixie tests/integration -k invalid`). The tracer runs with
# RST_TRACER_BACKEND=kprobe (honoured by tracer/lab/harness.py). Exits with pytest's status
# (125: the VM gave none, e.g. it timed out). Needs root (qemu, image build on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

case ${1:-} in
  bullseye|bookworm|trixie) SUITE=$1; shift ;;
  *) echo "usage: $0 bullseye|bookworm|trixie [pytest args...]" >&2; exit 2 ;;
esac
[ $# -gt 0 ] || set -- tests/integration/test_kprobe.py

# In the guest: no network; setup.sh only checks (the image has every package and the venv),
# then pytest. No .pyc or pytest cache is written into the shared checkout.
exec scripts/vm/run-in-vm.sh "$SUITE" -- env RST_TRACER_BACKEND=kprobe PYTHONDONTWRITEBYTECODE=1 \
  bash -c 'VENV=$(scripts/setup.sh) && exec "$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"' \
  test-vm "$@"
