"""Network-namespace lab: reproduces the incidents on this host without touching the root
namespace. Used by scripts/lab.py, the demo and the integration tests."""
