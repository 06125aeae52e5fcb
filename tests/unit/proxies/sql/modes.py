"""Run the same traffic through a SQL proxy in ``decode = "inline"`` and ``"capture"`` mode.

The real relay code (:class:`sniff.relay.RelayConnection`, the handler that the
protocol's ``create_listener`` chooses) runs over fake transports, so rewrite and
observe modes, held bytes and flushes behave as in production. In capture mode the
sink ships (``emit_raw``; the shipped values go through pickle as they do on the
pipe) and a :class:`sniff.decode_host.DecoderHost` turns the batch into events, as
the capture process does. One fake clock drives everything: it moves only between
chunks, so in-line decoding (clocked when the chunk is handled) and capture
decoding (clocked by the chunk's ship timestamp) see the same times; span and trace
ids come from counters, restarted for each mode.

A script is a list of steps: ``("open", conn)``, ``(conn, direction, bytes)``
(0 client -> server, 1 server -> client) and ``("close", conn)``.
"""

from __future__ import annotations

import itertools
import pickle
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

import sniff.relay
from proxies.mysql.decoder import MysqlDecoder
from proxies.postgres.decoder import PostgresDecoder
from sniff import registry
from sniff.config import Address, ProxyConfig
from sniff.decode_host import DecoderHost
from sniff.events import ConnOpen, Event, RawChunk, dumps

Step = tuple[Any, ...]
CLIENT = ("10.1.2.3", 40_000)
SERVER = ("10.9.8.7", 3306)


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        return self.t


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False
        self.eof = False

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    @property
    def data(self) -> bytes:
        return b"".join(self.out)


class ListSink:
    """An in-line sink: events only."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, ev: Event) -> None:
        self.events.append(ev)


class ShipSink(ListSink):
    """A sink that ships bytes (as the capture sinks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.shipped: list[RawChunk] = []

    def emit_raw(self, conn: int, direction: int, ts: int, data: bytes, meta: Any = None) -> bool:
        values = pickle.loads(pickle.dumps((ts, conn, direction, bytes(data), meta)))
        ev = RawChunk(*values)
        self.events.append(ev)
        self.shipped.append(ev)
        return True


@dataclass
class Outcome:
    mode: str
    events: list[Event]
    to_server: dict[int, bytes] = field(default_factory=dict)
    to_client: dict[int, bytes] = field(default_factory=dict)
    shipped: list[RawChunk] = field(default_factory=list)
    handlers: dict[int, Any] = field(default_factory=dict)

    def dumped(self) -> list[bytes]:
        return [dumps(e) for e in self.events]

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.kind == kind]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def shipped_stream(self, conn: int, direction: int, answered: bool = False) -> bytes:
        """What was shipped for ``conn`` in ``direction``, in order; ``answered``: only the
        chunks marked as answered by the proxy itself (else only the others)."""
        return b"".join(
            r.data
            for r in self.shipped
            if r.conn == conn and r.direction == direction and _answered(r) == answered
        )


def _answered(r: RawChunk) -> bool:
    return isinstance(r.meta, tuple) and r.meta[:1] == ("answered",)


def proxy(protocol: str, **options: Any) -> ProxyConfig:
    """A ProxyConfig with the protocol's option defaults (as config loading fills them)."""
    mod = registry.module(protocol)
    opts = {k: o.default for k, o in getattr(mod, "OPTIONS", {}).items()}
    opts["decode"] = "capture"
    inject = bool(options.pop("inject", True))
    opts.update(options)
    port = 3306 if protocol == "mysql" else 5432
    return ProxyConfig(
        "db", protocol, Address("127.0.0.1", 13306), Address("127.0.0.1", port), inject, 5.0, opts
    )


