"""Configuration: a TOML file or the ``--proxy`` quick form, validated up front.

Every error names the offending key the way a user would find it in the file
(``proxy[1].listen``), says what is wrong and how to fix it, and is raised as
:class:`ConfigError` so the CLI can print it and exit non-zero. Protocol modules
declare their own options (:class:`Option`); the keys common to every proxy are
validated here.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOLS = ("amqp", "mysql", "postgres", "http", "https", "tcp")
DEFAULT_NAMES = {
    "amqp": "rabbitmq",
    "mysql": "mysql",
    "postgres": "postgresql",
    "http": "http",
    "https": "https",
    "tcp": "tcp",
}
DEFAULT_CAPTURE = "sniff-capture.db"


class ConfigError(Exception):
    """A configuration problem a user must fix; the message says where and how."""


@dataclass(frozen=True)
class Option:
    """A protocol-specific proxy option: its type, default and a one-line help."""

    type: type | tuple[type, ...]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None


@dataclass
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class ProxyConfig:
    name: str
    protocol: str
    listen: Address
    upstream: Address
    inject: bool = True
    connect_timeout: float = 5.0
    options: dict[str, Any] = field(default_factory=dict)

    def opt(self, key: str) -> Any:
        return self.options[key]


@dataclass
class ExportConfig:
    otlp: str | None = None
    otlp_headers: dict[str, str] = field(default_factory=dict)
    jaeger_json: str | None = None


@dataclass
class Config:
    capture: str = DEFAULT_CAPTURE
    capture_queue: int = 200_000
    log_level: str = "info"
    proxies: list[ProxyConfig] = field(default_factory=list)
    export: ExportConfig = field(default_factory=ExportConfig)
    # address or CIDR -> component name (first source of service identity)
    services: dict[str, str] = field(default_factory=dict)
    # resolve the local process behind loopback peers (/proc) and reverse DNS of others
    identify_processes: bool = True
    # capture, identity, correlation and export in a separate low-priority process
    capture_process: bool = True
    # seconds the capture process's decoding may wait for idle CPU (see sniff.capture_proc.LoadGate)
    capture_defer: float = 30.0
    # correlator options, validated by correlate/ (kept as raw table here)
    correlate: dict[str, Any] = field(default_factory=dict)


def parse_address(value: object, key: str, default_host: str = "127.0.0.1") -> Address:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f'{key}: expected "HOST:PORT" (for example "127.0.0.1:5673"), got {value!r}'
        )
    text = value.strip()
    for scheme in (
        "tcp://",
        "http://",
        "https://",
        "amqp://",
        "mysql://",
        "postgres://",
        "postgresql://",
    ):
        if text.startswith(scheme):
            text = text[len(scheme) :].rstrip("/")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise ConfigError(f"{key}: unbalanced '[' in {value!r}; write IPv6 as \"[::1]:5673\"")
    elif text.count(":") == 1:
        host, _, port_s = text.partition(":")
    elif text.isdigit():
        host, port_s = "", text
    else:
        raise ConfigError(f'{key}: {value!r} has no port; write "HOST:PORT" (IPv6 as "[::1]:PORT")')
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{key}: port {port_s!r} in {value!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port {port} in {value!r} is out of range 1-65535")
    return Address(host or default_host, port)


def _check_type(value: Any, typ: type | tuple[type, ...], key: str) -> Any:
    types = typ if isinstance(typ, tuple) else (typ,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if bool not in types and isinstance(value, bool):
        pass  # bool is an int subclass; refuse it for int options below
    elif isinstance(value, types):
        return value
    names = " or ".join(_type_name(t) for t in types)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _type_name(t: type) -> str:
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(t, t.__name__)


_PROXY_KEYS = {"name", "protocol", "listen", "upstream", "inject", "connect_timeout", "decode"}


def _proxy_from_table(t: dict[str, Any], key: str) -> ProxyConfig:
    from sniff import registry  # late: registry imports protocol modules lazily

    if not isinstance(t, dict):
        raise ConfigError(f"{key}: expected a table ([[proxy]]), got {t!r}")
    proto = t.get("protocol")
    if proto is None:
        raise ConfigError(f"{key}.protocol: missing; set protocol = one of {', '.join(PROTOCOLS)}")
    if proto not in PROTOCOLS:
        raise ConfigError(
            f"{key}.protocol: unknown protocol {proto!r}; use one of {', '.join(PROTOCOLS)}"
        )
    for required in ("listen", "upstream"):
        if required not in t:
            raise ConfigError(f'{key}.{required}: missing; set {required} = "HOST:PORT"')
    listen = parse_address(t["listen"], f"{key}.listen")
    upstream = parse_address(t["upstream"], f"{key}.upstream")
    name = t.get("name", DEFAULT_NAMES[proto])
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{key}.name: expected a non-empty string, got {name!r}")
    inject = _check_type(t.get("inject", True), bool, f"{key}.inject")
    timeout = _check_type(t.get("connect_timeout", 5.0), float, f"{key}.connect_timeout")
    if timeout <= 0:
        raise ConfigError(f"{key}.connect_timeout: must be > 0 seconds, got {timeout}")
    decode = t.get("decode", "capture")
    if decode not in ("capture", "inline"):
        raise ConfigError(
            f'{key}.decode: {decode!r} is not "capture" (decode in the capture process, the default) '
            'or "inline" (decode on the proxy\'s event loop)'
        )
    spec = registry.options(proto)
    options: dict[str, Any] = {}
    for k, v in t.items():
        if k in _PROXY_KEYS:
            continue
        if k not in spec:
            known = ", ".join(sorted(_PROXY_KEYS | set(spec)))
            raise ConfigError(f"{key}.{k}: unknown key for protocol {proto!r}; known keys: {known}")
        opt = spec[k]
        val = _check_type(v, opt.type, f"{key}.{k}")
        if opt.choices is not None and val not in opt.choices:
            raise ConfigError(
                f"{key}.{k}: {val!r} is not one of {', '.join(map(repr, opt.choices))}"
            )
        options[k] = val
    for k, opt in spec.items():
        options.setdefault(k, opt.default)
    options["decode"] = decode
    cfg = ProxyConfig(name.strip(), proto, listen, upstream, inject, timeout, options)
    registry.validate(cfg, key)
    return cfg


_TOP_KEYS = {
    "capture",
    "capture_queue",
    "log_level",
    "proxy",
    "export",
    "services",
    "correlate",
    "identify_processes",
    "capture_process",
    "capture_defer",
}


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    cfg = Config()
    for k in data:
        if k not in _TOP_KEYS:
            raise ConfigError(
                f"{source}: unknown top-level key {k!r}; known keys: {', '.join(sorted(_TOP_KEYS))}"
            )
    if "capture" in data:
        cfg.capture = _check_type(data["capture"], str, "capture")
    if "capture_queue" in data:
        cfg.capture_queue = _check_type(data["capture_queue"], int, "capture_queue")
        if cfg.capture_queue < 100:
            raise ConfigError(
                f"capture_queue: must be at least 100 events, got {cfg.capture_queue}"
            )
    if "log_level" in data:
        lvl = _check_type(data["log_level"], str, "log_level").lower()
        if lvl not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: {lvl!r} is not one of debug, info, warning, error")
        cfg.log_level = lvl
    if "identify_processes" in data:
        cfg.identify_processes = _check_type(data["identify_processes"], bool, "identify_processes")
    if "capture_process" in data:
        cfg.capture_process = _check_type(data["capture_process"], bool, "capture_process")
    if "capture_defer" in data:
        v = data["capture_defer"]
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(
                f"capture_defer: expected a number of seconds >= 0 (0 decodes at once), got {v!r}"
            )
        cfg.capture_defer = float(v)
    proxies = data.get("proxy", [])
    if isinstance(proxies, dict):
        raise ConfigError("proxy: write each proxy as [[proxy]] (an array of tables), not [proxy]")
    if not isinstance(proxies, list):
        raise ConfigError(f"proxy: expected [[proxy]] tables, got {proxies!r}")
    for i, t in enumerate(proxies):
        cfg.proxies.append(_proxy_from_table(t, f"proxy[{i}]"))
    _check_unique(cfg.proxies)
    exp = data.get("export", {})
    if not isinstance(exp, dict):
        raise ConfigError(f"export: expected a table [export], got {exp!r}")
    for k, v in exp.items():
        if k == "otlp":
            url = _check_type(v, str, "export.otlp")
            if not url.startswith(("http://", "https://", "grpc://", "grpcs://")):
                raise ConfigError(
                    f"export.otlp: {url!r} must start with http:// or https:// (OTLP/HTTP protobuf) "
                    'or grpc:// (OTLP/gRPC), e.g. "http://127.0.0.1:4318"'
                )
            cfg.export.otlp = url
        elif k == "otlp_headers":
            hdrs = _check_type(v, dict, "export.otlp_headers")
            cfg.export.otlp_headers = {str(a): str(b) for a, b in hdrs.items()}
        elif k == "jaeger_json":
            cfg.export.jaeger_json = _check_type(v, str, "export.jaeger_json")
        else:
            raise ConfigError(
                f"export.{k}: unknown key; known keys: otlp, otlp_headers, jaeger_json"
            )
    services = data.get("services", {})
    if not isinstance(services, dict):
        raise ConfigError('services: expected a table of "ADDRESS or CIDR" = "name"')
    for addr, name in services.items():
        try:
            ipaddress.ip_network(addr, strict=False)
        except ValueError:
            raise ConfigError(
                f'services.{addr!r}: not an IP address or CIDR; write e.g. "10.0.0.5" = "nova-api"'
            ) from None
        cfg.services[addr] = _check_type(name, str, f"services.{addr!r}")
    corr = data.get("correlate", {})
    if not isinstance(corr, dict):
        raise ConfigError("correlate: expected a table [correlate]")
    from correlate.options import validate as validate_correlate

    cfg.correlate = validate_correlate(corr)
    return cfg


def _check_unique(proxies: list[ProxyConfig]) -> None:
    seen: dict[tuple[str, int], int] = {}
    for i, p in enumerate(proxies):
        k = (p.listen.host, p.listen.port)
        if k in seen:
            raise ConfigError(
                f"proxy[{i}].listen: {p.listen} is also used by proxy[{seen[k]}]; give each proxy its own port"
            )
        seen[k] = i


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file; pass an existing file with -c/--config") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    return from_dict(data, str(p))


def parse_quick_proxy(spec: str, index: int = 0) -> dict[str, Any]:
    """``[NAME@]PROTO:LISTEN=UPSTREAM`` -> a proxy table, e.g. ``amqp:127.0.0.1:5673=127.0.0.1:5672``."""
    key = f"--proxy {spec!r}"
    name = None
    rest = spec
    if "@" in rest.split(":", 1)[0]:
        name, rest = rest.split("@", 1)
    proto, sep, addrs = rest.partition(":")
    if not sep or "=" not in addrs:
        raise ConfigError(
            f"{key}: expected [NAME@]PROTOCOL:LISTEN=UPSTREAM, e.g. amqp:127.0.0.1:5673=127.0.0.1:5672"
        )
    listen, _, upstream = addrs.partition("=")
    t: dict[str, Any] = {"protocol": proto, "listen": listen, "upstream": upstream}
    if name:
        t["name"] = name
    return t
