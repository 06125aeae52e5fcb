"""Decoding in the capture process: the proxies forward bytes, this decodes copies.

With ``decode = "capture"`` (the default where a protocol supports it) a proxy's
event loop does only what must happen in-line: relaying, and the deliberate
rewrites (an AMQP publish's traceparent, MySQL's greeting capability bits, the
answer to a PostgreSQL SSLRequest, an HTTP request's traceparent). It ships a
copy of every chunk it forwarded (:class:`sniff.events.RawChunk`, stamped with
the time it was read) to the capture process, where this host keeps one
protocol decoder per connection and feeds it those chunks in order, with the
decoder's clock set to each chunk's timestamp. The decoders are the same sans-IO
classes the in-line mode uses, so the events are the same; only where the CPU is
spent changes (a lower-priority process, never the relay's event loop).

A protocol opts in by providing ``make_decoder(cfg, conn, emit, emit_fields,
clock)`` in its package, returning an object with ``feed(direction, data,
meta)`` and ``closed(reason)`` (and optionally ``tick(now)``, called about once
a second). A decoder that raises is dropped with a
``ProtocolError`` event; a :class:`RawGap` (bytes lost to a full capture queue)
stops that connection's decoding with a Note.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from sniff import registry
from sniff.config import ProxyConfig
from sniff.events import ConnOpen, Event, Note, ProtocolError, RawChunk, RawGap

log = logging.getLogger("sniff.decode")


class RawDecoder(Protocol):
    def feed(self, direction: int, data: bytes, meta: Any) -> None: ...
    def closed(self, reason: str) -> None: ...


DecoderFactory = Callable[..., RawDecoder]


class DecoderHost:
    def __init__(self, proxies: list[ProxyConfig]) -> None:
        self._factories: dict[str, tuple[ProxyConfig, DecoderFactory]] = {}
        for cfg in proxies:
            if cfg.options.get("decode", "capture") != "capture":
                continue
            try:
                factory = getattr(registry.module(cfg.protocol), "make_decoder", None)
            except ImportError:
                factory = None
            if factory is not None:
                self._factories[cfg.name] = (cfg, factory)
        self.decoders: dict[int, RawDecoder] = {}
        self._out: list[Event] = []
        self.now = 0
        self.failed = 0

    def _emit(self, ev: Event) -> None:
        self._out.append(ev)

    def _emit_fields(self, cls: type[Event], values: tuple[Any, ...]) -> None:
        self._out.append(cls(*values))

    def _clock(self) -> int:
        return self.now

    def expand(self, batch: list[Event]) -> list[Event]:
        """Replace raw chunks by the events their decoders emit, in order."""
        if not self._factories:
            return [ev for ev in batch if ev.kind != "core.raw"] if batch else batch
        out = self._out = []
        for ev in batch:
            kind = ev.kind
            if kind == "core.raw":
                self._raw(ev)  # type: ignore[arg-type]
            elif kind == "core.conn_open":
                out.append(ev)
                self._open(ev)  # type: ignore[arg-type]
            elif kind == "core.conn_close":
                d = self.decoders.pop(ev.conn, None)
                if d is not None:
                    self.now = ev.ts
                    self._safe(ev.conn, lambda d=d, r=ev.reason: d.closed(r))  # type: ignore[attr-defined,misc]
                out.append(ev)
            elif kind == "core.raw_gap":
                d = self.decoders.pop(ev.conn, None)
                if d is not None:
                    self.now = ev.ts
                    self._safe(ev.conn, lambda d=d: d.closed("capture gap"))  # type: ignore[misc]
                gap: RawGap = ev  # type: ignore[assignment]
                out.append(
                    Note(
                        ev.ts,
                        ev.conn,
                        "capture.gap",
                        f"the capture queue was full: {gap.lost_bytes} bytes of this connection were "
                        "not decoded, and its traffic is no longer decoded",
                    )
                )
            else:
                out.append(ev)
        self._out = []
        return out

    def tick(self, now: int) -> list[Event]:
        """Periodic call (about once a second, wall clock): decoders that have a
        ``tick(now)`` method (e.g. to announce requests still in flight) run it."""
        out = self._out = []
        for conn, d in list(self.decoders.items()):
            tick = getattr(d, "tick", None)
            if tick is not None:
                self.now = now
                self._safe(conn, lambda tick=tick: tick(now))  # type: ignore[misc]
        self._out = []
        return out

    def _open(self, ev: ConnOpen) -> None:
        entry = self._factories.get(ev.proxy)
        if entry is None:
            return
        cfg, factory = entry
        try:
            self.decoders[ev.conn] = factory(
                cfg, ev.conn, self._emit, self._emit_fields, self._clock
            )
        except Exception:
            log.exception("cannot start a %s decoder for connection %s", cfg.protocol, ev.conn)

    def _raw(self, ev: RawChunk) -> None:
        d = self.decoders.get(ev.conn)
        if d is None:
            return
        self.now = ev.ts
        self._safe(ev.conn, lambda: d.feed(ev.direction, ev.data, ev.meta))

    def _safe(self, conn: int, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # a decoder bug: record it, stop decoding this connection
            self.failed += 1
            self.decoders.pop(conn, None)
            log.exception("decoder for connection %s failed; its decoding stops", conn)
            self._out.append(
                ProtocolError(self.now, conn, "?", "?", 0, f"internal decoder error: {e}", "")
            )


def proxies_from_settings(items: list[dict[str, Any]]) -> list[ProxyConfig]:
    """ProxyConfig objects from the plain dicts the runtime sends the capture process."""
    from sniff.config import Address

    out = []
    for d in items:
        out.append(
            ProxyConfig(
                d["name"], d["protocol"], Address(*d["listen"]), Address(*d["upstream"]),
                d["inject"], d["connect_timeout"], dict(d["options"]),
            )
        )  # fmt: skip
    return out


def proxies_to_settings(proxies: list[ProxyConfig]) -> list[dict[str, Any]]:
    return [
        {
            "name": p.name, "protocol": p.protocol, "listen": [p.listen.host, p.listen.port],
            "upstream": [p.upstream.host, p.upstream.port], "inject": p.inject,
            "connect_timeout": p.connect_timeout, "options": p.options,
        }
        for p in proxies
    ]  # fmt: skip
