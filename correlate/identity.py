"""Service identity: which component is at each end of a connection.

A component has a *key* (what makes two connections the same component, used
for causality) and a *name* (service.name in Jaeger). The key comes from the
first source that knows, in this order:

1. the config's ``[services]`` map (address or CIDR -> name);
2. the local process behind a loopback peer (pid, resolved through /proc by
   the proxy), so that on one host each process is its own component;
3. the pid a client gives of itself (oslo.messaging's connection names, the
   MySQL ``_pid`` connection attribute), with its address;
4. the name an application gives itself: AMQP ``connection_name``, MySQL
   ``program_name``, PostgreSQL ``application_name``, HTTP User-Agent;
5. reverse DNS of the peer (compose service names);
6. the client library's name (AMQP ``product``, MySQL ``_client_name``), which
   every user of that library shares;
7. the peer address.

oslo.messaging names every AMQP connection ``<program>:<pid>:<connection uuid>``:
that is read as the program ``<program>`` and, without /proc, as the process
``<pid>`` at the peer's address, so that all the connections of one OpenStack
process are one component named after the program (not one per connection).

The name prefers what a person configured or the software says of itself:
config; the proxy a process serves behind (a worker of the service proxied as
"nova-api" is "nova-api" when it calls the database too); the application's
own name; the process name; reverse DNS; the client library; the address. So
two workers of one service are two components (two pids) with one service
name, told apart in Jaeger by ``process.pid``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

# self-description keys, per identity source, best first: what the application calls
# itself (a name someone chose for this component)...
_SELF_KEYS: dict[str, tuple[str, ...]] = {
    "amqp.client_properties": ("connection_name",),
    "mysql.connect_attrs": ("program_name",),
    "postgres.startup": ("application_name",),
    "http.user_agent": ("product",),  # keystoneauth puts the service first: "nova-compute ..."
}
# ... and what only names its client library ("pymysql", "Pika Python Client Library"):
# shared by every component that uses the library, so it names one only when neither
# the process nor reverse DNS can
_LIBRARY_KEYS: dict[str, tuple[str, ...]] = {
    "amqp.client_properties": ("product",),
    "mysql.connect_attrs": ("_client_name",),
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
    identity: dict[str, dict[str, str]] = field(default_factory=dict)  # source -> attrs
    _client: Component | None = None
    _server: Component | None = None

    def pid(self, server: bool = False) -> int | None:
        proc = self.identity.get("proc.server" if server else "proc")
        if proc and proc.get("pid"):
            return int(proc["pid"])
        return None

    def forget(self) -> None:
        self._client = self._server = None


@dataclass(frozen=True, slots=True)
class Component:
    key: str
    name: str
    resource: dict[str, Any]


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


# oslo.messaging's connection_name: "%s:%d:%s" % (basename(argv[0]), pid, uuid4)
_PROGRAM_PID_ID = re.compile(r"([^:\s]+):(\d{1,10}):(\S+)")


def _self_description(info: ConnInfo) -> tuple[str | None, str | None, int | None]:
    """What the client calls itself, the client library it names, and the pid it
    gives, if any (oslo.messaging's ``<program>:<pid>:<connection id>`` connection
    names; the ``_pid`` connection attribute of MySQL clients)."""
    own = library = None
    pid: int | None = None
    for source, keys in _SELF_KEYS.items():
        attrs = info.identity.get(source)
        if attrs and own is None:
            for k in keys:
                v = attrs.get(k)
                if v:
                    m = _PROGRAM_PID_ID.fullmatch(v) if k == "connection_name" else None
                    if m:
                        own, pid = m.group(1), int(m.group(2))
                    else:
                        own = v
                    break
    for source, keys in _LIBRARY_KEYS.items():
        attrs = info.identity.get(source)
        if attrs and library is None:
            library = next((attrs[k] for k in keys if attrs.get(k)), None)
    if pid is None:
        attrs = info.identity.get("mysql.connect_attrs")
        if attrs and str(attrs.get("_pid", "")).isdigit():
            pid = int(attrs["_pid"])
    return own, library, pid


class Identities:
    """Names the client and server ends of connections (same rules live and offline)."""

    def __init__(self, services: dict[str, str] | None = None) -> None:
        self.services = ServiceMap(services)
        # (host, pid) -> proxy name, for processes listening behind a proxy's upstream
        self.serving: dict[tuple[str, int], str] = {}
        # proxy -> the processes listening on its upstream address (last report)
        self.listeners: dict[str, list[dict[str, str]]] = {}
        # component name -> the processes seen under it, for connections whose
        # process could not be looked up (closed within milliseconds)
        self.by_name: dict[str, set[tuple[str, int]]] = {}

    def upstream(
        self, proxy: str, processes: list[dict[str, str]], listening: bool = False
    ) -> None:
        for p in processes:
            if p.get("pid"):
                self.serving[(p.get("host", ""), int(p["pid"]))] = proxy
        if listening:
            self.listeners[proxy] = [p for p in processes if p.get("pid")]
        for p in processes:
            if p.get("pid"):
                self.by_name.setdefault(proxy, set()).add((p.get("host", ""), int(p["pid"])))

    def client(self, info: ConnInfo) -> Component:
        if info._client is not None:
            return info._client
        proc = info.identity.get("proc") or {}
        rdns = info.identity.get("rdns") or {}
        configured = self.services.lookup(info.client_addr)
        pid = int(proc["pid"]) if proc.get("pid") else None
        host = proc.get("host", "")
        own, library, described_pid = _self_description(info)
        described = own or library
        name = (
            configured
            or (self.serving.get((host, pid)) if pid is not None else None)
            or own
            or proc.get("name")
            or rdns.get("name")
            or library
            or f"{info.protocol}-client@{info.client_addr}"
        )
        inferred = False
        if pid is None and "proc" in info.identity and not configured:
            # the lookup found no process (the connection closed within milliseconds):
            # if the name it gave is borne by exactly one known process, it is that one
            known = self.by_name.get(name) or (self.by_name.get(described) if described else None)
            if known and described_pid is not None:  # it gave its pid: that process, if known
                known = {hp for hp in known if hp[1] == described_pid}
            if known and len(known) == 1:
                host, pid = next(iter(known))
                inferred = True
        if configured:
            key = f"cfg:{configured}"
        elif pid is not None:
            key = f"pid:{host}:{pid}"
            if not inferred:
                self.by_name.setdefault(name, set()).add((host, pid))
        elif described and described_pid is not None:
            # one process, however many connections it opens: its pid at its address
            key = f"self:{info.client_addr}:{name}:{described_pid}"
        elif own:
            key = f"self:{own}"
        elif rdns.get("name"):
            key = f"dns:{rdns['name']}"
        elif library:
            key = f"self:{library}"
        else:
            key = f"addr:{info.client_addr}"
        res: dict[str, Any] = {"service.name": name, "sniff.client.address": info.client_addr}
        if pid is not None:
            res["process.pid"] = pid
            if proc.get("exe"):
                res["process.executable.path"] = proc["exe"]
            if proc.get("cmdline"):
                res["process.command_line"] = proc["cmdline"]
            if host:
                res["host.name"] = host
        elif described_pid is not None and not configured:
            res["process.pid"] = described_pid  # as the client gave it (its own pid namespace)
        comp = Component(key, name, res)
        if ("proc" in info.identity and (proc.get("pid") or configured)) or "rdns" in info.identity:
            info._client = comp  # final once the process lookup has answered (an inference is not)
        return comp

    def server(self, info: ConnInfo) -> Component:
        """The upstream end: the proxied service itself (for SERVER spans)."""
        if info._server is not None:
            return info._server
        proc = info.identity.get("proc.server") or {}
        if not proc.get("pid") and len(self.listeners.get(info.proxy, ())) == 1:
            # the accepting process was not seen, but only one process listens there
            proc = self.listeners[info.proxy][0]
        configured = self.services.lookup(info.server_addr)
        pid = int(proc["pid"]) if proc.get("pid") else None
        host = proc.get("host", "")
        name = configured or info.proxy
        if configured:
            key = f"cfg:{configured}"
        elif pid is not None:
            key = f"pid:{host}:{pid}"
        else:
            key = f"svc:{info.proxy}"
        res: dict[str, Any] = {
            "service.name": name,
            "server.address": info.server_addr,
            "server.port": info.server_port,
        }
        if pid is not None:
            res["process.pid"] = pid
            if proc.get("exe"):
                res["process.executable.path"] = proc["exe"]
            if proc.get("cmdline"):
                res["process.command_line"] = proc["cmdline"]
            if host:
                res["host.name"] = host
        comp = Component(key, name, res)
        if "proc.server" in info.identity or "rdns.server" in info.identity:
            info._server = comp
        return comp


def resolve_service(info: ConnInfo, services: ServiceMap | Identities | None = None) -> str:
    """The client component's name (kept for callers that only need the name)."""
    ids = services if isinstance(services, Identities) else Identities()
    if isinstance(services, ServiceMap):
        ids.services = services
    return ids.client(info).name
