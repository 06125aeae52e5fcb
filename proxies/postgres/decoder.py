"""Sans-IO PostgreSQL (protocol 3.x) decoder for one connection, both directions.

Strategy. Bytes go in (``feed_client`` / ``feed_server``), events come out
through ``emit``; no sockets (TLS lives in the handler, this sees plaintext).

Framing is one ``struct`` unpack per message header (1-byte type + 4-byte
length; the startup packets have no type byte). Only the messages sniff needs
are collected and decoded (Query, Parse, Bind, Execute, Describe, Close from
the client; CommandComplete, ErrorResponse, ReadyForQuery, Authentication,
ParameterStatus, BackendKeyData, NotificationResponse from the server); every
other message is acted on from its type byte alone and its body is *skipped*
without being buffered, so DataRow and CopyData (several MB each, possibly)
are counted, never decoded or copied. Large statements are collected up to a
cap; beyond it the head is decoded and the rest skipped. A Bind's body (up to
``max_statement_bytes``) goes on the statement's event as ``id_scan`` so that
``prepare`` can find shared ids (UUIDs) in bound values and then drop it; the
values are rendered as ``params`` only with ``capture_sql_literals``.

Pairing. The server answers in order, so the client's messages that expect an
answer are queued (``_pending``) and each server message applies to the head:
ParseComplete pops a Parse, CommandComplete finishes an Execute (or the next
statement of a simple Query), ReadyForQuery pops a Sync or Query. After an
ErrorResponse in the extended protocol the server skips messages until Sync;
so does the decoder. Prepared statements (named and unnamed) keep their text
from Parse; portals point at their statement, so every Execute carries the
text. A portal suspended by an Execute row limit (cursors) is one statement
until it completes or is closed, so statement counts stay exact.

One ``PostgresQuery`` per statement execution, built when its response is
complete (a failing Parse/Bind/Describe makes one too, errored) and emitted at
the next ReadyForQuery, whose transaction status says which statements ran in
an explicit transaction and which one ended it. A multi-statement simple Query
gives one event per result, each with the whole text, its ``batch`` index and
``batch_size``; ``SqlStatement.prepare`` cuts out each one's statement off the
hot path. Statement text is kept up to ``max_statement_bytes`` (``truncated``
beyond). Everything about credentials is skipped unread: PasswordMessage/SASL
data, the md5 salt, the SASL server messages, the BackendKeyData and
CancelRequest secret keys.

Rewriting (only when the caller forwards what ``feed_client`` returns, see
``rewriting``): an SSLRequest/GSSENCRequest the proxy answers itself is
dropped from the stream, and with sqlcommenter on, Query and Parse messages
get a ``/*traceparent='...'*/`` comment with their length adjusted; a partial
Query/Parse is then held back until whole. Anything unparseable emits one
``ProtocolError`` and turns the connection into passthrough: held bytes are
released unchanged and nothing is decoded again.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import cast

from proxies.postgres.events import (
    PostgresCancel,
    PostgresNotification,
    PostgresQuery,
    PostgresSession,
)
from proxies.postgres.params import parse_bind
from proxies.sql.sqlcommenter import has_traceparent, tag_sql_bytes
from sniff import ids
from sniff.events import ConnIdentity, Event, Note, ProtocolError

log = logging.getLogger("sniff.postgres")

_BI = struct.Struct(">BI")
_I = struct.Struct(">I")
_H = struct.Struct(">H")

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP_PACKET = 10_000  # the server's own limit
MAX_MESSAGE = 0x40000000  # 1 GiB, the server's limit for any message
MAX_PENDING = 1_000_000  # client messages awaiting an answer
MAX_STATEMENTS = 10_000  # named prepared statements remembered per connection
MAX_HELD = 10_000  # finished statements waiting for a ReadyForQuery (a client that never Syncs)
TAG_HOLD_MAX = 1 << 20  # with sqlcommenter: statements up to this size are held whole and tagged

# message types (as ints); the client's and the server's share letters
_Q, _P, _B, _E, _D, _C, _S, _F, _p = b"QPBEDCSFp"
_R, _K, _Z, _T, _N, _A, _G, _W, _V, _I_ = b"RKZTNAGWVI"
_ParseComplete, _BindComplete, _CloseComplete = b"123"
_n, _s, _t, _v = b"nstv"

# pending operation kinds
QUERY, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNC, FUNC = range(8)
_COMMAND = ("Query", "Parse", "Bind", "Describe", "Execute", "Close", "Sync", "FunctionCall")

# client message type -> bytes of the message (body) to collect; absent: skip the body.
# Query, Parse and Bind caps depend on max_statement_bytes (set per decoder).
_C_CAP = {_E: 4096, _D: 4096, _C: 4096, _F: 64}
# server message type -> bytes to collect (ParameterDescription too when literals are kept)
_S_CAP = {_C: 4096, _E: 65536, _Z: 64, _R: 4096, _S: 4096, _K: 4096, _A: 65536, _v: 4096}
_S_KNOWN = frozenset(b"DCZTEN123nstI" + b"AGHWdcVSKRv")  # every type a 3.x server sends
_C_KNOWN = frozenset(b"QPBEDCSHXFdcfp")

_AUTH = {
    0: "trust",
    2: "kerberos",
    3: "password",
    5: "md5",
    7: "gss",
    9: "sspi",
    10: "sasl",
}
# client_encoding (upper case, without '_' and '-') -> Python codec; others decode as UTF-8
_ENCODINGS = {
    "UTF8": "utf-8",
    "UNICODE": "utf-8",
    "SQLASCII": "latin-1",
    "LATIN1": "latin-1",
    "LATIN9": "iso8859-15",
    "WIN1252": "cp1252",
    "WIN1251": "cp1251",
    "EUCJP": "euc_jp",
    "SJIS": "shift_jis",
    "BIG5": "big5",
    "GBK": "gbk",
    "UHC": "cp949",
    "EUCKR": "euc_kr",
    "KOI8R": "koi8_r",
}


class _ProtoErr(Exception):
    pass


class _Stmt:
    """A statement's text: a prepared statement (named or unnamed) or one simple Query."""

    __slots__ = ("name", "span", "text", "tp", "trace", "truncated", "types")

    def __init__(self, name: str | None, text: str, truncated: bool = False) -> None:
        self.name = name
        self.text = text
        self.truncated = truncated  # text holds only the first max_statement_bytes
        self.tp: str | None = None  # sniff's sqlcommenter tag, until its first execution
        self.span: str | None = None  # the span id inside ``tp``
        self.trace: str | None = None  # the trace id inside ``tp``
        self.types: tuple[int, ...] | None = None  # parameter type OIDs (literals kept only)


