"""Sans-IO AMQP 0-9-1 decoder for one connection, both directions.

Strategy. Bytes go in (``feed_client`` / ``feed_server``), events come out
through ``emit``; no sockets. Framing is done here, not by pamqp, because pamqp
raises the same exception for "short" and "corrupt" (see LIBRARY-NOTES): each
frame's 7-byte header is read with ``struct``, its full length checked, its end
byte verified. Then:

- body frames are *streamed*: counted (and the first ``body_head`` bytes kept
  for shared-id extraction) but never buffered, so a 4 MiB message costs no copy;
- the hot methods (Basic.Publish/Deliver/Get-Ok/Return/Ack/Nack/Reject) and
  content headers have small struct parsers (pamqp costs 4-7 us per frame);
  every other method is decoded by pamqp and emitted as an ``AmqpMethod``;
- content headers are re-encoded only to add the ``traceparent`` header to a
  publish that lacks one (:mod:`proxies.amqp.rewrite`), and only when the frame
  still fits the negotiated frame_max.

``feed_client`` returns the bytes to forward: the input, except that a partial
frame at the end of a chunk is held back until complete (a content header must
be whole before it can be edited) and an edited content header replaces the
original. ``feed_server`` only observes.

Anything unparseable emits one ``ProtocolError`` and turns the whole connection
into passthrough: held bytes are released unchanged and nothing is decoded again.
"""

from __future__ import annotations

import os
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from pamqp import base as pamqp_base
from pamqp import frame as pamqp_frame

from proxies.amqp.events import (
    AmqpConfirm,
    AmqpDeliver,
    AmqpGetOk,
    AmqpMethod,
    AmqpPublish,
    AmqpReturn,
    AmqpSettle,
)
from proxies.amqp.rewrite import (
    HeaderError,
    find_traceparent,
    inject_traceparent,
    injected_size,
    parse_content_header,
)
from sniff import ids
from sniff.events import ConnIdentity, Event, Note, ProtocolError

try:  # the lean loop in C (sniff/_shipper.c), when built
    from sniff._shipper import lean_feed as _lean_feed
except ImportError:
    _lean_feed = None  # type: ignore[assignment]
_PURE = os.environ.get("SNIFF_PURE_PYTHON") == "1"

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

