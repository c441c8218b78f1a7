#!/usr/bin/env bash
# Stress mode: the conntrack flush and expiry tests (pytest marker `flush`: vip-move,
# device-down, ct-flush, dhcp-renew keepalive and data, ct-expire listing and lookup) and the
# SNAT race tests (marker `race`: snat-race with and without --random-fully), and the storm
# isolation test (marker `storm`: one namespace flooded, another's resets still per-event), each
# run N times (default 20) while a CPU hog keeps every core busy, the lab's namespaces handed
# to the scenario 0, 0.1 or 1 s after their creation in turn.
#   sudo scripts/stress.sh            20 runs of each
#   sudo scripts/stress.sh 5 -x       5 runs, extra pytest arguments after the count
#   RST_TRACER_HOG=0 scripts/stress.sh   without the CPU hog
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/setup.sh)
runs=${1:-20}
shift || true
hogs=()
. scripts/lib/lab-run.sh
cleanup() {
  for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null || true; done
  lab_cleanup
}
trap cleanup EXIT
if [ "${RST_TRACER_HOG:-1}" != 0 ]; then
  for _ in $(seq "$(nproc)"); do
    ( while :; do :; done ) &
    hogs+=("$!")
  done
  echo "[stress] CPU hog: ${#hogs[@]} busy loops (pids ${hogs[*]})" >&2
fi
start=$(date +%s)
status=0
RST_TRACER_STRESS_RUNS=$runs "$VENV/bin/python" -m pytest -p no:cacheprovider -q -ra -m "flush or race or storm" tests/integration "$@" \
  || status=$?
echo "[stress] $runs runs of each flush/expiry/race/storm test, $(( $(date +%s) - start )) s, pytest exit $status" >&2
exit "$status"
