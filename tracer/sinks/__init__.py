"""Where records go. A sink takes JSON-ready dicts (verdict, loss and status records, see
tracer/schema.py) and must never block the probe loop for long."""
from .console import HumanSink, JsonLinesSink, Sink  # noqa: F401