def run(
    cfg: ProxyConfig, mode: str, script: list[Step], monkeypatch: pytest.MonkeyPatch
) -> Outcome:
    """Play ``script`` through the proxy ``cfg`` in ``mode`` ("inline" or "capture")."""
    clock = Clock()
    counter = itertools.count(1)

    def span() -> str:
        return f"{next(counter):016x}"

    def trace() -> str:
        return f"{next(counter):032x}"

    with monkeypatch.context() as m:
        m.setattr(sniff.relay, "time", types.SimpleNamespace(time_ns=clock, monotonic=lambda: 0.0))
        for cls in (MysqlDecoder, PostgresDecoder):
            kw = cls.__init__.__kwdefaults__
            m.setitem(kw, "clock", clock)
            m.setitem(kw, "new_span_id", span)
            m.setitem(kw, "new_trace_id", trace)
        import proxies.postgres.handler as pg_handler

        m.setattr(pg_handler, "time", types.SimpleNamespace(time_ns=clock))
        cfg = ProxyConfig(
            cfg.name, cfg.protocol, cfg.listen, cfg.upstream, cfg.inject, cfg.connect_timeout,
            {**cfg.options, "decode": mode},
        )  # fmt: skip
        sink: ListSink = ShipSink() if mode == "capture" else ListSink()
        lst = registry.module(cfg.protocol).create_listener(cfg, sink)
        conns: dict[int, sniff.relay.RelayConnection] = {}
        out = Outcome(mode, [])
        for step in script:
            clock.t += 1_000
            if step[0] == "open":
                conn = step[1]
                rc = sniff.relay.RelayConnection(lst)  # type: ignore[arg-type]
                rc.c_t, rc.s_t = FakeTransport(), FakeTransport()  # type: ignore[assignment]
                ctx = sniff.relay.ConnContext(
                    rc, conn, cfg, CLIENT, SERVER, ("127.0.0.1", 13306), sink
                )
                rc.ctx = ctx
                sink.emit(
                    ConnOpen(clock(), conn, cfg.name, cfg.protocol, *CLIENT, *SERVER,
                             "127.0.0.1", 13306, 50_000, "127.0.0.1")
                )  # fmt: skip
                rc.handler = lst.handler_factory(ctx)
                out.handlers[conn] = rc.handler
                conns[conn] = rc
            elif step[0] == "close":
                rc = conns[step[1]]
                rc.close("client closed", by="client")
            else:
                conn, direction, data = step
                rc = conns[conn]
                if direction == 0:
                    rc.from_client(data)
                else:
                    rc.from_server(data)
        for conn, rc in conns.items():
            if not rc.closed:
                clock.t += 1_000
                rc.close("client closed", by="client")
            out.to_server[conn] = rc.s_t.data  # type: ignore[union-attr]
            out.to_client[conn] = rc.c_t.data  # type: ignore[union-attr]
        events = sink.events
        if isinstance(sink, ShipSink):
            out.shipped = sink.shipped
            host = DecoderHost([cfg])
            events = host.expand(events)
            assert not host.failed, "a capture-side decoder raised"
        out.events = events
        # what prepare() does off the hot path (in the capture store), in both modes alike
        for e in out.events:
            if getattr(e, "needs_prepare", False):
                e.prepare()  # type: ignore[attr-defined]
    return out


def both(
    cfg: ProxyConfig, script: list[Step], monkeypatch: pytest.MonkeyPatch
) -> tuple[Outcome, Outcome]:
    """The script in both modes: (inline, capture)."""
    inline = run(cfg, "inline", script, monkeypatch)
    capture = run(cfg, "capture", script, monkeypatch)
    return inline, capture


def one_conn(chunks: list[tuple[int, bytes]], conn: int = 11) -> list[Step]:
    return [("open", conn), *((conn, d, b) for d, b in chunks), ("close", conn)]


def assert_same(inline: Outcome, capture: Outcome) -> None:
    """Same events, same bytes on both wires, and capture shipped exactly what it forwarded
    (up to where its handler stopped observing, when nothing after is decoded)."""
    assert capture.dumped() == inline.dumped()
    assert capture.to_server == inline.to_server
    assert capture.to_client == inline.to_client
    for conn in capture.to_server:
        full = capture.handlers[conn].observe
        answered = capture.shipped_stream(conn, 0, answered=True)
        # the proxy's own answers ('N' to SSL/GSSENC requests) are the only extra bytes
        answers = b"N" * (len(answered) // 8)
        c2s = capture.shipped_stream(conn, 0)
        s2c = answers + capture.shipped_stream(conn, 1)
        if full:
            assert c2s == capture.to_server[conn]
            assert s2c == capture.to_client[conn]
        else:
            assert capture.to_server[conn].startswith(c2s)
            assert capture.to_client[conn].startswith(s2c)
