"""The event model shared by every protocol.

Decoders emit events; the capture store persists them; the correlator turns
them into spans. An event is a slotted dataclass registered under a dotted
``kind`` (``amqp.publish``, ``mysql.query``...); the part before the first dot is
the protocol. Every event has ``ts`` (wall-clock nanoseconds, so captures from
several hosts can be merged) and ``conn`` (the connection id, 0 for
process-level events).

Events are plain (not frozen) slotted dataclasses: a frozen one costs four times
as much to build, and events are built on the hot path. Treat them as immutable
once emitted.

Serialisation is orjson over the dataclass; ``bytes`` fields are stored as
latin-1 strings (lossless) and restored on load from the class's field types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import operator
import random
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, dataclass_transform

import orjson

_T = TypeVar("_T", bound="Event")

REGISTRY: dict[str, type[Event]] = {}


@dataclass_transform()
def event(kind: str) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: make ``cls`` a slotted dataclass event registered as ``kind``."""

    def deco(cls: type[_T]) -> type[_T]:
        cls.kind = kind
        cls.protocol = kind.split(".", 1)[0]
        new = dataclasses.dataclass(slots=True)(cls)
        new._bytes_fields = tuple(
            f.name
            for f in dataclasses.fields(new)
            if f.type in ("bytes", "bytes | None", bytes) or str(f.type).startswith("bytes")
        )
        if kind in REGISTRY:
            raise ValueError(f"event kind {kind!r} registered twice")
        REGISTRY[kind] = new
        return new

    return deco


@dataclasses.dataclass(slots=True)
class Event:
    kind: ClassVar[str] = "event"
    protocol: ClassVar[str] = "core"
    _bytes_fields: ClassVar[tuple[str, ...]] = ()
    # Work that must not run on the proxy's event loop (normalising SQL text,
    # extracting ids from a body) goes in ``prepare``; the capture writer's thread
    # calls it once, before the event is stored or correlated, when this is True.
    needs_prepare: ClassVar[bool] = False

    ts: int
    conn: int

    def prepare(self) -> None:
        """Off-hot-path completion of the event (see ``needs_prepare``)."""


# --- connection lifecycle, common to every protocol ------------------------------------


@event("core.proxy_start")
class ProxyStart(Event):
    proxy: str
    protocol_name: str
    listen: str
    upstream: str
    inject: bool


@event("core.proxy_stop")
class ProxyStop(Event):
    proxy: str
    connections: int


@event("core.conn_open")
class ConnOpen(Event):
    """A client connected and its upstream connection is established."""

    proxy: str
    protocol_name: str
    client_addr: str
    client_port: int
    server_addr: str  # the upstream the proxy connected to
    server_port: int
    listen_addr: str
    listen_port: int
    upstream_local_port: int = 0  # our end of the upstream connection (finds the server's process)
    upstream_local_addr: str = ""


@event("core.conn_close")
class ConnClose(Event):
    reason: str
    closed_by: str  # client | server | proxy
    bytes_from_client: int
    bytes_from_server: int


@event("core.upstream_error")
class UpstreamError(Event):
    """The upstream refused, timed out or died; the client side was closed."""

    proxy: str
    upstream: str
    client_addr: str
    client_port: int
    reason: str


@event("core.protocol_error")
class ProtocolError(Event):
    """Bytes a decoder could not parse; the connection is now plain passthrough."""

    protocol_name: str
    direction: str  # c2s | s2c
    offset: int  # byte offset in that direction's stream
    reason: str
    context: str  # hex of up to 32 bytes around the failure


@event("core.identity")
class ConnIdentity(Event):
    """What a client says about itself (AMQP client_properties, MySQL connection
    attributes, PostgreSQL application_name, HTTP User-Agent...)."""

    source: str
    attrs: dict[str, str]


@event("core.proxy_upstream")
class ProxyUpstream(Event):
    """The local processes listening behind a proxy's upstream address (so a
    pre-forked service's workers are known to be that service)."""

    proxy: str
    upstream: str
    processes: list[dict[str, str]]  # pid, name, exe, cmdline, host


@event("core.raw")
class RawChunk(Event):
    """Bytes a proxy forwarded, shipped to the capture process to be decoded there
    (``decode = "capture"``); consumed by the decoder host, never stored.
    ``direction`` is 0 client->server, 1 server->client; ``ts`` is when the proxy
    read them, the clock the decoder runs on; ``meta`` is protocol-specific (AMQP:
    the traceparents the proxy injected into this chunk)."""

    direction: int
    data: bytes
    meta: Any = None


@event("core.raw_gap")
class RawGap(Event):
    """Raw bytes of a connection were dropped (the capture queue was full): its
    decoding stops here; recorded as a Note."""

    lost_bytes: int


@event("core.note")
class Note(Event):
    """Something a user should know that is not an error: a skipped injection,
    a TLS downgrade, a passthrough decision."""

    code: str
    message: str


# --- serialisation ----------------------------------------------------------------------


def _default(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).decode("latin-1")
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def dumps(ev: Event) -> bytes:
    return orjson.dumps(ev, default=_default)


_tried_modules: set[str] = set()


def event_class(kind: str) -> type[Event] | None:
    """The class registered for ``kind``, importing ``proxies.<protocol>.events`` on first use."""
    cls = REGISTRY.get(kind)
    if cls is None:
        proto = kind.split(".", 1)[0]
        if proto not in _tried_modules:
            _tried_modules.add(proto)
            with contextlib.suppress(ImportError):
                importlib.import_module(f"proxies.{proto}.events")
            cls = REGISTRY.get(kind)
    return cls


_getters: dict[type[Event], Any] = {}


def loads(kind: str, data: bytes | str | dict[str, Any]) -> Event:
    cls = REGISTRY.get(kind) or event_class(kind)
    d = data if isinstance(data, dict) else orjson.loads(data)
    if cls is None:
        return UnknownEvent(ts=d.get("ts", 0), conn=d.get("conn", 0), original_kind=kind, data=d)
    for name in cls._bytes_fields:
        v = d.get(name)
        if v.__class__ is str:
            d[name] = v.encode("latin-1")
    getter = _getters.get(cls)
    if getter is None:
        names = [f.name for f in dataclasses.fields(cls)]
        getter = _getters[cls] = operator.itemgetter(*names) if len(names) > 1 else None
    try:
        # positional: a dataclass __init__ with thirty keyword arguments costs ~6 us,
        # the same call with positional ones ~1.7 us (measured on SQL statements)
        return cls(*getter(d))  # type: ignore[misc]
    except (KeyError, TypeError):  # a capture from another version: match by name
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@event("core.unknown")
class UnknownEvent(Event):
    """An event of a kind this build does not know (a capture from a newer sniff)."""

    original_kind: str
    data: dict[str, Any]


# --- connection ids ---------------------------------------------------------------------

# A random 31-bit prefix per process keeps ids unique when captures from several
# sniff processes are merged, while staying inside SQLite's signed 64-bit integer.
_PREFIX = random.SystemRandom().getrandbits(31) << 32
_counter = itertools.count(1)


def new_conn_id() -> int:
    return _PREFIX | next(_counter)