class _Portal:
    __slots__ = (
        "bind",
        "name",
        "rows",
        "seq",
        "stmt",
        "susp_end",
        "susp_ts",
        "suspended",
        "warn",
    )

    def __init__(self, name: bytes, stmt: _Stmt, seq: int, bind: bytes | None = None) -> None:
        self.name = name
        self.stmt = stmt
        self.seq = seq
        self.bind = bind  # the Bind body (up to max_statement_bytes): parameter values
        self.suspended = False  # an Execute row limit stopped it; more Executes may follow
        self.susp_ts = 0  # when its first Execute was sent
        self.susp_end = 0
        self.rows = 0
        self.warn = 0


class _Close:
    __slots__ = ("name", "portal", "stmt")

    def __init__(self, name: bytes, stmt: _Stmt | None, portal: _Portal | None) -> None:
        self.name = name
        self.stmt = stmt  # closing this prepared statement
        self.portal = portal  # closing this portal


_Payload = _Stmt | _Portal | _Close | None
_Op = tuple[int, int, _Payload, int]  # kind, ts, payload, client sequence number


class PostgresShared:
    """State shared by the connections of one proxy: backend pid -> sniff connection,
    so a CancelRequest (its own connection) names the connection it cancels."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.pids: dict[int, int] = {}
        self.max_entries = max_entries

    def register(self, pid: int, conn: int) -> None:
        if len(self.pids) >= self.max_entries:
            self.pids.pop(next(iter(self.pids)))
        self.pids[pid] = conn

    def forget(self, pid: int | None, conn: int) -> None:
        if pid is not None and self.pids.get(pid) == conn:
            del self.pids[pid]


class PostgresDecoder:
    """One connection's decoder. See the module docstring.

    ``ssl_policy`` says what to do with an SSLRequest: ``refuse`` answers 'N'
    through ``reply`` and drops it; ``accept`` answers 'S', drops it and sets
    ``tls_request`` (the caller then runs TLS and feeds plaintext, starting
    with ``take_leftover()``); ``forward`` lets it through and reads the
    server's one-byte answer (decoding stops if the server says 'S').
    GSSENCRequest is refused unless the policy is ``forward``.
    """

    def __init__(
        self,
        conn: int,
        emit: Callable[[Event], None],
        *,
        keep_literals: bool = False,
        inject: bool = False,
        max_statement_bytes: int = 65536,
        ssl_policy: str = "refuse",
        reply: Callable[[bytes], None] | None = None,
        shared: PostgresShared | None = None,
        proxy_name: str = "postgresql",
        clock: Callable[[], int] = time.time_ns,
        new_span_id: Callable[[], str] = ids.new_span_id,
        new_trace_id: Callable[[], str] = ids.new_trace_id,
    ) -> None:
        self.conn = conn
        self._emit = emit
        self.keep_literals = keep_literals
        self.inject = inject
        self.max_statement = max(64, max_statement_bytes)
        text_cap = max(self.max_statement, TAG_HOLD_MAX) if inject else self.max_statement
        self._c_cap = {**_C_CAP, _Q: text_cap, _P: text_cap, _B: max(4096, self.max_statement)}
        self._s_cap = {**_S_CAP, _t: 4096} if keep_literals else _S_CAP
        self.ssl_policy = ssl_policy
        self._reply = reply
        self._shared = shared if shared is not None else PostgresShared()
        self.proxy_name = proxy_name
        self._clock = clock
        self._span_id = new_span_id
        self._trace_id = new_trace_id
        # what the caller must do with feed_client's return value
        self.rewriting = ssl_policy != "forward" or inject
        self.passthrough = False
        self.startup_done = False  # StartupMessage (or CancelRequest) seen
        self.tls_request = False  # SSLRequest accepted: the caller starts TLS
        self.ssl_refused = False  # answered 'N' to an SSLRequest (and no startup yet)
        self.client_tls = False
        self.upstream_tls = False
        self._leftover = b""
        # client stream
        self._c_buf = b""
        self._c_held = False
        self._c_skip = 0
        self._c_off = 0
        self._c_startup = True
        self._c_seq = 0
        self._sasl_peek = False
        # server stream
        self._s_buf = b""
        self._s_skip = 0
        self._s_off = 0
        self._s_neg = 0  # one-byte answers to forwarded SSL/GSSENC requests still due
        # session
        self.database: str | None = None
        self.user: str | None = None
        self.application_name: str | None = None
        self.protocol = "3.0"
        self.auth = "trust"
        self.server_version: str | None = None
        self.backend_pid: int | None = None
        self.ready = False  # first ReadyForQuery seen
        self._startup_ts = 0
        self._enc = "utf-8"
        # statements
        self._stmts: dict[bytes, _Stmt] = {}
        self._portals: dict[bytes, _Portal] = {}
        self._pending: deque[_Op] = deque()
        self._aborted = False  # extended-protocol error: server skips until Sync
        self._rows = 0
        self._warn = 0
        self._copy_out = False
        self._q_ts = 0  # when the current statement of a multi-statement Query started
        self._q_events: list[PostgresQuery] = []  # the current simple Query's results
        self._held: list[PostgresQuery] = []  # statements finished since the last ReadyForQuery
        self._in_txn = False  # the last ReadyForQuery said: in a transaction block
        self._txn_no = 0

    # --- public API ----------------------------------------------------------------------

    def take_leftover(self) -> bytes:
        """Bytes that followed an accepted SSLRequest in the same chunk (TLS records)."""
        out, self._leftover = self._leftover, b""
        return out

    @property
    def holding(self) -> bool:
        """Client bytes are held back (a partial Query/Parse that may still be tagged)."""
        return self._c_held

    def flush_client(self) -> bytes:
        """Release any held-back client bytes unchanged (EOF, shutdown)."""
        if self._c_held:
            held, self._c_buf, self._c_held = self._c_buf, b"", False
            return held
        return b""

    def feed_client(self, data: bytes) -> bytes:
        """Decode client bytes; return what to forward (used when ``rewriting``)."""
        if self.passthrough:
            if self._c_held:
                data = self._c_buf + data
                self._c_buf, self._c_held = b"", False
            return data
        # whether the caller forwards what this returns, as it stood when the chunk came
        # (a StartupMessage in this chunk switches it off for the next ones only)
        rewriting = self.rewriting
        pos = 0
        out_from = 0
        k = self._c_skip
        if k:
            n = len(data)
            if n <= k:
                self._c_skip = k - n
                self._c_off += n
                return data
            self._c_skip = 0
            pos = k  # the rest of a skipped message: forwarded as it is
        elif self._c_buf:
            if not self._c_held:
                out_from = len(self._c_buf)
            data = self._c_buf + data
            self._c_buf = b""
            self._c_held = False
        now = self._clock()
        n = len(data)
        parts: list[bytes] | None = None
        last = out_from
        try:
            if self._c_startup:
                pos, parts, last = self._client_startup(data, pos, now)
                if self.tls_request or self.passthrough:
                    end_out = pos if self.tls_request else n
                    self._c_off += pos
                    return self._out(data, out_from, end_out, parts, last, rewriting)
            while n - pos >= 5 and not self._c_startup:
                t, ln = _BI.unpack_from(data, pos)
                end = pos + 1 + ln
                if ln < 4 or ln > MAX_MESSAGE or t not in _C_KNOWN:
                    raise _ProtoErr(self._bad_header("client", t, ln))
                cap = self._c_cap.get(t)
                if cap is None:
                    if t == _p and self._sasl_peek:
                        cap = 64
                    else:
                        # includes PasswordMessage/SASL data: never read, never buffered
                        if t == _S:
                            self._push(SYNC, now, None)
                        if end > n:
                            self._c_skip = end - n
                            pos = n
                            break
                        pos = end
                        continue
                if ln - 4 > cap:
                    # over the cap: its head is all we keep; decode that, skip (forward) the rest
                    if pos + 5 + cap > n:
                        break  # collect the head
                    self._client_msg(t, data, pos + 5, pos + 5 + cap, now, True)
                    if end > n:
                        self._c_skip = end - n
                        pos = n
                        break
                    pos = end
                    continue
                if end > n:
                    break  # collect the rest of it
                new = self._client_msg(t, data, pos + 5, end, now, False)
                if new is not None:
                    if parts is None:
                        parts = []
                    parts.append(data[last:pos])
                    parts.append(new)
                    last = end
                pos = end
        except (_ProtoErr, IndexError, ValueError, struct.error) as e:
            self._fail(True, data, pos, str(e))
            return self._out(data, out_from, n, parts, last, rewriting)
        if len(self._pending) > MAX_PENDING:  # checked per chunk: the queue stays bounded
            self._fail(True, data, pos, f"over {MAX_PENDING} client messages await an answer")
            return self._out(data, out_from, n, parts, last, rewriting)
        if pos < n:
            self._c_buf = data[pos:]
            # hold back only what may still be rewritten: a header or a Query/Parse
            self._c_held = self.rewriting and (
                self._c_startup or n - pos < 5 or data[pos] in (_Q, _P)
            )
        self._c_off += pos
        return self._out(data, out_from, pos if self._c_held else n, parts, last, rewriting)

    def _out(
        self,
        data: bytes,
        out_from: int,
        end: int,
        parts: list[bytes] | None,
        last: int,
        rewriting: bool,
    ) -> bytes:
        if not rewriting:  # the caller forwarded it already: this is its own chunk
            return data[out_from:] if out_from else data
        if parts is None:
            return data[out_from:end] if (out_from or end != len(data)) else data
        parts.append(data[last:end])
        return b"".join(parts)

    def feed_server(self, data: bytes) -> None:
        """Decode server bytes (already forwarded to the client)."""
        if self.passthrough:
            return
        k = self._s_skip
        if k:
            n = len(data)
            if n <= k:
                self._s_skip = k - n
                self._s_off += n
                return
            self._s_skip = 0
            pos = k
        else:
            pos = 0
            if self._s_buf:
                data = self._s_buf + data
                self._s_buf = b""
        now = self._clock()
        n = len(data)
        try:
            if self._s_neg:
                pos = self._negotiation_answer(data, pos, now)
                if self.passthrough:
                    return
            while n - pos >= 5:
                t, ln = _BI.unpack_from(data, pos)
                end = pos + 1 + ln
                if t == 68:  # DataRow: the hot one; counted, never read
                    if ln < 4 or ln > MAX_MESSAGE:
                        raise _ProtoErr(self._bad_header("server", t, ln))
                    self._rows += 1
                    if end > n:
                        self._s_skip = end - n
                        pos = n
                        break
                    pos = end
                    continue
                if end <= n and 4 <= ln <= 4096:
                    # the rest of a usual result, whole in this chunk: no generic dispatch
                    if t == 67:  # CommandComplete
                        if data[end - 1] != 0:
                            raise _ProtoErr("CommandComplete tag is not NUL-terminated")
                        self._complete(data[pos + 5 : end - 1], now)
                        pos = end
                        continue
                    if t == 90 and ln == 5:  # ReadyForQuery
                        self._ready(data[pos + 5], now)
                        pos = end
                        continue
                    if t == 84:  # RowDescription: answers a Describe, or heads a result
                        pend = self._pending
                        if pend and pend[0][0] == DESCRIBE:
                            pend.popleft()
                        pos = end
                        continue
                if ln < 4 or ln > MAX_MESSAGE or t not in _S_KNOWN:
                    raise _ProtoErr(self._bad_header("server", t, ln))
                cap = self._s_cap.get(t)
                if cap is None:
                    self._server_simple(t, now)
                    if self.passthrough:
                        return
                    if end > n:
                        self._s_skip = end - n
                        pos = n
                        break
                    pos = end
                    continue
                if ln - 4 > cap:
                    if pos + 5 + cap > n:
                        break
                    self._server_msg(t, data, pos + 5, pos + 5 + cap, now)
                    if end > n:
                        self._s_skip = end - n
                        pos = n
                        break
                    pos = end
                    continue
                if end > n:
                    break
                self._server_msg(t, data, pos + 5, end, now)
                pos = end
                if self.passthrough:
                    return
        except (_ProtoErr, IndexError, ValueError, struct.error) as e:
            self._fail(False, data, pos, str(e))
            return
        if pos < n:
            self._s_buf = data[pos:]
        self._s_off += pos

    def _negotiation_answer(self, data: bytes, pos: int, now: int) -> int:
        """The server's one-byte answers to SSL/GSSENC requests the client sent through."""
        n = len(data)
        while self._s_neg and pos < n:
            b = data[pos]
            if b == 0x4E:  # 'N': no TLS / no GSS encryption; carry on in plaintext
                self._s_neg -= 1
                pos += 1
            elif b in (0x53, 0x47):  # 'S' / 'G': encrypted from here on
                self._s_neg = 0
                self._note(
                    now,
                    "postgres.encrypted_passthrough",
                    "the server accepted the client's encryption request; the session"
                    " is encrypted end to end and is relayed without decoding",
                )
                self.passthrough = True
            else:
                self._s_neg = 0  # an ErrorResponse: decoded as a message
        return pos

    def close(self, reason: str) -> None:
        """The connection ended: finish in-flight statements as they stand."""
        now = self._clock()
        if not self.passthrough:
            for p in list(self._portals.values()):
                if p.suspended:
                    self._emit_portal(p, now)
            # the statement in flight (those queued behind it never ran)
            for kind, ts, obj, _ in self._pending if not self._aborted else ():
                if kind in (QUERY, EXECUTE, FUNC):
                    portal = obj if isinstance(obj, _Portal) else None
                    stmt = portal.stmt if portal is not None else obj
                    if isinstance(stmt, _Stmt):
                        self._statement(
                            kind,
                            stmt,
                            portal,
                            self._q_ts or ts,
                            now,
                            "error",
                            None,
                            f"connection closed before the response completed ({reason})",
                            self._rows or None,
                            None,
                            self._warn,
                        )
                    break
            self._pending.clear()
        # finished statements still waiting for a ReadyForQuery (also after a protocol error)
        emit = self._emit
        for ev in self._held:
            emit(ev)
        self._held.clear()
        self._shared.forget(self.backend_pid, self.conn)

    # --- client: startup phase -------------------------------------------------------------

    def _client_startup(
        self, data: bytes, pos: int, now: int
    ) -> tuple[int, list[bytes] | None, int]:
        """Untyped startup packets; returns (pos, parts, last) for the output."""
        n = len(data)
        parts: list[bytes] | None = None
        last = 0
        while self._c_startup and n - pos >= 4:
            if self._c_off + pos == 0 and data[0] == 0x16:
                self._direct_tls(data, now)
                return (0 if self.tls_request else n), None, 0
            (ln,) = _I.unpack_from(data, pos)
            if ln < 8 or ln > MAX_STARTUP_PACKET:
                raise _ProtoErr(
                    f"startup packet length {ln} out of range (8..{MAX_STARTUP_PACKET})"
                )
            if pos + ln > n:
                break
            (code,) = _I.unpack_from(data, pos + 4)
            if code in (SSL_REQUEST, GSSENC_REQUEST) and ln == 8:
                if self.ssl_policy == "forward":
                    self._s_neg += 1
                    pos += 8
                    continue
                if parts is None:
                    parts = []
                parts.append(data[last:pos])
                pos += 8
                last = pos
                if code == SSL_REQUEST and self.ssl_policy == "accept" and not self.client_tls:
                    self._answer(b"S")
                    self.tls_request = True
                    self.client_tls = True
                    self._leftover = data[pos:]
                    return pos, parts, last
                self._answer(b"N")
                if code == SSL_REQUEST:
                    self.ssl_refused = True
                    self._note(
                        now,
                        "postgres.ssl_refused",
                        "the client asked for TLS (SSLRequest); sniff answered 'N' because the"
                        " proxy has no tls option, so the session continues in plaintext",
                    )
                continue
            if code == CANCEL_REQUEST and 16 <= ln <= 12 + 256:
                (pid,) = _I.unpack_from(data, pos + 8)  # the secret key after it is never read
                self._emit(PostgresCancel(now, self.conn, pid, self._shared.pids.get(pid)))
                self._c_startup = False
                self.startup_done = True
                self.rewriting = self.inject  # nothing else will come
                self.passthrough = True
                return n, parts, last
            if code >> 16 == 3:
                self._startup_message(data, pos + 8, pos + ln, code, now)
                pos += ln
                self._c_startup = False
                self.startup_done = True
                self.ssl_refused = False
                self.rewriting = self.inject
                break
            raise _ProtoErr(
                f"unsupported startup packet (code {code >> 16}.{code & 0xFFFF}, length {ln});"
                " sniff speaks protocol 3"
            )
        return pos, parts, last

    def _direct_tls(self, data: bytes, now: int) -> None:
        if self.ssl_policy == "accept":
            self.tls_request = True
            self.client_tls = True
            self._leftover = data
            return
        self._note(
            now,
            "postgres.direct_tls_passthrough",
            "the client opened with TLS directly (sslnegotiation=direct); without the tls option"
            " sniff cannot read it, so the connection is relayed without decoding",
        )
        log.warning(
            "%s: a client opened with TLS directly (sslnegotiation=direct): relayed undecoded;"
            " set the tls option (cert, key) on this [[proxy]] to terminate TLS and trace it",
            self.proxy_name,
        )
        self.rewriting = False
        self.passthrough = True

    def _answer(self, b: bytes) -> None:
        if self._reply is None:
            raise _ProtoErr("cannot answer an SSL/GSSENC request (no reply channel)")
        self._reply(b)

    def _startup_message(self, data: bytes, start: int, end: int, code: int, now: int) -> None:
        params: dict[str, str] = {}
        i = start
        while i < end and data[i] != 0:
            j = data.index(0, i, end)
            k = data.index(0, j + 1, end)
            params[data[i:j].decode("utf-8", "replace")] = data[j + 1 : k].decode(
                "utf-8", "replace"
            )
            i = k + 1
        if i >= end:
            raise _ProtoErr("StartupMessage parameters are not terminated")
        self.protocol = f"{code >> 16}.{code & 0xFFFF}"
        self.user = params.get("user")
        self.database = params.get("database") or self.user
        self.application_name = params.get("application_name")
        enc = params.get("client_encoding")
        if enc:
            self._set_encoding(enc)
        self._startup_ts = now
        attrs = {"protocol": self.protocol}
        for key in ("application_name", "user", "database", "replication"):
            v = params.get(key) if key != "database" else self.database
            if v:
                attrs[key] = v
        self._emit(ConnIdentity(now, self.conn, "postgres.startup", attrs))
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            self._note(
                now,
                "postgres.replication",
                "a replication connection: relayed without decoding after startup",
            )
            self.passthrough = True

    # --- client: typed messages --------------------------------------------------------------

    def _push(self, kind: int, ts: int, obj: _Payload) -> None:
        self._c_seq += 1
        self._pending.append((kind, ts, obj, self._c_seq))

    def _client_msg(
        self, t: int, data: bytes, start: int, end: int, now: int, truncated: bool
    ) -> bytes | None:
        """A collected client message; returns its replacement, if rewritten.

        ``truncated``: only the head of the message was collected (it is over the cap)."""
        # statement and portal names stay bytes: dict keys, decoded only for events
        if t == _Q:
            stop = end - 1 if not truncated else end
            if not truncated and data[stop] != 0:
                raise _ProtoErr("Query text is not NUL-terminated")
            raw = data[start:stop]
            stmt = self._new_stmt(None, raw, truncated)
            new = self._tag(stmt, raw, now, truncated) if self.inject else None
            seq = self._c_seq = self._c_seq + 1
            self._pending.append((QUERY, now, stmt, seq))
            if new is None:
                return None
            return b"Q" + _I.pack(4 + len(new) + 1) + new + b"\x00"
        if t == _B:
            i = data.index(0, start, end)
            pname = data[start:i]
            sname = data[i + 1 : data.index(0, i + 1, end)]
            bound = self._stmts.get(sname)
            stmt = bound if bound is not None else self._new_stmt(sname, b"", False)
            portals = self._portals
            old = portals.get(pname)
            if old is not None and old.suspended:
                self._emit_portal(old, now)
            seq = self._c_seq = self._c_seq + 1
            portal = portals[pname] = _Portal(pname, stmt, seq, data[start:end])
            self._pending.append((BIND, now, portal, seq))
            return None
        if t == _E:
            pname = data[start : data.index(0, start, end)]
            ep = self._portals.get(pname)
            if ep is None:
                ep = self._portals[pname] = _Portal(pname, _Stmt(None, ""), self._c_seq + 1)
            seq = self._c_seq = self._c_seq + 1
            self._pending.append((EXECUTE, now, ep, seq))
            return None
        if t == _P:
            i = data.index(0, start, end)
            name = data[start:i]
            j = data.find(0, i + 1, end)
            if j < 0:
                if not truncated:
                    raise _ProtoErr("Parse text is not NUL-terminated")
                j = end
            raw = data[i + 1 : j]
            stmt = self._new_stmt(name, raw, truncated)
            if self.keep_literals and end - j >= 3:
                (nt,) = _H.unpack_from(data, j + 1)
                if nt and j + 3 + 4 * nt <= end:
                    stmt.types = struct.unpack_from(f">{nt}I", data, j + 3)
            new = self._tag(stmt, raw, now, truncated) if self.inject else None
            stmts = self._stmts
            if name in stmts:
                del stmts[name]
            elif len(stmts) >= MAX_STATEMENTS:
                del stmts[next(iter(stmts))]
            stmts[name] = stmt
            self._push(PARSE, now, stmt)
            if new is None:
                return None
            body = data[start : i + 1] + new + data[j:end]
            return b"P" + _I.pack(4 + len(body)) + body
        if t == _D:
            kind = data[start]
            name = data[start + 1 : data.index(0, start + 1, end)]
            if kind == 0x53:
                obj = self._stmts.get(name) or self._new_stmt(name, b"", False)
            elif kind == 0x50:
                p = self._portals.get(name)
                obj = p.stmt if p is not None else _Stmt(None, "")
            else:
                raise _ProtoErr(f"Describe of unknown kind {kind!r}")
            self._push(DESCRIBE, now, obj)
            return None
        if t == _C:
            kind = data[start]
            name = data[start + 1 : data.index(0, start + 1, end)]
            if kind == 0x53:
                target = _Close(name, self._stmts.get(name), None)
            elif kind == 0x50:
                target = _Close(name, None, self._portals.get(name))
            else:
                raise _ProtoErr(f"Close of unknown kind {kind!r}")
            self._push(CLOSE, now, target)
            return None
        if t == _F:
            (oid,) = _I.unpack_from(data, start)
            self._push(FUNC, now, _Stmt(None, f"-- function call (oid {oid})"))
            return None
        if t == _p:  # SASLInitialResponse: only the mechanism name, the data is never read
            self._sasl_peek = False
            j = data.find(0, start, end)
            if j > start:
                self.auth = data[start:j].decode("ascii", "replace").lower()
            return None
        raise _ProtoErr(f"client message {chr(t)!r} is not expected here")  # pragma: no cover

    def _new_stmt(self, name: bytes | None, raw: bytes, truncated: bool) -> _Stmt:
        """A statement whose text is the first ``max_statement_bytes`` of ``raw``."""
        cut = len(raw) > self.max_statement
        text = (raw[: self.max_statement] if cut else raw).decode(self._enc, "replace")
        return _Stmt(
            name.decode(self._enc, "replace") or None if name else None, text, cut or truncated
        )

    def _tag(self, stmt: _Stmt, raw: bytes, now: int, truncated: bool) -> bytes | None:
        """sqlcommenter: the tagged text for ``raw``, or None to leave it alone."""
        if has_traceparent(raw):
            return None  # an instrumented application's own tag: prepare() reads it
        if truncated:
            self._note(
                now,
                "postgres.inject_skipped",
                f"a statement over {TAG_HOLD_MAX} bytes is forwarded untagged",
            )
            return None
        trace = self._trace_id()
        span = self._span_id()
        tp = ids.format_traceparent(trace, span)
        new = tag_sql_bytes(raw, tp)
        if new is not None:
            stmt.tp = tp
            stmt.span = span
            stmt.trace = trace
        return new

    # --- server ------------------------------------------------------------------------------

    def _server_simple(self, t: int, now: int) -> None:
        """Server messages acted on from their type alone (body skipped)."""
        pend = self._pending
        if t == _T:  # RowDescription: answers a Describe, or heads a Query's result
            if pend and pend[0][0] == DESCRIBE:
                pend.popleft()
        elif t == _ParseComplete:
            self._expect(PARSE, "ParseComplete")
        elif t == _BindComplete:
            self._expect(BIND, "BindComplete")
        elif t == _n:
            self._expect(DESCRIBE, "NoData")
        elif t == _t:  # ParameterDescription: a RowDescription or NoData follows
            if not pend or pend[0][0] != DESCRIBE:
                raise _ProtoErr("ParameterDescription without a pending Describe")
        elif t == _CloseComplete:
            c = cast(_Close, self._expect(CLOSE, "CloseComplete")[2])
            if c.stmt is not None and self._stmts.get(c.name) is c.stmt:
                del self._stmts[c.name]
            elif c.portal is not None and self._portals.get(c.name) is c.portal:
                del self._portals[c.name]
                if c.portal.suspended:
                    self._emit_portal(c.portal, now)
        elif t == _s:  # PortalSuspended: an Execute hit its row limit
            op = self._expect(EXECUTE, "PortalSuspended")
            p = cast(_Portal, op[2])
            if not p.suspended:
                p.suspended = True
                p.susp_ts = op[1]
            p.rows += self._rows
            p.warn += self._warn
            p.susp_end = now
            self._rows = self._warn = 0
        elif t == _I_:
            self._complete(None, now)
        elif t == _N:
            self._warn += 1
        elif t == _G:
            self._copy_out = False
        elif t == 72:  # 'H' CopyOutResponse
            self._copy_out = True
        elif t == _V:
            self._complete(None, now)
        elif t == _W:
            self._note(
                now,
                "postgres.copy_both",
                "CopyBothResponse (replication stream): relayed without decoding from here on",
            )
            self.passthrough = True
        # CopyData, CopyDone: nothing to do

    def _expect(self, kind: int, what: str) -> _Op:
        pend = self._pending
        if not pend or pend[0][0] != kind:
            got = _COMMAND[pend[0][0]] if pend else "nothing"
            raise _ProtoErr(f"{what} while the next pending client message is {got}")
        return pend.popleft()

    def _server_msg(self, t: int, data: bytes, start: int, end: int, now: int) -> None:
        if t == _C:
            j = data.find(0, start, end)
            self._complete(data[start : j if j >= 0 else end], now)
        elif t == _Z:
            self._ready(data[start] if end > start else 0x49, now)
        elif t == _E:
            self._error(data, start, end, now)
        elif t == _R:
            self._auth(data, start, end)
        elif t == _S:
            i = data.index(0, start, end)
            j = data.find(0, i + 1, end)
            name = data[start:i].decode("utf-8", "replace")
            value = data[i + 1 : j if j >= 0 else end].decode("utf-8", "replace")
            if name == "server_version":
                self.server_version = value
            elif name == "client_encoding":
                self._set_encoding(value)
            elif name == "application_name":
                self.application_name = value
        elif t == _K:
            (pid,) = _I.unpack_from(data, start)  # the secret key after it is never read
            self.backend_pid = pid
            self._shared.register(pid, self.conn)
        elif t == _A:
            (pid,) = _I.unpack_from(data, start)
            i = data.index(0, start + 4, end)
            channel = data[start + 4 : i].decode(self._enc, "replace")
            j = data.find(0, i + 1, end)
            payload_end = j if j >= 0 else end
            size = payload_end - i - 1
            payload = (
                data[i + 1 : payload_end].decode(self._enc, "replace")
                if self.keep_literals
                else None
            )
            self._emit(PostgresNotification(now, self.conn, channel, pid, size, payload))
        elif t == _t:  # ParameterDescription (collected only when literals are kept)
            pend = self._pending
            if not pend or pend[0][0] != DESCRIBE:
                raise _ProtoErr("ParameterDescription without a pending Describe")
            (nt,) = _H.unpack_from(data, start)
            stmt = pend[0][2]
            if nt and isinstance(stmt, _Stmt):
                stmt.types = struct.unpack_from(f">{nt}I", data, start + 2)
        elif t == _v:
            (minor,) = _I.unpack_from(data, start)
            self.protocol = f"{self.protocol.split('.')[0]}.{minor}"

    def _auth(self, data: bytes, start: int, end: int) -> None:
        (code,) = _I.unpack_from(data, start)
        if code in (11, 12, 8):  # SASL continue/final, GSS continue: secret exchange data
            return
        if code == 0:
            return
        name = _AUTH.get(code)
        if name is None:
            raise _ProtoErr(f"unknown authentication request {code}")
        self.auth = name
        if code == 10:
            self._sasl_peek = True

    def _set_encoding(self, name: str) -> None:
        self._enc = _ENCODINGS.get(name.upper().replace("-", "").replace("_", ""), "utf-8")

    def _ready(self, status: int, now: int) -> None:
        pend = self._pending
        if not self.ready:
            if pend:
                raise _ProtoErr("ReadyForQuery before the startup finished with messages pending")
            self.ready = True
            self._session(now, "ok", None, None)
            return
        if self._aborted:
            while pend and pend[0][0] not in (SYNC, QUERY, FUNC):
                pend.popleft()
            self._aborted = False
        if not pend or pend[0][0] not in (SYNC, QUERY, FUNC):
            got = _COMMAND[pend[0][0]] if pend else "nothing"
            raise _ProtoErr(f"ReadyForQuery while the next pending client message is {got}")
        op = pend.popleft()
        self._q_ts = 0
        self._rows = self._warn = 0
        if status == 0x49 and self._portals:  # 'I': idle, every portal is gone
            seq = op[3]
            for name, p in list(self._portals.items()):
                if p.seq < seq:
                    if p.suspended:
                        self._emit_portal(p, now)
                    del self._portals[name]
        q = self._q_events
        if q:
            if len(q) > 1:  # a multi-statement Query: prepare() cuts out each one's text
                n = len(q)
                for k, ev in enumerate(q):
                    ev.batch = k
                    ev.batch_size = n
            self._q_events = []
        self._release(status != 0x49)

    def _release(self, in_txn: bool) -> None:
        """Emit the statements finished since the last ReadyForQuery, with their transaction.

        Like the MySQL proxy: statements outside an explicit transaction block have
        none; a block gets a number when it opens and its last statement ends it."""
        held = self._held
        if not held:
            self._in_txn = in_txn
            return
        before = self._in_txn
        self._in_txn = in_txn
        if before or in_txn:
            if not before:
                self._txn_no += 1
            no = self._txn_no
            for ev in held:
                ev.transaction = no
            if not in_txn:
                held[-1].transaction_end = True
        emit = self._emit
        for ev in held:
            emit(ev)
        held.clear()

    def _complete(self, tag: bytes | None, now: int) -> None:
        """CommandComplete (tag), EmptyQueryResponse or FunctionCallResponse (None)."""
        pend = self._pending
        if not pend:
            raise _ProtoErr("a command completed with no pending Query or Execute")
        kind, ts, obj, _ = pend[0]
        rows = self._rows
        warn = self._warn
        portal: _Portal | None = None
        if kind == EXECUTE:
            pend.popleft()
            p: _Portal = obj  # type: ignore[assignment]
            portal = p
            stmt = p.stmt
            if p.suspended:
                ts = p.susp_ts
                rows += p.rows
                warn += p.warn
                p.suspended = False
                p.rows = p.warn = 0
        elif kind in (QUERY, FUNC):
            stmt = obj  # type: ignore[assignment]
            if self._q_ts:
                ts = self._q_ts  # the previous statement of a multi-statement Query ended
            self._q_ts = now
        else:
            raise _ProtoErr(
                f"a command completed while the next pending message is {_COMMAND[kind]}"
            )
        rows_ret: int | None = None
        rows_aff: int | None = None
        if tag is not None:
            _, _, count = tag.rpartition(b" ")
            if count.isdigit():
                c = int(count)
                first = tag[:4]
                if first in (b"SELE", b"FETC"):
                    if rows or not c:
                        rows_ret = rows
                    else:
                        rows_aff = c  # CREATE TABLE AS / SELECT INTO
                elif first == b"COPY":
                    if self._copy_out:
                        rows_ret = c
                    else:
                        rows_aff = c
                elif first != b"MOVE":
                    rows_aff = c  # INSERT, UPDATE, DELETE, MERGE
            elif rows:
                rows_ret = rows
        elif rows:
            rows_ret = rows
        self._rows = self._warn = 0
        self._copy_out = False
        self._statement(kind, stmt, portal, ts, now, "ok", None, None, rows_ret, rows_aff, warn)

    def _error(self, data: bytes, start: int, end: int, now: int) -> None:
        code, message, severity = self._error_fields(data, start, end)
        pend = self._pending
        if not self.ready and not pend:
            self._session(now, "error", code, message)
            return
        if self._aborted:
            raise _ProtoErr("ErrorResponse while the server is skipping to Sync")
        if not pend or pend[0][0] == SYNC:
            # not about a command: an asynchronous FATAL (shutdown, termination)
            self._note(
                now,
                "postgres.server_error",
                f"{severity or 'ERROR'} {code or ''}: {message or ''}".strip(),
            )
            return
        kind, ts, obj, _ = pend[0]
        rows = self._rows
        warn = self._warn
        self._rows = self._warn = 0
        self._copy_out = False
        portal: _Portal | None = None
        if kind in (QUERY, FUNC):
            stmt = cast(_Stmt, obj)
            if self._q_ts:
                ts = self._q_ts
            self._q_ts = now
            # the rest of a multi-statement Query is not run; ReadyForQuery follows
        else:
            pend.popleft()
            self._aborted = True  # the server skips everything up to the next Sync
            if kind in (EXECUTE, BIND):
                portal = cast(_Portal, obj)
                stmt = portal.stmt
                if portal.suspended:
                    ts = portal.susp_ts
                    rows += portal.rows
                    warn += portal.warn
                    portal.suspended = False
            elif kind == CLOSE:
                c = cast(_Close, obj)
                stmt = c.portal.stmt if c.portal else c.stmt or _Stmt(c.name.decode() or None, "")
            else:  # PARSE, DESCRIBE
                stmt = cast(_Stmt, obj)
        self._statement(
            kind, stmt, portal, ts, now, "error", code, message, rows or None, None, warn
        )

    @staticmethod
    def _error_fields(
        data: bytes, start: int, end: int
    ) -> tuple[str | None, str | None, str | None]:
        code = message = severity = None
        i = start
        while i < end:
            f = data[i]
            if f == 0:
                break
            j = data.find(0, i + 1, end)
            if j < 0:
                j = end
            if f == 0x43:  # C: SQLSTATE
                code = data[i + 1 : j].decode("ascii", "replace")
            elif f == 0x4D:  # M: message
                message = data[i + 1 : j].decode("utf-8", "replace")
            elif f == 0x56 or (f == 0x53 and severity is None):  # V/S: severity
                severity = data[i + 1 : j].decode("ascii", "replace")
            i = j + 1
        return code, message, severity

    # --- events --------------------------------------------------------------------------------

    def _statement(
        self,
        kind: int,
        stmt: _Stmt,
        portal: _Portal | None,
        ts: int,
        now: int,
        status: str,
        code: str | None,
        message: str | None,
        rows_ret: int | None,
        rows_aff: int | None,
        warn: int,
    ) -> None:
        """One statement execution finished: its event, held until ReadyForQuery."""
        span = stmt.span
        if span is None:
            span = self._span_id()
            tp = trace = None
        else:  # sniff's sqlcommenter tag names the statement's first execution
            tp, trace = stmt.tp, stmt.trace
            stmt.span = stmt.tp = stmt.trace = None
        bind = portal.bind if portal is not None else None
        params = parse_bind(bind, stmt.types, self._enc) if bind and self.keep_literals else None
        ev = PostgresQuery(
            ts,
            self.conn,
            "postgresql",
            self.database,
            _COMMAND[kind],
            stmt.text,
            self.keep_literals,
            now,
            status,
            code,
            message,
            rows_ret,
            rows_aff,
            span,
            stmt.name,
            tp,
            warn or None,
            None,  # batch, batch_size: set at ReadyForQuery for multi-statement Queries
            None,
            trace,
            tp is not None,
            stmt.truncated,
            params,
            None,  # transaction, transaction_end: set at ReadyForQuery
            False,
            None,
            bind,  # id_scan: the bound values, scanned for shared ids then dropped by prepare()
        )
        held = self._held
        held.append(ev)
        if len(held) >= MAX_HELD:
            self._release(self._in_txn)
        if kind == QUERY:
            self._q_events.append(ev)

    def _emit_portal(self, p: _Portal, now: int) -> None:
        """A suspended portal ends without completing (closed, transaction over)."""
        ts, end = p.susp_ts, p.susp_end
        rows, warn = p.rows, p.warn
        p.suspended = False
        p.rows = p.warn = 0
        self._statement(EXECUTE, p.stmt, p, ts, end, "ok", None, None, rows, None, warn)

    def _session(self, now: int, status: str, code: str | None, message: str | None) -> None:
        self._emit(
            PostgresSession(
                self._startup_ts or now,
                self.conn,
                self.database,
                self.user,
                self.application_name,
                self.auth,
                self.protocol,
                self.server_version,
                self.backend_pid,
                self.client_tls,
                self.upstream_tls,
                now,
                status,
                code,
                message,
            )
        )

    def _note(self, now: int, code: str, message: str) -> None:
        self._emit(Note(now, self.conn, code, message))

    @staticmethod
    def _bad_header(side: str, t: int, ln: int) -> str:
        if 32 <= t < 127:
            return f"bad {side} message header: type {chr(t)!r}, length {ln}"
        return f"bad {side} message header: type 0x{t:02x}, length {ln}"

    def _fail(self, c2s: bool, data: bytes, pos: int, reason: str) -> None:
        self.passthrough = True
        off = (self._c_off if c2s else self._s_off) + pos
        # until the session is up the bytes may be credentials: show the header only
        context = data[pos : pos + (32 if self.ready else 5)].hex()
        self._emit(
            ProtocolError(
                self._clock(),
                self.conn,
                "postgres",
                "c2s" if c2s else "s2c",
                off,
                reason,
                context,
            )
        )
        self._c_skip = self._s_skip = 0
        self._s_buf = b""
        if not self._c_held:
            self._c_buf = b""
