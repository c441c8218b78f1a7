#!/usr/bin/env bash
# The README's test command: installs what it needs (idempotent), then runs the unit tests
# (no root needed) and the integration tests (root: real BPF, real namespaces) on this
# kernel, then the kprobe backend's tests in the bookworm VM (Debian's stock 6.1 kernel;
# the image is built once and cached under /var/cache/rst-tracer/vm).
#   scripts/test.sh              everything (CI runs this)
#   scripts/test.sh -k invalid   extra pytest arguments: host tests only
#   RST_TRACER_VM=0 scripts/test.sh   skip the VM
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/setup.sh)
# never leave this run's lab namespaces behind, whatever happens to pytest
. scripts/lib/lab-run.sh
trap lab_cleanup EXIT
status=0
"$VENV/bin/python" -m pytest -p no:cacheprovider -ra tests "$@" || status=$?
if [ $# -eq 0 ] && [ "${RST_TRACER_VM:-1}" != 0 ]; then
  scripts/test-vm.sh bookworm || status=$?
fi
exit "$status"