_FRAME_HDR = struct.Struct(">BHI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_CM = struct.Struct(">HH")


def _idx(class_id: int, method_id: int) -> int:
    return class_id << 16 | method_id


BASIC_PUBLISH = _idx(60, 40)
BASIC_RETURN = _idx(60, 50)
BASIC_DELIVER = _idx(60, 60)
BASIC_GET = _idx(60, 70)
BASIC_GET_OK = _idx(60, 71)
BASIC_GET_EMPTY = _idx(60, 72)
BASIC_ACK = _idx(60, 80)
BASIC_REJECT = _idx(60, 90)
BASIC_NACK = _idx(60, 120)
BASIC_CONSUME = _idx(60, 20)
BASIC_CONSUME_OK = _idx(60, 21)
BASIC_CANCEL = _idx(60, 30)
BASIC_CANCEL_OK = _idx(60, 31)
CONNECTION_START_OK = _idx(10, 11)
CONNECTION_SECURE = _idx(10, 20)
CONNECTION_SECURE_OK = _idx(10, 21)
CONNECTION_TUNE_OK = _idx(10, 31)
CONNECTION_UPDATE_SECRET = _idx(10, 70)
CHANNEL_OPEN = _idx(20, 10)
CHANNEL_CLOSE_OK = _idx(20, 41)
CONFIRM_SELECT = _idx(85, 10)
TX_SELECT = _idx(90, 10)

# fields never put in an event: credentials and secrets
_SECRET_FIELDS = {
    CONNECTION_START_OK: ("response",),
    CONNECTION_SECURE: ("challenge",),
    CONNECTION_SECURE_OK: ("response",),
    CONNECTION_UPDATE_SECRET: ("new_secret",),
}
_IDENTITY_KEYS = ("product", "version", "platform", "connection_name", "information")

PRE_TUNE_FRAME_LIMIT = 1 << 20  # sanity bound for non-body frames before Tune-Ok


class _ProtoErr(Exception):
    pass


class _Stream:
    """Framing state of one direction."""

    __slots__ = ("body_chan", "body_left", "buf", "c2s", "offset", "started")

    def __init__(self, c2s: bool) -> None:
        self.c2s = c2s
        self.buf = b""  # a partial frame (or protocol header) carried to the next chunk
        self.body_left = 0  # bytes left in the current body frame, end byte included
        self.body_chan = 0
        self.offset = 0  # stream bytes consumed before ``buf``
        self.started = not c2s  # the client must open with the protocol header


class _Msg:
    """A message whose content is being read: method seen, header and body pending."""

    __slots__ = (
        "args",
        "body_size",
        "exchange",
        "got_header",
        "head",
        "headers_raw",
        "injected",
        "kind",
        "note",
        "parent",
        "props",
        "received",
        "routing_key",
        "span_id",
        "trace_id",
        "traceparent",
        "ts",
    )

    def __init__(
        self, kind: str, ts: int, exchange: str, routing_key: str, args: dict[str, Any]
    ) -> None:
        self.kind = kind
        self.ts = ts
        self.exchange = exchange
        self.routing_key = routing_key
        self.args = args
        self.got_header = False
        self.body_size = 0
        self.received = 0
        self.head: list[bytes] = []
        self.props: dict[str, Any] = {}
        self.headers_raw: bytes | None = None
        self.traceparent: str | None = None
        self.trace_id = ""
        self.span_id = ""
        self.parent: str | None = None
        self.injected = False
        self.note: str | None = None


# property-flag bits, in the first byte of the flag word: correlation_id (bit 10) and
# reply_to (bit 9) of the 16-bit word are bits 2 and 1 of its high byte
_FLAG_CORRELATION_ID_HI = 1 << 2
_FLAG_RPC_HI = 1 << 2 | 1 << 1
# the methods the relay side of decode = "capture" decodes (frame_max, channel reuse)
_LEAN_METHODS = frozenset((CONNECTION_TUNE_OK, CHANNEL_OPEN, CHANNEL_CLOSE_OK))
# the relay side's mark for "a publish awaits its content header" (see _feed_lean)
_LEAN_MSG = _Msg("publish", 0, "", "", {})


class _Chan:
    __slots__ = ("confirm", "consumes", "gets", "inc", "lean_rk", "pub", "seq", "tx")

    def __init__(self) -> None:
        self.confirm = False
        self.seq = 0
        self.tx = False
        self.pub: _Msg | None = None  # client -> server content in progress
        self.inc: _Msg | None = None  # server -> client content in progress
        self.gets: deque[tuple[str, bool]] = deque()  # pending Basic.Get (queue, no_ack)
        self.consumes: deque[tuple[str, str, bool]] = deque()  # pending Basic.Consume
        self.lean_rk: str | None = None  # relay side: a publish's default-exchange routing key


class AmqpShared:
    """State shared by the connections of one proxy: RPC requests awaiting replies.

    When a consumer receives a message with ``reply_to`` and ``correlation_id``
    and later publishes to that ``reply_to`` with the same ``correlation_id``,
    the reply's injected traceparent continues the request's trace, so the RPC
    caller's consumer span joins it even in a different sniff process.
    """

    def __init__(self, max_entries: int = 100_000, ttl_ns: int = 15 * 60 * 10**9) -> None:
        self.rpc: OrderedDict[tuple[str, str], tuple[str, str, int]] = OrderedDict()
        self.max_entries = max_entries
        self.ttl_ns = ttl_ns
        self.evicted = 0

    def remember(
        self, reply_to: str, correlation_id: str, trace_id: str, span_id: str, now: int
    ) -> None:
        self.rpc[(reply_to, correlation_id)] = (trace_id, span_id, now)
        if len(self.rpc) > self.max_entries:
            self._trim()

    def _trim(self) -> None:
        """Evict the oldest entries beyond ``max_entries`` (also called by the C lean loop,
        which stores entries itself)."""
        rpc = self.rpc
        while len(rpc) > self.max_entries:
            rpc.popitem(last=False)
            self.evicted += 1

    def take(self, reply_to: str, correlation_id: str, now: int) -> tuple[str, str] | None:
        hit = self.rpc.pop((reply_to, correlation_id), None)
        if hit is None or now - hit[2] > self.ttl_ns:
            return None
        return hit[0], hit[1]


def _shortstr(p: bytes, pos: int, end: int) -> tuple[str, int]:
    n = p[pos]
    stop = pos + 1 + n
    if stop > end:
        raise _ProtoErr("short string runs past the frame")
    return p[pos + 1 : stop].decode("utf-8", "replace"), stop


def _splice_in(
    parts: list[bytes] | None, data: bytes, last: int, pos: int, new: bytes
) -> list[bytes]:
    """``parts`` (see :func:`_spliced`) with the frame at ``pos`` replaced by ``new``."""
    if parts is None:
        parts = []
    parts.append(data[last:pos])
    parts.append(new)
    return parts


def _spliced(data: bytes, parts: list[bytes] | None, last: int, end: int) -> bytes:
    """``data[:end]`` with rewritten frames: ``parts`` holds everything before ``last``
    (the original bytes between rewrites, and the rewritten frames); None: no rewrite."""
    if parts is None:
        return data if end == len(data) else data[:end]
    parts.append(data[last:end])
    return b"".join(parts)


class AmqpDecoder:
    def __init__(
        self,
        conn: int,
        emit: Callable[[Event], None],
        *,
        inject: bool = True,
        clock: Callable[[], int] = time.time_ns,
        new_span_id: Callable[[], str] = ids.new_span_id,
        new_trace_id: Callable[[], str] = ids.new_trace_id,
        body_head: int = 4096,
        shared: AmqpShared | None = None,
        release: Callable[[bytes], None] | None = None,
        keep_body: bool = False,
        emit_fields: Callable[[type[Event], tuple[Any, ...]], None] | None = None,
        lean: bool = False,
    ) -> None:
        self.conn = conn
        self._emit = emit
        # the hot events go out as (class, positional field values): a sink that ships
        # them to the capture process never builds the dataclass (see sniff.capture_proc)
        self._emit_fields = emit_fields or (lambda cls, values: emit(cls(*values)))
        self.inject = inject
        self._clock = clock
        self._span_id = new_span_id
        self._trace_id = new_trace_id
        # the C lean loop may draw ids itself (its xoshiro256**) only with the default
        # id functions; given others (tests), it calls them as the Python callbacks do
        self._c_ids = new_span_id is ids.new_span_id and new_trace_id is ids.new_trace_id
        self._c_clock = clock is time.time_ns  # ... and may read the clock itself
        # lean: the proxy side of decode = "capture": only the client stream, only
        # what injection needs, no events (the capture process decodes a copy)
        self.lean = lean
        # relay side: span ids injected since take_injected(), (span id, parent span id)
        # for an RPC reply; (trace id, span id) given to RPC requests since take_assigned()
        self.injected_now: list[str | tuple[str, str]] = []
        self.assigned_now: list[tuple[str, str]] = []
        # capture side: span id the proxy injected -> the RPC request span it answers
        self.sniff_injected: dict[str, str | None] = {}
        # capture side: ids the proxy gave delivered RPC requests, in stream order
        self.relay_assigned: deque[tuple[str, str]] = deque()
        self._head_max = 0 if lean else body_head
        self._keep_body = keep_body
        self._shared = shared if shared is not None else AmqpShared()
        self._release = release  # sends held client bytes upstream after a failure
        self.c = _Stream(True)
        self.s = _Stream(False)
        self.passthrough = False
        self.frame_max = 0  # negotiated (Tune-Ok); 0 = not yet / unlimited
        self._frame_limit = PRE_TUNE_FRAME_LIMIT
        self._chans: dict[int, _Chan] = {}
        # the C lean loop's per-channel state (see _feed_lean): a publish (1) or delivery
        # (2) awaiting its content header; a publish's routing key to the default exchange
        self._lean_flags: dict[int, int] = {}
        self._lean_rk: dict[int, str] = {}
        self._consumers: dict[tuple[int, str], tuple[str, bool]] = {}
        self.frames = 0
        self.heartbeats = 0

    # --- public API ----------------------------------------------------------------------

    def feed_client(self, data: bytes) -> bytes:
        """Decode client bytes; return what to forward to the broker."""
        if self.passthrough:
            if self.c.buf:  # only ever non-empty here when injecting (bytes not yet sent)
                data, self.c.buf = self.c.buf + data, b""
            return data
        if self.lean:
            return self._feed_lean(self.c, data)
        return self._feed(self.c, data, self.inject)

    def scan_server(self, data: bytes) -> None:
        """The relay side of ``decode = "capture"``: note, from broker bytes already
        forwarded, each delivered request that awaits an RPC reply (reply_to and
        correlation_id), so the reply's tag can continue its trace
        (:meth:`take_assigned` gives the ids chosen, shipped with the chunk)."""
        if not self.passthrough:
            self._feed_lean(self.s, data)

    def feed_server(self, data: bytes) -> None:
        """Decode broker bytes (already forwarded to the client)."""
        if not self.passthrough:
            self._feed(self.s, data, False)

    def flush_client(self) -> bytes:
        """Release any held-back client bytes unchanged (EOF, shutdown)."""
        held, self.c.buf = self.c.buf, b""
        # without injection the client stream is only observed: held bytes were
        # forwarded already and are kept for parsing only
        return held if self.inject else b""

    # --- framing -------------------------------------------------------------------------

    def _feed(self, st: _Stream, data: bytes, rewrite: bool) -> bytes:
        """Parse ``data`` (after any held bytes). When ``rewrite``, return the bytes
        to forward now; otherwise return ``data`` itself (it was forwarded already)."""
        chunk = data
        if st.buf:
            data = st.buf + data
            st.buf = b""
        now = self._clock()
        n = len(data)
        pos = 0
        parts: list[bytes] | None = None
        last = 0
        try:
            if not st.started:
                pos = self._protocol_header(st, data)
                if pos < 0:
                    return b"" if rewrite else chunk
            while pos < n:
                if st.body_left:
                    take = n - pos
                    left = st.body_left
                    if take >= left:
                        if left > 1:
                            self._body(st, data, pos, pos + left - 1)
                        pos += left
                        st.body_left = 0
                        if data[pos - 1] != 0xCE:
                            raise _ProtoErr("body frame does not end with 0xCE")
                        self._body_done(st, now)
                    else:
                        payload = take if take < left - 1 else left - 1
                        if payload:
                            self._body(st, data, pos, pos + payload)
                        st.body_left = left - take
                        pos = n
                    continue
                if n - pos < 7:
                    break
                ftype, ch, size = _FRAME_HDR.unpack_from(data, pos)
                if ftype == 3:
                    end = pos + 8 + size
                    if end <= n:  # the whole body frame is here (the common case)
                        if data[end - 1] != 0xCE:
                            raise _ProtoErr("body frame does not end with 0xCE")
                        self._body_frame(st, ch, data, pos + 7, end - 1, now)
                        pos = end
                        continue
                    self._body_start(st, ch, size)
                    st.body_chan = ch
                    st.body_left = size + 1
                    pos += 7
                    continue
                if ftype == 1 or ftype == 2:
                    if size > self._frame_limit:
                        raise _ProtoErr(
                            f"frame of {size} bytes exceeds frame_max {self._frame_limit}"
                        )
                elif ftype == 8:
                    if size != 0 or ch != 0:
                        raise _ProtoErr(f"heartbeat frame with size {size} on channel {ch}")
                elif data[pos : pos + 4] == b"AMQP" and not st.c2s:
                    raise _ProtoErr(
                        f"broker rejected the protocol version: {data[pos : pos + 8]!r}"
                    )
                else:
                    raise _ProtoErr(f"unknown frame type {ftype}")
                end = pos + 7 + size + 1
                if end > n:
                    break
                if data[end - 1] != 0xCE:
                    raise _ProtoErr("frame does not end with 0xCE")
                self.frames += 1
                if ftype == 1:
                    self._method(st, ch, data, pos + 7, end - 1, now)
                elif ftype == 2:
                    new = self._header(st, ch, data, pos + 7, end - 1, rewrite, now)
                    if new is not None:
                        parts = _splice_in(parts, data, last, pos, new)
                        last = end
                else:
                    self.heartbeats += 1
                pos = end
        except (_ProtoErr, HeaderError, IndexError, struct.error, UnicodeDecodeError) as e:
            self._fail(st, data, pos, f"{e}")
            return _spliced(data, parts, last, n) if rewrite else chunk
        if pos < n:
            st.buf = data[pos:]
        st.offset += pos
        return _spliced(data, parts, last, pos) if rewrite else chunk

    def _feed_lean(self, st: _Stream, data: bytes) -> bytes:
        """The relay side of ``decode = "capture"`` with injection: the client stream
        framed just enough to tag each publish's content header, the broker's just
        enough to note RPC requests, everything else forwarded as it came (the
        capture process decodes and checks a copy). Returns the client bytes to
        forward now (a partial non-body frame is held back).

        The loop runs in C (``sniff._shipper.lean_feed``) when that is built, calling
        back ``_lean_tag``, ``_lean_request`` and ``_lean_method``; this Python loop is
        its reference and fallback (``SNIFF_PURE_PYTHON=1``), and the tests run both."""
        if _lean_feed is not None and st.started and not _PURE:
            r = _lean_feed(self, st, data)
            if r[1] is not None:
                self._fail(st, r[3], r[2], r[1])
            out: bytes = r[0]
            return out
        c2s = st.c2s
        if st.buf:
            data = st.buf + data
            st.buf = b""
        n = len(data)
        pos = 0
        parts: list[bytes] | None = None
        last = 0
        chans = self._chans
        unpack = _FRAME_HDR.unpack_from
        try:
            if not st.started:
                pos = self._protocol_header(st, data)
                if pos < 0:
                    return b""
            body_left = st.body_left
            if body_left:  # the rest of a body frame begun in an earlier chunk
                if n < body_left:
                    st.body_left = body_left - n
                    st.offset += n
                    return data
                pos = body_left
                st.body_left = 0
                if data[pos - 1] != 0xCE:
                    raise _ProtoErr("body frame does not end with 0xCE")
            limit = self._frame_limit
            while n - pos >= 7:
                ftype, ch, size = unpack(data, pos)
                end = pos + 8 + size
                if ftype == 3:  # body: only its length matters here
                    if end > n:
                        st.body_left = end - n
                        pos = n
                        break
                    if data[end - 1] != 0xCE:
                        raise _ProtoErr("body frame does not end with 0xCE")
                    pos = end
                    continue
                if ftype == 1 or ftype == 2:
                    if size > limit:
                        raise _ProtoErr(f"frame of {size} bytes exceeds frame_max {limit}")
                elif ftype == 8:
                    if size != 0 or ch != 0:
                        raise _ProtoErr(f"heartbeat frame with size {size} on channel {ch}")
                else:
                    raise _ProtoErr(f"unknown frame type {ftype}")
                if end > n:
                    break
                if data[end - 1] != 0xCE:
                    raise _ProtoErr("frame does not end with 0xCE")
                self.frames += 1
                if ftype == 1:
                    if size < 4:
                        raise _ProtoErr("method frame shorter than its class and method ids")
                    idx = (
                        data[pos + 7] << 24
                        | data[pos + 8] << 16
                        | data[pos + 9] << 8
                        | data[pos + 10]
                    )
                    if not c2s:
                        if idx in (BASIC_DELIVER, BASIC_GET_OK):
                            (chans.get(ch) or self._chan(ch)).inc = _LEAN_MSG
                    elif idx == BASIC_PUBLISH:
                        chan = chans.get(ch) or self._chan(ch)
                        if chan.pub is not None:
                            raise _ProtoErr(
                                f"Basic.Publish on channel {ch} before the previous content ended"
                            )
                        chan.pub = _LEAN_MSG
                        # to the default exchange, while RPC requests await replies: the
                        # routing key may name one's reply_to
                        chan.lean_rk = None
                        if self._shared.rpc and size >= 7 and data[pos + 13] == 0:
                            stop = pos + 15 + data[pos + 14]
                            chan.lean_rk = data[pos + 15 : stop].decode("utf-8", "replace")
                    elif idx in _LEAN_METHODS:
                        self._generic_method(st, ch, data, pos + 7, end - 1, idx, 0)
                        limit = self._frame_limit
                elif ftype == 2:
                    pending = chans.get(ch)
                    if pending is not None and not c2s and pending.inc is not None:
                        pending.inc = None  # a delivered message's header: an RPC request?
                        self._lean_request(data, pos + 7, end - 1)
                    elif pending is not None and c2s and pending.pub is not None:
                        pending.pub = None  # the content header: tag it, the body follows
                        new = self._lean_tag(data, pos + 7, end - 1, pending.lean_rk)
                        if new is not None:
                            parts = _splice_in(parts, data, last, pos, new)
                            last = end
                else:
                    self.heartbeats += 1
                pos = end
        except (_ProtoErr, HeaderError, IndexError, struct.error, UnicodeDecodeError) as e:
            self._fail(st, data, pos, f"{e}")
            return _spliced(data, parts, last, n)
        if pos < n:
            st.buf = data[pos:]
        st.offset += pos
        return _spliced(data, parts, last, pos)

    def _lean_method(self, st: _Stream, ch: int, p: bytes, start: int, end: int, idx: int) -> int:
        """A method that changes the lean framing (Tune-Ok, Channel.Open/Close-Ok); the new
        frame limit (for the C loop)."""
        self._generic_method(st, ch, p, start, end, idx, 0)
        return self._frame_limit

    def _lean_tag(self, p: bytes, start: int, end: int, rk: str | None) -> bytes | None:
        """The content header ``p[start:end]`` of a publish with a fresh traceparent
        added, or None to forward it unchanged (it has one, or would outgrow frame_max).
        A reply to a delivered RPC request (``rk``, the routing key to the default
        exchange, is the request's reply_to; same correlation_id) continues its trace."""
        reply = rk is not None and p[start + 12] & _FLAG_CORRELATION_ID_HI
        h = parse_content_header(p, start, end, props=bool(reply))
        if h.class_id != 60:
            raise _ProtoErr(f"content header for class {h.class_id}, expected Basic (60)")
        if find_traceparent(p, h) is not None:
            return None  # the application's (or an invalid one): left as it is
        if self.frame_max and injected_size(h, end - start) > self.frame_max:
            return None  # the capture process records why, from its own copy
        span_id = self._span_id()
        request = None
        if reply:
            corr = h.props.get("correlation_id")
            if corr:
                request = self._lean_take(rk, corr)  # type: ignore[arg-type]
        if request is None:
            self.injected_now.append(span_id)
            trace_id = self._trace_id()
        else:
            trace_id = request[0]
            self.injected_now.append((span_id, request[1]))
        return inject_traceparent(p, start, end, h, ids.format_traceparent(trace_id, span_id))

    def _lean_request(self, p: bytes, start: int, end: int) -> None:
        """A delivered message's content header: when it asks for an RPC reply
        (reply_to and correlation_id), choose its consumer span's ids here, remember
        them for the reply, and ship them so the capture process uses the same."""
        if p[start + 12] & _FLAG_RPC_HI != _FLAG_RPC_HI:
            return  # not both reply_to and correlation_id: nothing to remember
        h = parse_content_header(p, start, end)
        reply_to = h.props.get("reply_to")
        corr = h.props.get("correlation_id")
        if h.class_id != 60 or not reply_to or not corr:
            return
        parsed = ids.parse_traceparent(find_traceparent(p, h))
        trace_id = parsed[0] if parsed else self._trace_id()
        self._lean_remember(reply_to, corr, trace_id, self._span_id())

    def _lean_take(self, reply_to: str, correlation_id: str) -> tuple[str, str] | None:
        """The (trace id, span id) of the delivered RPC request a reply answers, if known
        (the C lean loop does the same in ``rpc_take``)."""
        return self._shared.take(reply_to, correlation_id, self._clock())

    def _lean_remember(
        self, reply_to: str, correlation_id: str, trace_id: str, span_id: str
    ) -> None:
        """Note the ids chosen for a delivered RPC request (the C lean loop does the same in
        ``rpc_remember``)."""
        self._shared.remember(reply_to, correlation_id, trace_id, span_id, self._clock())
        self.assigned_now.append((trace_id, span_id))

    def take_assigned(self) -> list[tuple[str, str]] | None:
        """The (trace id, span id) given to delivered RPC requests since the last call."""
        got = self.assigned_now
        if not got:
            return None
        self.assigned_now = []
        return got

    def _protocol_header(self, st: _Stream, data: bytes) -> int:
        """Check the client's opening protocol header: the position after it, or -1
        (held in ``st.buf``) while fewer than 8 bytes have arrived."""
        if len(data) < 8:
            if PROTOCOL_HEADER.startswith(data):
                st.buf = data
                return -1
            raise _ProtoErr(f"not an AMQP 0-9-1 protocol header: {data[:8]!r}")
        if data[:8] != PROTOCOL_HEADER:
            raise _ProtoErr(f"unsupported protocol header {data[:8]!r} (sniff speaks AMQP 0-9-1)")
        st.started = True
        return 8

    def _fail(self, st: _Stream, data: bytes, pos: int, reason: str) -> None:
        self.passthrough = True
        self._emit(
            ProtocolError(
                self._clock(),
                self.conn,
                "amqp",
                "c2s" if st.c2s else "s2c",
                st.offset + pos,
                reason,
                data[pos : pos + 32].hex(),
            )
        )
        if not st.c2s and self.c.buf:
            held, self.c.buf = self.c.buf, b""
            if self.inject and self._release is not None:
                self._release(held)  # unsent client bytes go out unchanged
        st.buf = b""

    # --- frames --------------------------------------------------------------------------

    def _chan(self, ch: int) -> _Chan:
        c = self._chans.get(ch)
        if c is None:
            c = self._chans[ch] = _Chan()
        return c

    def _method(self, st: _Stream, ch: int, p: bytes, start: int, end: int, now: int) -> None:
        if end - start < 4:
            raise _ProtoErr("method frame shorter than its class and method ids")
        cls_id, meth_id = _CM.unpack_from(p, start)
        idx = cls_id << 16 | meth_id
        pos = start + 4
        if st.c2s:
            if idx == BASIC_PUBLISH:
                pos += 3  # reserved ticket, then the exchange's length byte
                stop = pos + p[pos - 1]
                exchange = p[pos:stop].decode("utf-8", "replace") if stop > pos else ""
                pos = stop + 1
                stop = pos + p[stop]
                rk = p[pos:stop].decode("utf-8", "replace")
                pos = stop
                if pos + 1 != end:
                    raise _ProtoErr("Basic.Publish has trailing bytes")
                chan = self._chan(ch)
                if chan.pub is not None:
                    raise _ProtoErr(
                        f"Basic.Publish on channel {ch} before the previous content ended"
                    )
                bits = p[pos]
                chan.pub = _Msg("publish", now, exchange, rk, {"mandatory": bool(bits & 1)})
                return
            if idx in (BASIC_ACK, BASIC_NACK, BASIC_REJECT):
                if end - pos != 9:
                    raise _ProtoErr("settlement method of the wrong size")
                (tag,) = _U64.unpack_from(p, pos)
                bits = p[pos + 8]
                values: tuple[Any, ...]
                if idx == BASIC_ACK:
                    values = (now, self.conn, ch, tag, bool(bits & 1), "ack", None)
                elif idx == BASIC_NACK:
                    values = (now, self.conn, ch, tag, bool(bits & 1), "nack", bool(bits & 2))
                else:
                    values = (now, self.conn, ch, tag, False, "reject", bool(bits & 1))
                self._emit_fields(AmqpSettle, values)
                return
        else:
            if idx == BASIC_DELIVER:
                ctag, pos = _shortstr(p, pos, end)
                (tag,) = _U64.unpack_from(p, pos)
                redelivered = bool(p[pos + 8] & 1)
                exchange, pos = _shortstr(p, pos + 9, end)
                rk, pos = _shortstr(p, pos, end)
                if pos != end:
                    raise _ProtoErr("Basic.Deliver has trailing bytes")
                queue, no_ack = self._consumers.get((ch, ctag), (None, False))
                self._start_incoming(
                    ch,
                    _Msg(
                        "deliver",
                        now,
                        exchange,
                        rk,
                        {
                            "consumer_tag": ctag,
                            "delivery_tag": tag,
                            "redelivered": redelivered,
                            "queue": queue,
                            "no_ack": no_ack,
                        },
                    ),
                )
                return
            if idx == BASIC_GET_OK:
                (tag,) = _U64.unpack_from(p, pos)
                redelivered = bool(p[pos + 8] & 1)
                exchange, pos = _shortstr(p, pos + 9, end)
                rk, pos = _shortstr(p, pos, end)
                if pos + 4 != end:
                    raise _ProtoErr("Basic.Get-Ok of the wrong size")
                (count,) = _U32.unpack_from(p, pos)
                chan = self._chan(ch)
                queue, no_ack = chan.gets.popleft() if chan.gets else (None, False)
                self._start_incoming(
                    ch,
                    _Msg(
                        "get",
                        now,
                        exchange,
                        rk,
                        {
                            "delivery_tag": tag,
                            "redelivered": redelivered,
                            "queue": queue,
                            "no_ack": no_ack,
                            "message_count": count,
                        },
                    ),
                )
                return
            if idx == BASIC_RETURN:
                (code,) = _U16.unpack_from(p, pos)
                text, pos = _shortstr(p, pos + 2, end)
                exchange, pos = _shortstr(p, pos, end)
                rk, pos = _shortstr(p, pos, end)
                if pos != end:
                    raise _ProtoErr("Basic.Return has trailing bytes")
                self._start_incoming(
                    ch, _Msg("return", now, exchange, rk, {"reply_code": code, "reply_text": text})
                )
                return
            if idx in (BASIC_ACK, BASIC_NACK):
                if end - pos != 9:
                    raise _ProtoErr("confirm method of the wrong size")
                (tag,) = _U64.unpack_from(p, pos)
                self._emit_fields(
                    AmqpConfirm, (now, self.conn, ch, tag, bool(p[pos + 8] & 1), idx == BASIC_ACK)
                )
                return
        self._generic_method(st, ch, p, start, end, idx, now)

    def _start_incoming(self, ch: int, msg: _Msg) -> None:
        chan = self._chan(ch)
        if chan.inc is not None:
            raise _ProtoErr(f"new content on channel {ch} before the previous content ended")
        chan.inc = msg

    def _generic_method(
        self, st: _Stream, ch: int, p: bytes, start: int, end: int, idx: int, now: int
    ) -> None:
        try:
            _, _, method = pamqp_frame.unmarshal(bytes(p[start - 7 : end + 1]))
        except Exception as e:  # pamqp raises several types for bad input
            raise _ProtoErr(f"undecodable method {idx >> 16}.{idx & 0xFFFF}: {e}") from None
        if not isinstance(method, pamqp_base.Frame):
            raise _ProtoErr(f"a method frame that decodes as {type(method).__name__}")
        name = method.name
        args: dict[str, Any] = dict(method)
        for secret in _SECRET_FIELDS.get(idx, ()):
            args.pop(secret, None)
        chan = self._chan(ch) if ch else None
        if idx == CONNECTION_START_OK:
            cp = args.get("client_properties") or {}
            attrs = {k: str(cp[k]) for k in _IDENTITY_KEYS if cp.get(k) not in (None, "")}
            attrs["mechanism"] = str(args.get("mechanism", ""))
            self._emit(ConnIdentity(now, self.conn, "amqp.client_properties", attrs))
        elif idx == CONNECTION_TUNE_OK:
            fm = int(args.get("frame_max") or 0)
            self.frame_max = fm
            self._frame_limit = fm if fm > 0 else 1 << 31
        elif chan is not None:
            if idx == CONFIRM_SELECT:
                chan.confirm = True
                chan.seq = 0
            elif idx == TX_SELECT:
                chan.tx = True
            elif idx == BASIC_CONSUME:
                tag = str(args.get("consumer_tag") or "")
                entry = (str(args.get("queue") or ""), bool(args.get("no_ack")))
                if tag:
                    self._consumers[(ch, tag)] = entry
                else:
                    chan.consumes.append((tag, *entry))
            elif idx == BASIC_CONSUME_OK:
                tag = str(args.get("consumer_tag") or "")
                if (ch, tag) not in self._consumers and chan.consumes:
                    _, queue, no_ack = chan.consumes.popleft()
                    self._consumers[(ch, tag)] = (queue, no_ack)
            elif idx == BASIC_GET:
                chan.gets.append((str(args.get("queue") or ""), bool(args.get("no_ack"))))
            elif idx == BASIC_GET_EMPTY:
                if chan.gets:
                    chan.gets.popleft()
            elif idx == BASIC_CANCEL_OK:
                self._consumers.pop((ch, str(args.get("consumer_tag") or "")), None)
            elif idx in (CHANNEL_OPEN, CHANNEL_CLOSE_OK):
                self._chans.pop(ch, None)
                for key in [k for k in self._consumers if k[0] == ch]:
                    del self._consumers[key]
        self._emit(AmqpMethod(now, self.conn, ch, "c2s" if st.c2s else "s2c", name, args))

    def _header(
        self, st: _Stream, ch: int, p: bytes, start: int, end: int, rewrite: bool, now: int
    ) -> bytes | None:
        chan = self._chans.get(ch)
        msg = (chan.pub if st.c2s else chan.inc) if chan is not None else None
        if msg is None or msg.got_header:
            raise _ProtoErr(f"content header on channel {ch} without a content method")
        h = parse_content_header(p, start, end)
        if h.class_id != 60:
            raise _ProtoErr(f"content header for class {h.class_id}, expected Basic (60)")
        msg.got_header = True
        msg.body_size = h.body_size
        msg.props = h.props
        if h.has_headers:
            msg.headers_raw = bytes(p[h.headers_start : h.headers_end])
        tp = find_traceparent(p, h)
        msg.traceparent = tp
        new: bytes | None = None
        if msg.kind == "publish":
            assert chan is not None
            new = self._publish_header(chan, msg, p, start, end, h, tp, rewrite, now)
        else:
            reply_to: str = h.props.get("reply_to") or ""
            corr: str = h.props.get("correlation_id") or ""
            rpc_request = bool(reply_to and corr) and msg.kind != "return"
            if rpc_request and self.relay_assigned:
                # decode = "capture": the proxy chose this RPC request's ids (and tagged
                # its reply with them); the same rule picks the same deliveries here
                msg.trace_id, msg.span_id = self.relay_assigned.popleft()
            else:
                parsed = ids.parse_traceparent(tp)
                msg.trace_id = parsed[0] if parsed else self._trace_id()
                msg.span_id = self._span_id()
            if rpc_request:
                self._shared.remember(reply_to, corr, msg.trace_id, msg.span_id, now)
        if h.body_size == 0:
            self._finish(ch, chan, msg, now)  # type: ignore[arg-type]
        return new

    def take_injected(self) -> list[str | tuple[str, str]] | None:
        """The span ids injected since the last call (shipped with the chunk)."""
        got = self.injected_now
        if not got:
            return None
        self.injected_now = []
        return got

    def _publish_header(
        self,
        chan: _Chan,
        msg: _Msg,
        p: bytes,
        start: int,
        end: int,
        h: Any,
        tp: str | None,
        rewrite: bool,
        now: int,
    ) -> bytes | None:
        if tp is not None and self.sniff_injected:
            # the proxy's own tags are exactly "00-<trace id>-<span id>-01": look the
            # span id up before parsing (each tag is new, so a parse cache never hits)
            own = tp[36:52] if len(tp) == ids.TRACEPARENT_LEN else ""
            if own in self.sniff_injected:
                # the proxy injected this one (decode = "capture"): it is our own span
                request = self.sniff_injected.pop(own)
                msg.trace_id, msg.span_id = tp[3:35], own
                if request is not None:  # an RPC reply, tagged in its request's trace
                    msg.parent = request
                    msg.args["rpc_reply_to"] = request
                msg.injected = True
                return None
        msg.span_id = self._span_id()
        parsed = ids.parse_traceparent(tp)
        if parsed is not None:  # an instrumented application: keep its context, parent under it
            msg.trace_id, msg.parent = parsed[0], parsed[1]
            msg.note = "message already carries a traceparent"
            return None
        if tp is not None:
            msg.trace_id = self._trace_id()
            msg.note = "message carries an invalid traceparent; left unchanged"
            return None
        reply = None
        corr = h.props.get("correlation_id")
        if msg.exchange == "" and corr:
            reply = self._shared.take(msg.routing_key, corr, now)
        if reply is not None:
            msg.trace_id, msg.parent = reply
            msg.args["rpc_reply_to"] = reply[1]
        else:
            msg.trace_id = self._trace_id()
        if not rewrite:
            msg.note = "injection disabled" if not self.inject else None
            return None
        size = injected_size(h, end - start)
        if self.frame_max and size > self.frame_max:
            msg.note = f"content header would grow to {size} bytes, over frame_max {self.frame_max}"
            self._emit(Note(now, self.conn, "amqp.inject_skipped", msg.note))
            return None
        traceparent = ids.format_traceparent(msg.trace_id, msg.span_id)
        msg.traceparent = traceparent
        msg.injected = True
        return inject_traceparent(p, start, end, h, traceparent)

    def _body_start(self, st: _Stream, ch: int, size: int) -> None:
        chan = self._chans.get(ch)
        msg = (chan.pub if st.c2s else chan.inc) if chan is not None else None
        if msg is None or not msg.got_header:
            raise _ProtoErr(f"body frame on channel {ch} without a content header")
        if msg.received + size > msg.body_size:
            raise _ProtoErr(
                f"body frames on channel {ch} exceed the announced size {msg.body_size}"
            )

    def _body_frame(self, st: _Stream, ch: int, p: bytes, start: int, end: int, now: int) -> None:
        """A whole body frame ``p[start:end]`` (payload only): _body_start, _body and
        _body_done in one call."""
        chan = self._chans.get(ch)
        msg = (chan.pub if st.c2s else chan.inc) if chan is not None else None
        if msg is None or not msg.got_header:
            raise _ProtoErr(f"body frame on channel {ch} without a content header")
        have = msg.received
        size = end - start
        if have + size > msg.body_size:
            raise _ProtoErr(
                f"body frames on channel {ch} exceed the announced size {msg.body_size}"
            )
        if have < self._head_max and size:
            msg.head.append(p[start : start + min(size, self._head_max - have)])
        have = msg.received = have + size
        if have >= msg.body_size:
            self._finish(ch, chan, msg, now)  # type: ignore[arg-type]

    def _body(self, st: _Stream, p: bytes, start: int, end: int) -> None:
        chan = self._chans[st.body_chan]
        msg = chan.pub if st.c2s else chan.inc
        assert msg is not None
        have = msg.received
        if have < self._head_max:
            msg.head.append(p[start : start + min(end - start, self._head_max - have)])
        msg.received = have + (end - start)

    def _body_done(self, st: _Stream, now: int) -> None:
        chan = self._chans[st.body_chan]
        msg = chan.pub if st.c2s else chan.inc
        assert msg is not None
        if msg.received >= msg.body_size:
            self._finish(st.body_chan, chan, msg, now)

    def _finish(self, ch: int, chan: _Chan, msg: _Msg, now: int) -> None:
        head = b"".join(msg.head) if msg.head else b""
        a = msg.args
        if msg.kind == "publish":
            chan.pub = None
            seq = None
            if chan.confirm:
                chan.seq += 1
                seq = chan.seq
            self._emit_fields(
                AmqpPublish,
                (
                    msg.ts,
                    self.conn,
                    ch,
                    msg.exchange,
                    msg.routing_key,
                    a["mandatory"],
                    msg.props,
                    msg.headers_raw,
                    msg.body_size,
                    now,
                    msg.trace_id,
                    msg.span_id,
                    msg.parent,
                    msg.traceparent,
                    msg.injected,
                    msg.note,
                    seq,
                    chan.tx,
                    a.get("rpc_reply_to"),
                    head,
                    None,
                    self._keep_body,
                ),
            )
            return
        chan.inc = None
        if msg.kind == "deliver":
            self._emit_fields(
                AmqpDeliver,
                (
                    msg.ts,
                    self.conn,
                    ch,
                    a["consumer_tag"],
                    a["delivery_tag"],
                    a["redelivered"],
                    msg.exchange,
                    msg.routing_key,
                    a["queue"],
                    a["no_ack"],
                    msg.props,
                    msg.headers_raw,
                    msg.body_size,
                    now,
                    msg.traceparent,
                    msg.trace_id,
                    msg.span_id,
                    head,
                    None,
                    self._keep_body,
                ),
            )
        elif msg.kind == "get":
            self._emit_fields(
                AmqpGetOk,
                (
                    msg.ts,
                    self.conn,
                    ch,
                    a["delivery_tag"],
                    a["redelivered"],
                    msg.exchange,
                    msg.routing_key,
                    a["queue"],
                    a["no_ack"],
                    a["message_count"],
                    msg.props,
                    msg.headers_raw,
                    msg.body_size,
                    now,
                    msg.traceparent,
                    msg.trace_id,
                    msg.span_id,
                    head,
                    None,
                    self._keep_body,
                ),
            )
        else:
            self._emit(
                AmqpReturn(
                    msg.ts,
                    self.conn,
                    ch,
                    a["reply_code"],
                    a["reply_text"],
                    msg.exchange,
                    msg.routing_key,
                    msg.props,
                    msg.body_size,
                    now,
                    msg.traceparent,
                )
            )
