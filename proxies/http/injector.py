"""The in-line half of ``decode = "capture"`` for HTTP/1.x: find request heads, add traceparent.

Strategy. With ``decode = "capture"`` the relay's event loop does only what
injection needs; the full decoder (:class:`~proxies.http.decoder.Http1Decoder`)
runs in the capture process over copies of the forwarded bytes
(:mod:`proxies.http.handler`). This class is the client-side framing of that
decoder and nothing else: it finds each request head (keep-alive, pipelining,
Content-Length and chunked bodies, which are counted and never buffered, and
the empty lines allowed between messages), holds a partial head until its blank
line has arrived, and inserts ``traceparent: 00-<trace>-<span>-01`` as the last
header line of a head that has none. It builds no event and keeps nothing per
request; the commonest case (a bodiless request repeating the previous head of
the connection byte for byte, as keep-alive clients do) costs one ``find``, one
comparison and the line's formatting.

What it forwards it ships (``ship(direction, data, meta)``, i.e.
:meth:`sniff.relay.ConnContext.ship`), in forwarding order, so the capture side
decodes exactly the bytes the upstream received. ``meta`` tells it what it
cannot derive from those bytes: the traceparent lines this side inserted (so
that the decoder gives the exchanges those ids and records the head without
them), when a head held here began to arrive, and why injection stopped (see
:class:`~proxies.http.handler.HttpRawDecoder` for the format).

Framing is shared with the decoder (the same head expression,
:func:`~proxies.http.decoder.request_framing`, the same chunked follower and
limits), so both sides agree on every request boundary, and on the same
malformed or ambiguous input both give up: here by relaying the rest of the
connection unchanged without injecting, there with a ``ProtocolError``.

Responses are not parsed at all, with one exception: the client's stream stops
being HTTP after a protocol switch (``Upgrade``, ``CONNECT``), and only the
server's answer says whether it did. After such a request the client's next
bytes are held and server chunks pass through :meth:`Http1Injector.feed_server`
until a final status line has arrived (1xx interim heads are skipped): a 101
(a 2xx to CONNECT) makes the connection a tunnel, anything else resumes HTTP on
the held bytes. Without response framing this side cannot tell which response
answers the switch when other requests may still be waiting for theirs, so it
follows a switch only when it is the first request of the connection (as
WebSocket, h2c and CONNECT clients send it); a switch asked later on a
connection still gets its traceparent, and then injection stops for the rest
of that connection (the capture side notes it and keeps decoding).
"""

from __future__ import annotations

import time
from binascii import hexlify
from collections.abc import Callable
from typing import Any

from proxies.http.decoder import (
    _BODY,
    _CHUNKED,
    _HEAD,
    _INTERESTING,
    _PASS,
    _REQ_HEAD,
    _TUNNEL,
    _UPGRADE_WAIT,
    MAX_HEAD,
    MAX_UPGRADE_HOLD,
    _Chunked,
    _ProtoErr,
    request_framing,
    response_status,
)
from proxies.http.rewrite import TRACEPARENT_KEY
from sniff import ids

Ship = Callable[[int, bytes, Any], None]

# the line ends the head: ``traceparent: 00-<32 hex>-<16 hex>-01`` CRLF, then the blank
# line's CRLF (the same bytes as the inline decoder's). 192 random bits hexlified with
# a "-" after the 16th byte are the trace and span ids at once (half the cost of two
# getrandbits and %x formatting); the lowest bit of each is set, as W3C forbids
# all-zero ids (127 and 63 random bits are plenty for uniqueness)
_LINE = b"traceparent: 00-%b-01\r\n\r\n"
_NONZERO = 1 | 1 << 64
_getrandbits = ids._getrandbits


def _new_line() -> bytes:
    return _LINE % hexlify((_getrandbits(192) | _NONZERO).to_bytes(24, "big"), b"-", -16)


