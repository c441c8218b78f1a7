"""Kernel side: capability detection, BTF, BCC loading, probe backends."""
