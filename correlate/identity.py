"""Service identity: which component a connection's client is.

Sources, in order: the config's address/CIDR map; the local process behind a
loopback peer (pid and executable, resolved by the proxy at accept time); the
protocol's own self-description (AMQP connection_name/product, MySQL
program_name, PostgreSQL application_name, HTTP User-Agent); reverse DNS; and
finally the bare peer address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

# self-description keys, per identity source, best first
_SELF_KEYS: dict[str, tuple[str, ...]] = {
    "amqp.client_properties": ("connection_name", "product"),
    "mysql.connect_attrs": ("program_name", "_client_name"),
    "postgres.startup": ("application_name",),
    "http.user_agent": ("product",),
}


@dataclass(slots=True)
class ConnInfo:
    conn: int
    proxy: str
    protocol: str
    client_addr: str
    client_port: int
    server_addr: str
    server_port: int
    opened: int
    closed: int | None = None
    peer_pid: int | None = None
    identity: dict[str, dict[str, str]] = field(default_factory=dict)  # source -> attrs
    _service: str | None = None

    def resource(self, service: str) -> dict[str, Any]:
        r: dict[str, Any] = {"service.name": service, "sniff.client.address": self.client_addr}
        if self.peer_pid:
            r["process.pid"] = self.peer_pid
        proc = self.identity.get("proc")
        if proc:
            if proc.get("exe"):
                r["process.executable.path"] = proc["exe"]
            if proc.get("cmdline"):
                r["process.command_line"] = proc["cmdline"]
        return r


class ServiceMap:
    """Address/CIDR -> component name, most specific network first."""

    def __init__(self, mapping: dict[str, str] | None = None) -> None:
        nets = []
        for addr, name in (mapping or {}).items():
            nets.append((ipaddress.ip_network(addr, strict=False), name))
        nets.sort(key=lambda n: n[0].prefixlen, reverse=True)
        self._nets = nets
        self._cache: dict[str, str | None] = {}

    def lookup(self, addr: str) -> str | None:
        if not self._nets:
            return None
        if addr in self._cache:
            return self._cache[addr]
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            self._cache[addr] = None
            return None
        found = None
        for net, name in self._nets:
            if ip.version == net.version and ip in net:
                found = name
                break
        self._cache[addr] = found
        return found


def resolve_service(info: ConnInfo, services: ServiceMap) -> str:
    if info._service is not None:
        return info._service
    name = services.lookup(info.client_addr)
    if name is None:
        proc = info.identity.get("proc")
        if proc and proc.get("name"):
            name = proc["name"]
    if name is None:
        for source, keys in _SELF_KEYS.items():
            attrs = info.identity.get(source)
            if not attrs:
                continue
            for k in keys:
                v = attrs.get(k)
                if v:
                    name = v
                    break
            if name:
                break
    if name is None:
        rdns = info.identity.get("rdns")
        if rdns and rdns.get("name"):
            name = rdns["name"]
    if name is None:
        name = f"{info.protocol}-client@{info.client_addr}"
    # the name is final only once self-description had its chance
    if info.identity:
        info._service = name
    return name
