# Sourced by scripts/{test,stress,demo}.sh. The lab namespaces this run makes carry its tag
# in their names (RST_TRACER_LAB_RUN: tracer/lab/topology.py), and lab_cleanup removes those,
# whatever happened to the run, and only those: another run's labs on the machine stay.
export RST_TRACER_LAB_RUN="run$$"
lab_cleanup() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk -v tag="rstlab-$RST_TRACER_LAB_RUN-" 'index($1, tag) == 1 {print $1}'); do
    ip netns del "$ns" 2>/dev/null || true
  done
}
