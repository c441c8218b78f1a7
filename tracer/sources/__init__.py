"""Event sources, peers of one another: the probes' ring buffer, the netlink monitors and
the discovery of network namespaces they are opened in."""
