"""`watch --output SPEC`: where verdicts go.

    stdout                                   human lines on a TTY, JSON lines otherwise (--json)
    file:/path[?max_bytes=N&backups=K]       JSON lines appended; rotated at N bytes, K backups
    unix:/path                               JSON lines to a Unix stream socket
    tcp:HOST:PORT                            JSON lines over TCP (Vector, Fluent Bit tcp, rsyslog imtcp)
    fluent:HOST:PORT[?tag=T&ack=true]        Fluentd Forward protocol (Fluentd, Fluent Bit forward)

Every network/file output also takes ``queue=N`` (records held while the destination is
slow or down, default 10000). IPv6 hosts go in brackets: ``tcp:[::1]:5170``.
``parse_spec`` only validates (no side effect, used while parsing the command line);
``parse_output`` builds the running sink."""
from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field

from ..events import format_endpoint
from .console import HumanSink, JsonLinesSink, Sink

SCHEMES = ("stdout", "file", "unix", "tcp", "fluent")
USAGE = ("stdout, file:/path[?max_bytes=N&backups=K], unix:/path, tcp:HOST:PORT "
         "or fluent:HOST:PORT[?tag=T&ack=true]")
_PARAMS = {
    "stdout": set(),
    "file": {"queue", "max_bytes", "backups"},
    "unix": {"queue"},
    "tcp": {"queue"},
    "fluent": {"queue", "tag", "ack", "ack_timeout", "mode"},
}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")
_TAG = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_SIZE = re.compile(r"^(\d+)\s*([kmg]i?b?|b)?$", re.I)
_UNIX_PATH_MAX = 107


@dataclass
class OutputSpec:
    scheme: str
    name: str                 # what stats, metrics and loss records call it
    target: object = None     # path, or (host, port)
    params: dict = field(default_factory=dict)


def _int(name: str, value: str, minimum: int) -> int:
    if not value.isdigit() or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return int(value)


def _size(value: str) -> int:
    m = _SIZE.match(value.strip())
    if not m:
        raise ValueError(f"max_bytes must be a size like 10485760, 10M or 512k, not {value!r}")
    unit = (m.group(2) or "b")[0].lower()
    return int(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def _bool(name: str, value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, not {value!r}")


def host_port(text: str, what: str) -> tuple:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port), or ValueError."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected {what}, with IPv6 addresses in brackets: [::1]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected {what}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses go in brackets: [{host}]:{port}")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} is not a host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1-65535, not {port!r}")
    return host, int(port)


def parse_spec(spec: str) -> OutputSpec:
    """Validate an output spec; ValueError with a one-line message if it is wrong."""
    spec = spec.strip()
    scheme, colon, rest = spec.partition(":")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown output {spec!r}: expected {USAGE}")
    if scheme == "stdout":
        if colon:
            raise ValueError("stdout takes no options (use --json for JSON lines)")
        return OutputSpec("stdout", "stdout")
    rest, _, query = rest.partition("?")
    if not rest:
        raise ValueError(f"{scheme}: needs a {'path' if scheme in ('file', 'unix') else 'HOST:PORT'}")
    params = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in _PARAMS[scheme]:
            allowed = ", ".join(sorted(_PARAMS[scheme])) or "none"
            raise ValueError(f"{scheme}: unknown option {key!r} (options: {allowed})")
        if not eq or not value:
            raise ValueError(f"{scheme}: option {key} needs a value ({key}=...)")
        if key in params:
            raise ValueError(f"{scheme}: option {key} given twice")
        params[key] = value
    out = {}
    if "queue" in params:
        out["queue_size"] = _int("queue", params["queue"], 1)
    if scheme in ("file", "unix"):
        path = os.path.abspath(rest)
        if scheme == "file":
            if os.path.isdir(path):
                raise ValueError(f"file: {path} is a directory")
            if "max_bytes" in params:
                out["max_bytes"] = _size(params["max_bytes"])
            if "backups" in params:
                if "max_bytes" not in params:
                    raise ValueError("file: backups only makes sense with max_bytes")
                out["backups"] = _int("backups", params["backups"], 0)
        elif len(path.encode()) > _UNIX_PATH_MAX:
            raise ValueError(f"unix: socket path longer than {_UNIX_PATH_MAX} bytes")
        return OutputSpec(scheme, f"{scheme}:{path}", path, out)
    host, port = host_port(rest, f"{scheme}:HOST:PORT")
    if scheme == "fluent":
        if "tag" in params:
            if not _TAG.match(params["tag"]):
                raise ValueError(f"fluent: tag must be letters, digits, '.', '_', '-', not {params['tag']!r}")
            out["tag"] = params["tag"]
        if "ack" in params:
            out["ack"] = _bool("ack", params["ack"])
        if "ack_timeout" in params:
            try:
                out["ack_timeout"] = float(params["ack_timeout"])
            except ValueError:
                out["ack_timeout"] = -1.0
            if not 0 < out["ack_timeout"] < float("inf"):
                raise ValueError(f"fluent: ack_timeout must be a positive number of seconds, "
                                 f"not {params['ack_timeout']!r}")
        if "mode" in params:
            if params["mode"] not in ("forward", "message"):
                raise ValueError(f"fluent: mode must be forward or message, not {params['mode']!r}")
            out["mode"] = params["mode"]
    name = f"{scheme}:{format_endpoint(host, port)}"
    return OutputSpec(scheme, name, (host, port), out)


def build(spec: OutputSpec, as_json: bool = False, verbose: bool = False, stream=None,
          name: str = "") -> Sink:
    """The running sink for a validated spec (network/file sinks start their thread)."""
    name = name or spec.name
    if spec.scheme == "stdout":
        stream = stream or sys.stdout
        return JsonLinesSink(stream) if as_json or not stream.isatty() else HumanSink(stream, verbose)
    if spec.scheme == "file":
        from .files import FileSink
        return FileSink(spec.target, name=name, **spec.params)
    if spec.scheme == "unix":
        from .stream import UnixSink
        return UnixSink(spec.target, name=name, **spec.params)
    if spec.scheme == "tcp":
        from .stream import TcpSink
        return TcpSink(*spec.target, name=name, **spec.params)
    from .fluent import FluentSink
    return FluentSink(*spec.target, name=name, **spec.params)


def parse_output(spec: str, as_json: bool = False, verbose: bool = False, stream=None) -> Sink:
    """``rst-tracer watch --output SPEC`` -> a running Sink (ValueError if SPEC is wrong)."""
    return build(parse_spec(spec), as_json=as_json, verbose=verbose, stream=stream)


def build_all(specs, as_json: bool = False, verbose: bool = False) -> list:
    """Sinks for several validated specs; the same destination twice gets distinct names."""
    sinks, seen = [], {}
    for spec in specs:
        seen[spec.name] = seen.get(spec.name, 0) + 1
        name = spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}"
        sinks.append(build(spec, as_json=as_json, verbose=verbose, name=name))
    return sinks