class Http1Injector:
    """One connection's client-side framing and traceparent insertion.

    ``ship(direction, data, meta)`` receives every byte forwarded, in order;
    ``release(data)`` sends client bytes that a server event lets go (held during
    a protocol switch); ``watch(on)`` asks the glue to route server chunks
    through :meth:`feed_server` (only while a switch awaits its answer)."""

    __slots__ = (
        "_pos",
        "chunk",
        "clock",
        "connect",
        "hold",
        "hold_ts",
        "left",
        "max_head",
        "meta",
        "plain",
        "release",
        "sbuf",
        "seen",
        "ship",
        "state",
        "stopped",
        "tagger",
        "upgrade",
        "watch",
    )

    def __init__(
        self,
        ship: Ship,
        release: Callable[[bytes], None],
        watch: Callable[[bool], None],
        *,
        max_head: int = MAX_HEAD,
        clock: Callable[[], int] = time.time_ns,
        tagger: Callable[[bytes], bytes | None] | None = None,
    ) -> None:
        self.ship = ship
        # the repeated-head case in C (sniff._shipper.Shipper.tag_head): the same line
        # format and meta, shipped into the capture buffer; None when it declines
        self.tagger = tagger
        self.release = release
        self.watch = watch
        self.max_head = max_head
        self.clock = clock
        self.state = _HEAD
        self.hold = b""  # a partial head, or what the client sent while a switch was pending
        self.hold_ts = 0  # when the first byte of the held head arrived
        self.left = 0
        self.chunk: _Chunked | None = None
        self.plain: bytes | None = None  # the last plain head, with its final CRLF
        self.seen = False  # a request head went through already
        self.upgrade = False  # a protocol switch awaits its answer
        self.connect = False  # ... and it is a CONNECT
        self.sbuf = b""  # a partial response head while watching for that answer
        self.meta: list[Any] = []  # for the chunk being forwarded (see HttpRawDecoder)
        self.stopped: str | None = None  # why injection stopped on this connection
        self._pos = 0

    # --- client -> server ---------------------------------------------------------------

    def feed_client(self, data: bytes) -> bytes:
        """A client chunk: return the bytes to forward now (shipped already)."""
        st = self.state
        if st == _HEAD and not self.hold:
            if data == self.plain:
                # the commonest case: the chunk is one head, byte for byte the previous
                # plain head of this connection (keep-alive clients repeat themselves)
                if self.tagger is not None:
                    tagged = self.tagger(data)
                    if tagged is not None:
                        return tagged
                line = _LINE % hexlify(
                    (_getrandbits(192) | _NONZERO).to_bytes(24, "big"), b"-", -16
                )
                out = data[:-2] + line
                self.ship(0, out, line)
                return out
            # one whole request head, nothing else, in this chunk
            end = data.find(b"\r\n\r\n")
            if end > 0 and end + 4 == len(data) and data[0] != 13 and end <= self.max_head:
                try:
                    out = self._head(data, 0, end)
                except _ProtoErr as e:
                    self._stop(str(e))
                    out = data
                self._ship(out)
                return out
        elif st >= _TUNNEL:
            self.ship(0, data, None)
            return data
        if self.hold:
            buf = self.hold + data
            self.hold = b""
        else:
            buf = data
        parts: list[bytes] = []
        try:
            self._loop(buf, len(buf), parts)
        except _ProtoErr as e:
            # ``parts`` holds exactly buf[:self._pos] as forwarded; the rest goes unchanged
            self._stop(str(e))
            parts.append(buf[self._pos :])
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self._ship(out)
        if self.hold_ts == -1:
            # A head begun in this chunk is dated after the chunk is shipped, not before:
            # the capture side dates the heads completed in this chunk by its ship time,
            # and a pipelined request must not start before the one ahead of it.
            self.hold_ts = self.clock()
        return out

    def _loop(self, buf: bytes, n: int, out: list[bytes]) -> None:
        pos = 0
        while pos < n:
            self._pos = pos
            st = self.state
            if st == _HEAD:
                if buf[pos] == 13 and buf.startswith(b"\r\n", pos):  # empty line between messages
                    out.append(b"\r\n")
                    pos += 2
                    continue
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > self.max_head:
                        raise _ProtoErr(f"request head longer than {self.max_head} bytes")
                    if not self.hold_ts:
                        self.hold_ts = -1  # dated once this chunk is shipped (feed_client)
                    self.hold = buf[pos:] if pos else buf
                    break
                if end - pos > self.max_head:
                    raise _ProtoErr(f"request head longer than {self.max_head} bytes")
                if self.hold_ts > 0:  # this head was held: the decoder dates it from its first byte
                    self.meta.append(self.hold_ts)
                    self.hold_ts = 0
                out.append(self._head(buf, pos, end))
                pos = end + 4
            elif st == _BODY:
                left = self.left
                take = left if left < n - pos else n - pos
                out.append(buf if take == n else buf[pos : pos + take])
                pos += take
                self.left = left - take
                if not self.left:
                    self.state = _UPGRADE_WAIT if self.upgrade else _HEAD
            elif st == _CHUNKED:
                ch = self.chunk
                assert ch is not None
                start = pos
                pos = ch.feed(buf, pos, n)
                out.append(buf if start == 0 and pos == n else buf[start:pos])
                if ch.done:
                    self.chunk = None
                    self.state = _UPGRADE_WAIT if self.upgrade else _HEAD
            elif st == _UPGRADE_WAIT:
                rest = buf[pos:] if pos else buf
                if len(rest) > MAX_UPGRADE_HOLD:
                    raise _ProtoErr(
                        "client sent more than 64 KiB while a protocol switch was pending"
                    )
                self.hold = rest
                break
            else:  # tunnel or pass, switched while in this loop
                out.append(buf[pos:] if pos else buf)
                break

    def _head(self, buf: bytes, pos: int, end: int) -> bytes:
        """The head ``buf[pos:end+4]`` as it must be forwarded; sets the body state."""
        hend = end + 2
        head = buf[pos:hend]
        whole = buf[pos : end + 4]
        if whole == self.plain:
            line = _new_line()
            self.meta.append(line)
            return head + line
        m = _REQ_HEAD.fullmatch(buf, pos, hend)
        if m is None:
            raise _ProtoErr("malformed request head")
        mb, major, minor = m.group(1, 3, 4)
        if major != b"1" or (minor != b"1" and minor != b"0"):
            raise _ProtoErr(f"unsupported HTTP version {major!r}.{minor!r}")
        lh = head.lower()
        connect = mb == b"CONNECT"
        if _INTERESTING.search(lh) is None:  # no framing, upgrade or traceparent header
            if not connect:
                self.plain = whole
            length, chunked, upgrade = 0, False, "connect" if connect else None
            tagged = False
        else:
            length, chunked, upgrade = request_framing(lh, minor == b"1", connect)
            tagged = TRACEPARENT_KEY in lh
        if tagged:  # the client's own traceparent, valid or not, is never touched
            out = whole
        else:
            line = _new_line()
            self.meta.append(line)
            out = head + line
        if length:
            self.left = length
            self.state = _BODY
        elif chunked:
            self.chunk = _Chunked()
            self.state = _CHUNKED
        elif upgrade is not None:
            self.state = _UPGRADE_WAIT
        if upgrade is not None:
            if self.seen:
                # which response answers it? earlier ones may still be on their way and
                # this side does not frame responses: stop here rather than guess
                self.state = _PASS
                self._stop("a protocol switch asked after other requests on the connection")
            else:
                self.upgrade = True
                self.connect = connect
                self.watch(True)
        self.seen = True
        return out

    # --- server -> client (only while a protocol switch awaits its answer) --------------

    def feed_server(self, data: bytes) -> None:
        """A server chunk (forwarded already): ship it; look for the switch's answer."""
        self.ship(1, data, None)
        if not self.upgrade:
            return
        buf = self.sbuf + data if self.sbuf else data
        self.sbuf = b""
        n = len(buf)
        pos = 0
        try:
            while pos < n:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > self.max_head:
                        raise _ProtoErr(f"response head longer than {self.max_head} bytes")
                    self.sbuf = buf[pos:] if pos else buf
                    return
                status = response_status(buf, pos, end)
                if status < 200 and status != 101:  # interim (100 Continue, 103...)
                    pos = end + 4
                    continue
                self._answer(status)
                return
        except _ProtoErr as e:
            self._stop(f"(response) {e}")
            held, self.hold = self.hold, b""
            if held:
                self.release(held)
                self._ship(held)

    def _answer(self, status: int) -> None:
        self.upgrade = False
        self.watch(False)
        if status == 101 if not self.connect else 200 <= status < 300:
            self.state = _TUNNEL
            held, self.hold = self.hold, b""
            if held:
                self.release(held)
                self.ship(0, held, None)
        elif self.state == _UPGRADE_WAIT:  # declined: what the client sent meanwhile is HTTP
            self.state = _HEAD
            held, self.hold = self.hold, b""
            if held:
                out = self.feed_client(held)
                if out:
                    self.release(out)

    # --- endings and failures -----------------------------------------------------------

    def flush_client(self) -> bytes:
        """Client EOF or relay failure: whatever is held goes out unchanged."""
        held, self.hold = self.hold, b""
        self.hold_ts = 0
        if held:
            self._ship(held)
        return held

    def _stop(self, reason: str) -> None:
        """Relay the rest of the connection unchanged, without injecting."""
        self.state = _PASS
        self.stopped = reason
        self.meta.append(reason)
        self.sbuf = b""
        if self.upgrade:
            self.upgrade = False
            self.watch(False)

    def _ship(self, out: bytes) -> None:
        meta = self.meta
        if not meta:
            self.ship(0, out, None)
            return
        self.meta = []
        if len(meta) == 1 and meta[0].__class__ is bytes:
            self.ship(0, out, meta[0])
        else:
            self.ship(0, out, tuple(meta))
