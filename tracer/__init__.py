"""rst-tracer: explains why a TCP connection was reset or a SYN vanished.

Data flows one way: probes (kernel) -> decode -> context -> attribution -> sinks.
"""
__version__ = "0.1.0"
