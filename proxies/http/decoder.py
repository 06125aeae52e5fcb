"""Sans-IO HTTP/1.x decoder for one relayed connection: the fast path.

Strategy. Bytes go in (``feed_client`` / ``feed_server``), events come out
through ``emit``; no sockets. The client direction is *rewritten*:
``feed_client`` returns the bytes to forward, which are the input except that

- a request head is held back until its blank line has arrived (at most
  ``max_head`` bytes), so that a ``traceparent`` line can be added to a head
  that has none (:mod:`proxies.http.rewrite`);
- after a request that asks to switch protocols (``Upgrade``, ``CONNECT``) the
  client's next bytes are held until the server has answered: a 101 (or a 2xx to
  CONNECT) turns the connection into a tunnel and they go out untouched; any
  other answer resumes HTTP parsing on them.

Bodies are never buffered: Content-Length bodies are counted down and chunked
bodies are followed chunk by chunk (only a partial chunk-size line is kept, as
a copy), and every body byte is forwarded as soon as it arrives. The server
direction is only observed. Requests wait in a FIFO for their responses
(keep-alive and pipelining); 1xx responses are interim (100-continue, 103), HEAD
and 204/304 responses have no body, and a response with neither length nor
chunking runs until the server closes.

Parsing is deliberately cheap: one ``bytes.find`` for the end of a head, one
compiled regular expression that validates a whole request head (request
line, then ``token ":" value CRLF`` lines with no bare CR, LF or NUL; a
response, only observed, has its status line checked), and substring searches
on a lowercased copy for the few headers that decide framing (Content-Length,
Transfer-Encoding), propagation (traceparent) and protocol switches (Upgrade,
Connection). The commonest cases (a bodiless request that gets a traceparent;
a whole Content-Length response in one chunk) are inlined. Everything else
about a head is worked out later, off the event loop, in ``prepare()``.

Finished exchanges are kept per connection and emitted in batches
(:class:`~proxies.http.events.HttpExchanges`: when ``batch_max`` are ready, when
the listener's sweep calls :meth:`Http1Decoder.flush_events` twice a second, and
when the connection ends), so that the capture costs one row per batch.

With ``decode = "capture"`` this decoder runs in the capture process, over
copies of what the relay forwarded (:mod:`proxies.http.handler`), and is built
with ``told=True``: the relay (:mod:`proxies.http.injector`, which frames the
client stream with the same code: :func:`request_framing`, ``_REQ_HEAD``,
``_Chunked``) has already decided every injection, so the decoder is fed the
client's own bytes (the relay's lines taken out) and *told* where the relay
inserted which line; its exchanges carry those ids. It draws no id for an
injection and never injects where the relay did not.

Anything that does not parse, or framing that two parsers could disagree on (a
request with both Transfer-Encoding and Content-Length, several different
Content-Lengths, a Transfer-Encoding whose last coding is not chunked, an
oversized head), emits one ``ProtocolError`` and turns the whole connection
into passthrough: held bytes are released unchanged and nothing is decoded or
injected again. So the only edit ever made is a ``traceparent`` line in a head
both sides frame the same way.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from proxies.http.events import HttpExchange, HttpExchanges, HttpRequest, wire
from proxies.http.rewrite import TRACEPARENT_KEY, header_value, header_values, traceparent_line
from sniff import ids
from sniff.events import ConnIdentity, Event, Note, ProtocolError

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELDS = rb"(?:" + _TOKEN + rb":[^\r\n\x00]*\r\n)*"
_REQ_HEAD = re.compile(
    rb"(" + _TOKEN + rb") ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])\r\n" + _FIELDS
)
# responses are only observed: the status line is checked, header lines are not
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n\x00]*)?\r\n")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 64 * 1024
MAX_UPGRADE_HOLD = 64 * 1024
BATCH_MAX = 64  # finished exchanges per HttpExchanges event
# requests in flight for longer are announced (HttpRequest): well inside the correlator's 2 s lag
ANNOUNCE_AFTER_NS = 1_000_000_000
MAX_PENDING = 10_000  # pipelined requests awaiting responses, per connection

# connection states (per direction)
_HEAD = 0  # waiting for / reading a message head
_BODY = 1  # fixed-length body: ``left`` bytes to go
_CHUNKED = 2  # chunked body
_UNTIL_CLOSE = 3  # response body delimited by the server closing (server side only)
_UPGRADE_WAIT = 4  # client side: a protocol switch was asked; hold bytes until the answer
_TUNNEL = 5  # switched protocols: bytes are counted, not parsed
_PASS = 6  # gave up decoding: plain passthrough

_METHODS = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT")
}
_INTERESTING = re.compile(rb"\r\n(?:transfer-encoding|content-length|upgrade|traceparent):")
_TP_LINE = b"traceparent: 00-%032x-%016x-01\r\n\r\n"
_getrandbits = ids._getrandbits


class _ProtoErr(Exception):
    pass


class _Chunked:
    """Follows chunked framing on a stream without holding body bytes."""

    __slots__ = ("done", "left", "line", "size", "state", "trailer")

    def __init__(self) -> None:
        self.state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailer lines
        self.left = 0
        self.line = b""
        self.size = 0
        self.trailer = 0
        self.done = False

    def feed(self, buf: bytes, pos: int, n: int) -> int:
        """Consume from ``buf[pos:n]``; return the new position (``done`` at the end)."""
        while pos < n:
            st = self.state
            if st == 1:
                take = self.left if self.left < n - pos else n - pos
                pos += take
                self.left -= take
                self.size += take
                if not self.left:
                    self.state = 2
                    self.left = 2
            elif st == 2:
                want = b"\r\n"[2 - self.left :]
                got = buf[pos : pos + min(self.left, n - pos)]
                if not want.startswith(got):
                    raise _ProtoErr("chunk data not followed by CRLF")
                pos += len(got)
                self.left -= len(got)
                if not self.left:
                    self.state = 0
            else:
                i = buf.find(b"\n", pos, n)
                if i < 0:
                    self.line += buf[pos:n]
                    if len(self.line) > MAX_CHUNK_LINE:
                        raise _ProtoErr("chunk-size or trailer line too long")
                    return n
                line = self.line + buf[pos : i + 1] if self.line else buf[pos : i + 1]
                self.line = b""
                pos = i + 1
                if len(line) < 2 or line[-2] != 13:
                    raise _ProtoErr("bare LF in chunked framing")
                if st == 0:
                    size = line[:-2].split(b";", 1)[0].strip(b" \t")
                    if _HEX.fullmatch(size) is None:
                        raise _ProtoErr(f"bad chunk size {line[:40]!r}")
                    v = int(size, 16)
                    if v:
                        self.state = 1
                        self.left = v
                    else:
                        self.state = 3
                else:
                    if len(line) == 2:
                        self.done = True
                        return pos
                    self.trailer += len(line)
                    if self.trailer > MAX_TRAILERS:
                        raise _ProtoErr("trailer section too large")
        return pos


def product_of(user_agent: str) -> str:
    """``nova-compute/27.1 keystoneauth1/5.1 ...`` -> ``nova-compute``."""
    first = user_agent.strip().split(None, 1)[0] if user_agent.strip() else ""
    return first.split("/", 1)[0]


class Http1Decoder:
    """One connection's HTTP/1 state, both directions.

    ``release`` sends held client bytes to the server when they are released by
    a server event (the answer to a protocol-switch request, or a failure);
    with ``rewrite=False`` (injection off) the relay has already forwarded every
    chunk and held bytes are only parsed.
    """

    def __init__(
        self,
        conn_id: int,
        emit: Callable[[Event], None],
        *,
        proxy: str = "http",
        scheme: str = "http",
        inject: bool = True,
        rewrite: bool = True,
        release: Callable[[bytes], None] | None = None,
        user_agents: dict[str, str] | None = None,
        max_head: int = MAX_HEAD,
        clock: Callable[[], int] = time.time_ns,
        new_trace_id: Callable[[], str] = ids.new_trace_id,
        new_span_id: Callable[[], str] = ids.new_span_id,
        batch_max: int = BATCH_MAX,
        policy: dict[str, Any] | None = None,
        told: bool = False,
    ) -> None:
        self.conn = conn_id
        self.emit = emit
        self.proxy = proxy
        self.scheme = scheme
        self.inject = inject
        self.rewrite = rewrite
        self.release = release
        self.user_agents = {k.lower(): v for k, v in (user_agents or {}).items()}
        self.max_head = max_head
        self.clock = clock
        self.new_trace_id = new_trace_id
        self.new_span_id = new_span_id
        self._fast_ids = new_trace_id is ids.new_trace_id and new_span_id is ids.new_span_id
        self._fast_inject = self._fast_ids and inject
        self._plain_head = b"\x00"  # never a head: see _request
        self._plain_verdict = ("", "")
        self._plain_resp = b"\x00"  # likewise for responses: see feed_server
        self._plain_resp_verdict = (0, 0)
        # client side
        self.cstate = _HEAD
        self.chold = b""  # bytes not forwarded yet (a partial head; held during an upgrade)
        self.chold_ts = 0  # when the first byte of the held head arrived
        self.cleft = 0
        self.cchunk: _Chunked | None = None
        self.creq: HttpExchange | None = None  # request whose body is being read
        self.c_total = 0
        # server side
        self.sstate = _HEAD
        self.sbuf = b""  # partial response head (a copy)
        self.sleft = 0
        self.schunk: _Chunked | None = None
        self.sresp: HttpExchange | None = None  # exchange whose response body is being read
        self.s_total = 0
        self.pending: deque[HttpExchange] = deque()  # requests awaiting a final response
        self.tunnel: HttpExchange | None = None
        self.identity_sent = False
        self.batch: list[tuple[Any, ...]] = []
        self.batch_max = batch_max
        self.policy = policy  # the proxy's Policy.spec(), carried by the events
        self._pos = 0
        # decode = "capture" (the capture process's side, see proxies.http.handler): the
        # relay injected, this decoder is *told* where and with which line, as
        # (stream offset of the insertion point, line), and never draws ids itself
        self.told: deque[tuple[int, bytes]] | None = deque() if told else None
        self.told_missed = 0  # lines told that no head here matched (see _told_line)

    # --- client -> server ---------------------------------------------------------------

    def feed_client(self, data: bytes) -> bytes:
        """Decode a client chunk; return the bytes to forward now."""
        self.c_total += len(data)
        st = self.cstate
        if st == _HEAD and not self.chold:
            # the common case: one whole request head, nothing else, in this chunk
            end = data.find(b"\r\n\r\n")
            if end > 0 and end + 4 == len(data) and data[0] != 13 and end <= self.max_head:
                ts = self.chold_ts
                if ts:
                    self.chold_ts = 0
                try:
                    return self._request(data, 0, end, ts)
                except _ProtoErr as e:
                    self._fail("c2s", str(e))
                    return data
        elif st >= _TUNNEL:
            if st == _TUNNEL and self.tunnel is not None:
                self.tunnel.tunnel_c2s += len(data)
            return data
        if self.chold:
            buf = self.chold + data
            self.chold = b""
        else:
            buf = data
        out: list[bytes] = []
        try:
            self._client_loop(buf, len(buf), out)
        except _ProtoErr as e:
            # ``out`` holds exactly buf[:self._pos] as decided (heads and bodies before
            # the failure); that stands, and the rest goes out unchanged
            self._fail("c2s", str(e))
            out.append(buf[self._pos :])
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def _client_loop(self, buf: bytes, n: int, out: list[bytes]) -> None:
        pos = 0
        while pos < n:
            self._pos = pos
            st = self.cstate
            if st == _HEAD:
                if buf[pos] == 13 and buf.startswith(b"\r\n", pos):  # empty line between messages
                    out.append(b"\r\n")
                    pos += 2
                    continue
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > self.max_head:
                        raise _ProtoErr(f"request head longer than {self.max_head} bytes")
                    if not self.chold_ts:
                        self.chold_ts = self.clock()
                    self.chold = buf[pos:] if pos else buf
                    break
                if end - pos > self.max_head:
                    raise _ProtoErr(f"request head longer than {self.max_head} bytes")
                out.append(self._request(buf, pos, end, self.chold_ts))
                self.chold_ts = 0
                pos = end + 4
            elif st == _BODY:
                creq = self.creq
                assert creq is not None
                take = self.cleft if self.cleft < n - pos else n - pos
                out.append(buf if take == n else buf[pos : pos + take])
                pos += take
                self.cleft -= take
                creq.req_body_size += take
                if not self.cleft:
                    self._request_done(creq)
            elif st == _CHUNKED:
                ch = self.cchunk
                creq = self.creq
                assert ch is not None and creq is not None
                start = pos
                pos = ch.feed(buf, pos, n)
                out.append(buf if start == 0 and pos == n else buf[start:pos])
                creq.req_body_size = ch.size
                if ch.done:
                    self.cchunk = None
                    self._request_done(creq)
            elif st == _UPGRADE_WAIT:
                rest = buf[pos:] if pos else buf
                if len(rest) > MAX_UPGRADE_HOLD:
                    raise _ProtoErr(
                        "client sent more than 64 KiB while a protocol switch was pending"
                    )
                self.chold = rest
                break
            else:  # tunnel or pass, switched while in this loop
                rest = buf[pos:] if pos else buf
                if st == _TUNNEL and self.tunnel is not None:
                    self.tunnel.tunnel_c2s += len(rest)
                out.append(rest)
                break

    def _request(self, buf: bytes, pos: int, end: int, ts: int) -> bytes:
        """Parse the head ``buf[pos:end+4]``; return it as it must be forwarded."""
        hend = end + 2
        head = buf[pos:hend]
        if head == self._plain_head and len(self.pending) < MAX_PENDING:
            # byte for byte the previous request of this connection, which took the
            # inlined path below (keep-alive clients repeat themselves): same verdict
            method, version = self._plain_verdict
            if not ts:
                ts = self.clock()
        else:
            m = _REQ_HEAD.fullmatch(buf, pos, hend)
            if m is None:
                raise _ProtoErr("malformed request head")
            mb, major, minor = m.group(1, 3, 4)
            if major != b"1" or (minor != b"1" and minor != b"0"):
                raise _ProtoErr(f"unsupported HTTP version {major!r}.{minor!r}")
            version = "1.1" if minor == b"1" else "1.0"
            lh = head.lower()
            if not ts:
                ts = self.clock()
            method = _METHODS.get(mb) or mb.decode("ascii")
            if _INTERESTING.search(lh) is not None:  # framing, upgrade or traceparent header
                length, chunked, upgrade = request_framing(
                    lh, version == "1.1", method == "CONNECT"
                )
                if TRACEPARENT_KEY not in lh and self.inject:
                    return self._inject(
                        buf, pos, end, head, lh, ts, version, method, upgrade, length, chunked
                    )
                ex = self._propagation(buf, pos, end, head, lh, ts, version, method, upgrade)
                return self._accept(ex, head, lh, ts, buf[pos : end + 4], length, chunked)
            if not (
                self._fast_inject
                and self.identity_sent
                and method != "CONNECT"
                and len(self.pending) < MAX_PENDING
            ):
                upgrade = "connect" if method == "CONNECT" else None
                if self.inject:
                    return self._inject(buf, pos, end, head, lh, ts, version, method, upgrade)
                ex = self._propagation(buf, pos, end, head, lh, ts, version, method, upgrade)
                return self._accept(ex, head, lh, ts, buf[pos : end + 4], 0, False)
            self._plain_head = head
            self._plain_verdict = (method, version)
        # the common request, inlined: a bodiless head without a traceparent gets ours
        # (on the capture side, the one the relay added)
        if self.told is None:
            line = _TP_LINE % (_getrandbits(128) or 1, _getrandbits(64) or 1)
        else:
            told = self._told_line(buf, hend)
            if told is None:
                return self._untold(buf, pos, end, head, ts, version, method)
            line = told
        tp = line[13:68].decode("ascii")
        self.pending.append(
            HttpExchange(
                ts,
                self.conn,
                self.proxy,
                self.scheme,
                version,
                method,
                0,
                tp[3:35],
                tp[36:52],
                None,
                tp,
                True,
                req_head=buf[pos:end],
            )
        )
        return head + line

    def _inject(
        self,
        buf: bytes,
        pos: int,
        end: int,
        head: bytes,
        lh: bytes,
        ts: int,
        version: str,
        method: str,
        upgrade: str | None,
        length: int = 0,
        chunked: bool = False,
    ) -> bytes:
        if self.told is not None:
            told = self._told_line(buf, end + 2)
            if told is None:
                return self._untold(
                    buf, pos, end, head, ts, version, method, upgrade, length, chunked
                )
            line = told
            tp = line[13:68].decode("ascii")
            trace_id = tp[3:35]
            span_id = tp[36:52]
        elif self._fast_ids:
            line = _TP_LINE % (_getrandbits(128) or 1, _getrandbits(64) or 1)
            tp = line[13:68].decode("ascii")
            trace_id = tp[3:35]
            span_id = tp[36:52]
        else:
            trace_id = self.new_trace_id()
            span_id = self.new_span_id()
            tp = f"00-{trace_id}-{span_id}-01"
            line = traceparent_line(tp) + b"\r\n"
        ex = HttpExchange(
            ts, self.conn, self.proxy, self.scheme, version, method, 0, trace_id,
            span_id, None, tp, True, upgrade=upgrade, req_head=buf[pos:end],
        )  # fmt: skip
        return self._accept(ex, head, lh, ts, head + line, length, chunked)

    def _told_line(self, buf: bytes, hend: int) -> bytes | None:
        """Capture side: the line the relay inserted at ``buf[hend]`` (the end of a
        head's last header line), or None when it inserted none there."""
        told = self.told
        assert told is not None
        at = self.c_total - len(buf) + hend  # buf ends at stream offset c_total
        while told:
            off = told[0][0]
            if off == at:
                return told.popleft()[1]
            if off > at:
                return None
            # a line at a place where this decoder met no head: the relay and this
            # decoder framed the client stream differently (never seen; counted)
            told.popleft()
            self.told_missed += 1
        return None

    def _untold(
        self,
        buf: bytes,
        pos: int,
        end: int,
        head: bytes,
        ts: int,
        version: str,
        method: str,
        upgrade: str | None = None,
        length: int = 0,
        chunked: bool = False,
    ) -> bytes:
        """Capture side: a head the relay forwarded without adding a traceparent,
        although it has none (the relay had stopped parsing this connection)."""
        lh = head.lower()
        ex = self._propagation(buf, pos, end, head, lh, ts, version, method, upgrade)
        ex.inject_note = "not injected: the relay was no longer parsing this connection"
        return self._accept(ex, head, lh, ts, buf[pos : end + 4], length, chunked)

    def _accept(
        self,
        ex: HttpExchange,
        head: bytes,
        lh: bytes,
        ts: int,
        out: bytes,
        length: int,
        chunked: bool,
    ) -> bytes:
        """A parsed request: queue it for its response and set the body state."""
        if not self.identity_sent:
            self._identity(head, lh, ts)
        if len(self.pending) >= MAX_PENDING:
            raise _ProtoErr(f"more than {MAX_PENDING} requests pipelined without a response")
        self.pending.append(ex)
        if length:
            self.creq = ex
            self.cleft = length
            self.cstate = _BODY
        elif chunked:
            self.creq = ex
            self.cchunk = _Chunked()
            self.cstate = _CHUNKED
        elif ex.upgrade is not None:
            self.cstate = _UPGRADE_WAIT
        return out

    def _propagation(
        self,
        buf: bytes,
        pos: int,
        end: int,
        head: bytes,
        lh: bytes,
        ts: int,
        version: str,
        method: str,
        upgrade: str | None,
    ) -> HttpExchange:
        """The exchange of a head sniff does not edit: one that carries its own
        traceparent (valid or not), or any head when injection is off."""
        parent = None
        note = None
        tp: str | None = None
        if TRACEPARENT_KEY in lh:
            vals = header_values(lh, b"traceparent")
            parsed = ids.parse_traceparent(vals[0]) if len(vals) == 1 else None
            if parsed is not None:
                trace_id, parent = parsed[0], parsed[1]
                tp = header_value(head, lh, b"traceparent").decode("ascii")  # type: ignore[union-attr]
            else:
                trace_id = self.new_trace_id()
                note = (
                    "several traceparent headers; left unchanged"
                    if len(vals) > 1
                    else "invalid traceparent; left unchanged"
                )
                tp = vals[0].decode("latin-1")
        else:
            trace_id = self.new_trace_id()
        return HttpExchange(
            ts, self.conn, self.proxy, self.scheme, version, method, 0, trace_id,
            self.new_span_id(), parent, tp, False, inject_note=note, upgrade=upgrade,
            req_head=buf[pos:end],
        )  # fmt: skip

    def _request_done(self, ex: HttpExchange) -> None:
        self.creq = None
        if ex.upgrade is not None and ex.status is None:
            self.cstate = _UPGRADE_WAIT
        else:
            self.cstate = _HEAD
        if ex.ts_end:  # the response was complete already
            self._finished(ex)

    def _identity(self, head: bytes, lh: bytes, ts: int) -> None:
        self.identity_sent = True
        raw = header_value(head, lh, b"user-agent")
        if not raw:
            return
        ua = raw.decode("latin-1")
        product = product_of(ua)
        if self.user_agents:
            low = ua.lower()
            for pattern, name in self.user_agents.items():
                if pattern in low:
                    product = name
                    break
        if product:
            self.emit(
                ConnIdentity(
                    ts, self.conn, "http.user_agent", {"product": product, "user_agent": ua}
                )
            )

    # --- server -> client ---------------------------------------------------------------

    def feed_server(self, data: bytes) -> bytes:
        """Decode a server chunk (already forwarded); returns it unchanged."""
        self.s_total += len(data)
        st = self.sstate
        if st == _HEAD and not self.sbuf and self.pending:
            # the common case, inlined: exactly one whole final response with a
            # Content-Length body in this chunk (anything else: the general path)
            end = data.find(b"\r\n\r\n")
            ex = self.pending[0]
            if end >= 12 and ex.upgrade is None and ex.method != "HEAD":
                head = data[:end]
                if head == self._plain_resp:  # as the previous response, byte for byte
                    status, length = self._plain_resp_verdict
                else:
                    status, length = _plain_response(data, end)
                    if status:
                        self._plain_resp = head
                        self._plain_resp_verdict = (status, length)
                if status and end + 4 + length == len(data):
                    now = self.clock()
                    ex.status = status
                    ex.ts_response = now
                    ex.ts_end = now
                    ex.resp_head = head
                    ex.resp_body_size = length
                    self.pending.popleft()
                    if self.creq is not ex:
                        b = self.batch
                        b.append(wire(ex))
                        if len(b) >= self.batch_max:
                            self.flush_events()
                    return data
        if st >= _TUNNEL:
            if st == _TUNNEL and self.tunnel is not None:
                self.tunnel.tunnel_s2c += len(data)
            return data
        if self.sbuf:
            buf = self.sbuf + data
            self.sbuf = b""
        else:
            buf = data
        try:
            self._server(buf, len(buf))
        except _ProtoErr as e:
            self._fail("s2c", str(e))
        return data

    def _server(self, buf: bytes, n: int) -> None:
        pos = 0
        while pos < n:
            st = self.sstate
            if st == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > self.max_head:
                        raise _ProtoErr(f"response head longer than {self.max_head} bytes")
                    self.sbuf = buf[pos:] if pos else buf
                    return
                self._response(buf, pos, end)
                pos = end + 4
            elif st == _BODY:
                resp = self.sresp
                assert resp is not None
                left = self.sleft
                take = left if left < n - pos else n - pos
                pos += take
                self.sleft = left = left - take
                resp.resp_body_size += take
                if not left:
                    self._response_done(resp, self.clock())
            elif st == _CHUNKED:
                ch = self.schunk
                resp = self.sresp
                assert ch is not None and resp is not None
                pos = ch.feed(buf, pos, n)
                resp.resp_body_size = ch.size
                if ch.done:
                    self.schunk = None
                    self._response_done(resp, self.clock())
            elif st == _UNTIL_CLOSE:
                assert self.sresp is not None
                self.sresp.resp_body_size += n - pos
                return
            else:  # tunnel (switched in this loop) or pass
                if st == _TUNNEL and self.tunnel is not None:
                    self.tunnel.tunnel_s2c += n - pos
                return

    def _response(self, buf: bytes, pos: int, end: int) -> None:
        status = response_status(buf, pos, end)
        now = self.clock()
        pend = self.pending
        if pend:
            ex = pend[0]
        else:
            self.emit(
                Note(
                    now,
                    self.conn,
                    "http.unsolicited_response",
                    f"the server sent a {status} response with no request pending",
                )
            )
            ex = HttpExchange(
                now, self.conn, self.proxy, self.scheme, "1.1", "", 0, self.new_trace_id(),
                self.new_span_id(), None, None, False,
                inject_note="response without a request",
            )  # fmt: skip
            pend.append(ex)
        if status < 200 and status != 101:
            if ex.interim is None:
                ex.interim = [status]
            else:
                ex.interim.append(status)
            return
        lh = buf[pos : end + 2].lower()
        ex.status = status
        ex.ts_response = now
        ex.resp_head = buf[pos:end]
        if ex.upgrade is not None:
            if status == 101 if ex.upgrade != "connect" else 200 <= status < 300:
                if status == 101:
                    up = header_values(lh, b"upgrade")
                    if up:
                        ex.upgrade = b",".join(up).decode("latin-1")
                self._start_tunnel(ex)
                return
            ex.upgrade = None
            if self.cstate == _UPGRADE_WAIT and self.creq is None:
                self._resume_client()
        elif status == 101:
            raise _ProtoErr("101 Switching Protocols without an Upgrade request")
        if status == 204 or status == 304 or ex.method == "HEAD":
            self._response_done(ex, now)
        elif (i := lh.find(b"\r\ncontent-length:")) >= 0 and b"\r\ntransfer-encoding:" not in lh:
            length = _length_at(lh, i)
            if length:
                self.sresp = ex
                self.sleft = length
                self.sstate = _BODY
            else:
                self._response_done(ex, now)
        elif b"\r\ntransfer-encoding:" in lh:
            codings = b",".join(header_values(lh, b"transfer-encoding")).split(b",")
            self.sresp = ex
            if codings[-1].strip(b" \t") == b"chunked":
                self.schunk = _Chunked()
                self.sstate = _CHUNKED
            else:
                self.sstate = _UNTIL_CLOSE
        else:
            self.sresp = ex
            self.sstate = _UNTIL_CLOSE

    def _response_done(self, ex: HttpExchange, now: int) -> None:
        ex.ts_end = now
        self.sresp = None
        self.sstate = _HEAD
        pend = self.pending
        if pend and pend[0] is ex:
            pend.popleft()
        if self.creq is not ex:
            self._finished(ex)

    def _start_tunnel(self, ex: HttpExchange) -> None:
        if self.pending and self.pending[0] is ex:
            self.pending.popleft()
        self.tunnel = ex
        self.sstate = _TUNNEL
        self.cstate = _TUNNEL
        held, self.chold = self.chold, b""
        if held:
            ex.tunnel_c2s += len(held)
            if self.rewrite and self.release is not None:
                self.release(held)

    def _resume_client(self) -> None:
        """The server declined a protocol switch: parse what the client sent meanwhile."""
        self.cstate = _HEAD
        held, self.chold = self.chold, b""
        if held:
            self.c_total -= len(held)
            out = self.feed_client(held)
            if out and self.rewrite and self.release is not None:
                self.release(out)

    def _finished(self, ex: HttpExchange) -> None:
        b = self.batch
        b.append(wire(ex))
        if len(b) >= self.batch_max:
            self.flush_events()

    def flush_events(self) -> None:
        """Emit the finished exchanges held for batching (see HttpExchanges)."""
        b = self.batch
        if b:
            self.batch = []
            self.emit(HttpExchanges(b[0][0], self.conn, b, policy=self.policy))

    def announce(self, cutoff: int) -> None:
        """Emit an :class:`HttpRequest` for every request in flight since before
        ``cutoff`` (once each): called by the listener's periodic sweep."""
        for ex in self.pending:
            if ex.ts < cutoff and not ex.announced and not ex.ts_end:
                ex.announced = True
                self.emit(
                    HttpRequest(
                        ex.ts, ex.conn, ex.proxy, ex.method, ex.trace_id, ex.span_id,
                        ex.parent_span_id, req_head=ex.req_head, policy=self.policy,
                    )
                )  # fmt: skip

    # --- endings and failures -----------------------------------------------------------

    def flush_client(self) -> bytes:
        """Client EOF or relay failure: whatever is held goes out unchanged."""
        held, self.chold = self.chold, b""
        return held

    def closed(self, reason: str) -> None:
        """The connection ended: finish tunnels and read-until-close responses, and
        report every other exchange still open as cut short."""
        now = self.clock()
        t = self.tunnel
        if t is not None:
            self.tunnel = None
            t.ts_end = now
            self._finished(t)
        if self.sstate == _UNTIL_CLOSE and self.sresp is not None:
            resp = self.sresp
            self.sresp = None
            if reason.startswith(("server closed", "both sides closed")):
                self._response_done(resp, now)
        self._abandon(now, f"connection ended ({reason})")
        self.cstate = self.sstate = _PASS
        self.flush_events()

    def _abandon(self, now: int, message: str, error: str | None = None) -> None:
        todo = list(self.pending)
        self.pending.clear()
        creq = self.creq
        if creq is not None and creq not in todo:
            todo.append(creq)
        self.creq = None
        self.sresp = None
        for ex in todo:
            if error is not None:
                ex.error = error
            elif ex is creq:
                ex.error = "incomplete_request"
                ex.req_complete = False
            elif ex.status is None:
                ex.error = "no_response"
            else:
                ex.error = "incomplete_response"
            ex.error_message = message
            ex.ts_end = now
            self._finished(ex)

    def _fail(self, direction: str, reason: str) -> None:
        """Unparseable input: record it, release held bytes, and go passthrough."""
        self.flush_events()  # what finished before the failure stays before it
        now = self.clock()
        offset = self.c_total if direction == "c2s" else self.s_total
        self.emit(ProtocolError(now, self.conn, "http", direction, offset, reason, ""))
        self.emit(
            Note(
                now,
                self.conn,
                "http.passthrough",
                f"HTTP decoding stopped ({direction}: {reason}); the rest of the connection "
                + (
                    # decode = "capture": the relay frames requests only, and goes on
                    "is relayed unchanged except for traceparent injection (the relay "
                    "does not read responses)"
                    if direction == "s2c" and self.told is not None
                    else "is relayed unchanged without traceparent injection"
                ),
            )
        )
        self._abandon(now, f"decoding stopped: {reason}", "not_decoded")
        self.cstate = self.sstate = _PASS
        self.flush_events()
        self.sbuf = b""
        if direction == "s2c":
            held, self.chold = self.chold, b""
            if held and self.rewrite and self.release is not None:
                self.release(held)


def _length_at(lh: bytes, i: int) -> int:
    """The Content-Length of a lowercased head whose first such header starts at ``i``
    (its CRLF): one plain value read in place, anything else (repeats, lists) checked
    by ``_content_length``, which raises ``_ProtoErr`` where parsers could disagree."""
    j = lh.find(b"\r\n", i + 17)
    v = lh[i + 17 : j].strip(b" \t")
    if v.isdigit() and len(v) < 19 and lh.find(b"\r\ncontent-length:", j) < 0:
        return int(v)
    return _content_length(header_values(lh, b"content-length"))


def request_framing(lh: bytes, v11: bool, connect: bool) -> tuple[int, bool, str | None]:
    """(Content-Length, chunked, protocol switch asked) of a validated, lowercased
    request head (``lh``: request line to the last header line's CRLF). Raises
    ``_ProtoErr`` for framing two parsers could disagree on. Shared by the decoder
    and the in-line injector (:mod:`proxies.http.injector`), so both frame alike."""
    length = 0
    chunked = False
    upgrade = None
    if b"\r\ntransfer-encoding:" in lh:
        if b"\r\ncontent-length:" in lh:
            raise _ProtoErr("request has both Transfer-Encoding and Content-Length")
        codings = b",".join(header_values(lh, b"transfer-encoding")).split(b",")
        if codings[-1].strip(b" \t") != b"chunked" or not v11:
            raise _ProtoErr("request Transfer-Encoding does not end in chunked")
        chunked = True
    elif (i := lh.find(b"\r\ncontent-length:")) >= 0:
        length = _length_at(lh, i)
    if connect:
        upgrade = "connect"
    elif v11 and b"\r\nupgrade:" in lh:
        conn_tokens = b",".join(header_values(lh, b"connection"))
        if b"upgrade" in conn_tokens:
            upgrade = b",".join(header_values(lh, b"upgrade")).decode("latin-1")
    return length, chunked, upgrade


def response_status(buf: bytes, pos: int, end: int) -> int:
    """The status code of the response head ``buf[pos:end]`` (``end``: its CRLF CRLF)."""
    code = buf[pos + 9 : pos + 12]
    if (
        end - pos >= 12
        and buf.startswith(b"HTTP/1.", pos)
        and buf[pos + 8] == 32
        and code.isdigit()
        and buf[pos + 12] in b" \r"
    ):
        return int(code)
    m = _STATUS_LINE.match(buf, pos, end + 2)
    if m is None:
        raise _ProtoErr("malformed response status line")
    return int(m.group(1))


def _plain_response(data: bytes, end: int) -> tuple[int, int]:
    """(status, Content-Length) when ``data[:end]`` is a final response head that
    the inlined path may take (2xx-5xx except 204/304, one valid Content-Length,
    no Transfer-Encoding), else (0, 0)."""
    if not (data.startswith(b"HTTP/1.") and data[8] == 32 and data[12] in b" \r"):
        return 0, 0
    code = data[9:12]
    if not code.isdigit() or data[9] not in b"2345":
        return 0, 0
    status = int(code)
    if status == 204 or status == 304:
        return 0, 0
    lh = data[: end + 2].lower()
    i = lh.find(b"\r\ncontent-length:")
    if i < 0 or b"\r\ntransfer-encoding:" in lh:
        return 0, 0
    j = lh.find(b"\r\n", i + 17)
    v = lh[i + 17 : j].strip(b" \t")
    if not v.isdigit() or len(v) > 18 or lh.find(b"\r\ncontent-length:", j) >= 0:
        return 0, 0
    return status, int(v)


def _content_length(values: list[bytes]) -> int:
    first = values[0]
    for v in values:
        if v != first:
            raise _ProtoErr("several different Content-Length values")
    if not first.isdigit() or len(first) > 18:
        raise _ProtoErr(f"invalid Content-Length {first[:20]!r}")
    return int(first)
