"""Sans-IO MySQL/MariaDB decoder for one connection, both directions.

Strategy. Bytes go in (``feed_client`` / ``feed_server``), events come out
through ``emit``; no sockets, no clock of its own (one is passed in). The wire is
a sequence of packets, each a 3-byte little-endian length, a sequence id and the
payload; a payload of exactly 16 MiB - 1 continues in the next packet.

*Only what is needed is read.* Framing walks packet headers; a packet's payload
is buffered only when the protocol state says its content matters (a command,
OK/ERR/EOF, the greeting, a column count) and then only up to a bound (a
statement's first ``max_statement_bytes``). Everything else is skipped by length
without copying: column definitions are counted, rows are counted from their
first byte alone (a tight loop, the only per-packet work on big result sets),
LOAD DATA file contents, long data and authentication exchanges are stepped over.
A partial packet at the end of a chunk is kept only when its content is wanted;
otherwise the decoder just remembers how many bytes to skip.

*The conversation.* The client's commands (sequence id 0) are queued; the server
answers them strictly in order, so each response belongs to the oldest pending
command (pipelined commands, MariaDB's PREPARE+EXECUTE "execute direct" with
statement id -1, and commands without answers - COM_STMT_CLOSE, SEND_LONG_DATA,
QUIT - are all handled). Non-zero sequence ids from the client are the data of
the current exchange (auth responses, LOCAL INFILE contents). A response ends at
an OK or ERR, or at a result set's terminator (EOF, or the OK that replaces it
with CLIENT_DEPRECATE_EOF) without SERVER_MORE_RESULTS_EXISTS. MariaDB progress
reports (ERR 0xFFFF) and cached result-set metadata (MARIADB_CLIENT_CACHE_METADATA,
MySQL's CLIENT_OPTIONAL_RESULTSET_METADATA) are understood. Each statement
execution becomes one ``mysql.query`` event when its response is complete; other
commands become ``mysql.command``; the login becomes ``mysql.connect``.

*Edits*, all deliberate and few: the server greeting's CLIENT_SSL bit is cleared
(or set when sniff terminates TLS) and CLIENT_COMPRESS/ZSTD are cleared, in
place, same length; with ``sqlcommenter`` a COM_QUERY gets
``/*traceparent='...'*/`` appended (length header rewritten, sequence ids
unchanged); when sniff terminates the client's TLS but talks plaintext
upstream, the handshake packets' sequence ids are shifted by one to hide the
SSLRequest the server never saw. ``feed_*`` return the bytes to forward: the
input, minus a held-back partial packet that may still be edited, with edits.

*Fast path.* Profiling showed the per-packet generality costing more than the
relay itself, so the two commonest shapes take straight-line code: a chunk that is
exactly one COM_QUERY, and a chunk holding a whole plain answer (OK packets, small
result sets, several with SERVER_MORE_RESULTS_EXISTS). Anything else (answers
split across chunks, errors, cursors, LOCAL INFILE, 16 MiB packets) goes through
the general state machine; the fixture tests feed every transcript whole and split
at every offset, so both paths must give the same events.

*Failures.* Anything unexpected emits one ``ProtocolError`` and turns the whole
connection into passthrough: held bytes are released unchanged and nothing is
decoded again. The decoder never raises.

*Secrets.* The scramble in the greeting, auth responses, auth-switch data and
caching_sha2 exchanges are skipped by length, never copied into an event.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Callable

from proxies.mysql import packets as P
from proxies.mysql.events import MysqlCommand, MysqlConnect
from proxies.sql.events import MysqlQuery
from proxies.sql.sqlcommenter import tag_payload
from sniff import ids
from sniff.events import ConnIdentity, Event, Note, ProtocolError

log = logging.getLogger("sniff.mysql")

# phases of the connection (both directions)
PH_GREETING = 0  # waiting for the server's handshake
PH_HANDSHAKE = 1  # waiting for the client's handshake response (or SSLRequest)
PH_AUTH = 2  # authentication exchange in progress
PH_COMMAND = 3  # command phase
PH_DONE = 4  # login failed or COM_QUIT: nothing more to decode

# server-response states in the command phase
S_RESULT = 0  # first packet of the oldest pending command's (next) response
S_SKIP = 1  # skipping ``_skip_left`` definition packets, then ``_after_skip``
S_COLEOF = 2  # EOF after column definitions
S_ROWS = 3  # rows until a terminator
S_PREP_PARAMS_EOF = 4
S_PREP_COLS = 5
S_PREP_COLS_EOF = 6
S_FIELDS = 7  # COM_FIELD_LIST definitions until EOF
S_AUTH = 8  # COM_CHANGE_USER authentication exchange

_HANDSHAKE_MAX = 64 * 1024
_COMMAND_MAX = 64 * 1024  # prefix kept of commands other than COM_QUERY/EXECUTE
_SERVER_PACKET_MAX = 1 << 20  # OK/ERR/EOF/greeting/column count: always far smaller
_PENDING_MAX = 100_000
_STMTS_MAX = 100_000
_STMT_DIRECT = 0xFFFFFFFF
_DECODE_ERRORS = (P.PacketError, IndexError, struct.error, UnicodeDecodeError, ValueError)
_EOF = struct.Struct("<HH")
# bytes of an EXECUTE's parameters handed to prepare() to look for shared ids (then dropped):
# bounded so that a queue of events waiting for the capture writer stays small
_ID_SCAN_MAX = 8192


class MysqlShared:
    """State shared by every connection of one proxy: warnings logged once."""

    def __init__(self, proxy_name: str = "mysql") -> None:
        self.proxy_name = proxy_name
        self._logged: dict[str, float] = {}

    def warn(self, key: str, message: str, every_s: float = 0.0) -> bool:
        """Log ``message`` once (or at most every ``every_s`` seconds); True if logged."""
        now = time.monotonic()
        last = self._logged.get(key)
        if last is not None and (every_s <= 0 or now - last < every_s):
            return False
        self._logged[key] = now
        log.warning("%s: %s", self.proxy_name, message)
        return True


class _Dir:
    """Framing state of one direction."""

    __slots__ = ("buf", "c2s", "cont", "offset", "skip")

    def __init__(self, c2s: bool) -> None:
        self.c2s = c2s
        self.buf = b""  # partial header or wanted packet carried to the next chunk
        self.skip = 0  # payload bytes of the current packet to step over
        self.cont = False  # the next packet continues a 16 MiB logical packet
        self.offset = 0  # stream offset of the start of ``buf``


class _Stmt:
    __slots__ = ("long_data", "params", "text", "types")

    def __init__(self, text: str, params: int) -> None:
        self.text = text
        self.params = params
        self.types: list[int] | None = None
        self.long_data: dict[int, int] = {}


class _Result:
    __slots__ = ("affected", "err", "insert_id", "rows", "status", "ts_end", "warnings")

    def __init__(
        self,
        ts_end: int,
        rows: int | None,
        affected: int | None,
        warnings: int,
        insert_id: int | None,
        err: P.Err | None,
        status: int | None = None,
    ) -> None:
        self.status = status  # server status flags after this result (None: not reported)
        self.ts_end = ts_end
        self.rows = rows
        self.affected = affected
        self.warnings = warnings
        self.insert_id = insert_id
        self.err = err


class _Cmd:
    __slots__ = (
        "code",
        "db",
        "direct",
        "exec_payload",
        "flags",
        "infile",
        "infile_bytes",
        "injected",
        "kind",
        "long_data",
        "multi",
        "results",
        "rows",
        "span_id",
        "stmt_id",
        "text",
        "trace_id",
        "traceparent",
        "truncated",
        "ts",
        "use_db",
        "user",
    )

    def __init__(self, code: int, ts: int, span_id: str, db: str | None) -> None:
        self.code = code
        self.kind = P.RESPONSE_KIND.get(code, 0)
        self.ts = ts
        self.span_id = span_id
        self.db = db
        self.text: str | None = None
        self.truncated = False
        self.stmt_id: int | None = None
        self.direct: _Cmd | None = None  # execute-direct: the PREPARE it refers to
        self.exec_payload: bytes | None = None
        self.long_data: dict[int, int] | None = None
        self.flags = 0
        self.results: list[_Result] = []
        self.rows = 0
        self.multi = False  # COM_QUERY text with a ';' (maybe several statements)
        self.infile = False
        self.infile_bytes = 0
        self.trace_id: str | None = None
        self.traceparent: str | None = None
        self.injected = False
        self.use_db: str | None = None  # "USE x" in the text: the database if it succeeds
        self.user: P.ChangeUser | None = None


class MysqlDecoder:
    def __init__(
        self,
        conn: int,
        emit: Callable[[Event], None],
        *,
        keep_literals: bool = False,
        sqlcommenter: bool = False,
        max_statement_bytes: int = 65536,
        terminate_tls: bool = False,
        upstream_tls: str = "off",
        shared: MysqlShared | None = None,
        clock: Callable[[], int] = time.time_ns,
        new_span_id: Callable[[], str] = ids.new_span_id,
        new_trace_id: Callable[[], str] = ids.new_trace_id,
        release_client: Callable[[bytes], None] | None = None,
        release_server: Callable[[bytes], None] | None = None,
    ) -> None:
        self.conn = conn
        self._emit = emit
        self.keep_literals = keep_literals
        self.sqlcommenter = sqlcommenter
        self.max_statement = max(64, max_statement_bytes)
        self.terminate_tls = terminate_tls  # sniff is the client's TLS server
        self.upstream_tls = upstream_tls  # off | auto | require (with terminate_tls)
        self.shared = shared or MysqlShared()
        self._clock = clock
        self._span_id = new_span_id
        self._trace_id = new_trace_id
        self._release_client = release_client  # sends held client bytes upstream on failure
        self._release_server = release_server
        self.c = _Dir(True)
        self.s = _Dir(False)
        self.passthrough = False
        self.phase = PH_GREETING
        self.s_state = S_RESULT
        self._skip_left = 0
        self._after_skip = S_RESULT
        self._prep_cols = 0
        self.rows = 0
        self.server_caps = 0
        self.client_caps = 0
        self.caps = 0  # negotiated
        self.charset = 33
        self.enc = "utf-8"
        self.db_system = "mysql"
        self.server_version = ""
        self.connection_id = 0
        self.user: str | None = None
        self.database: str | None = None
        self.auth_plugin = ""
        self.greeting_seen = False
        self.ssl_stripped = False
        self.client_tls = False  # the client asked for TLS (SSLRequest)
        self.server_tls = False  # TLS towards the server (decided at the SSLRequest)
        self.shift_seq = False  # handshake seq ids shifted (client TLS, plaintext upstream)
        self.compress = False
        self._connect_ts = 0
        self._connect_span = ""
        self._pending: deque[_Cmd] = deque()
        self._stmts: dict[int, _Stmt] = {}
        self._last_prepare: _Cmd | None = None
        self.on_passthrough: Callable[[], None] | None = None  # the handler stops observing
        self._in_txn = False  # the server said SERVER_STATUS_IN_TRANS after the last statement
        self._txn_no = 0
        self.events = 0

    # --- public API ----------------------------------------------------------------------

    def feed_client(self, data: bytes) -> bytes:
        """Decode client bytes; return what to forward to the server."""
        if self.passthrough:
            if self.c.buf:
                data, self.c.buf = self.c.buf + data, b""
            return data
        c = self.c
        # fast path: the chunk is exactly one small COM_QUERY (what ORMs send all day)
        n = len(data)
        if (
            n > 5
            and data[4] == 3
            and data[3] == 0
            and not c.buf
            and not c.skip
            and not c.cont
            and self._fast_c
            and (data[0] | data[1] << 8 | data[2] << 16) == n - 4
            and n <= self.max_statement
        ):
            try:
                self._query(data, n)
            except Exception as e:
                return self._fail_client(data, 0, 0, None, e)
            c.offset += n
            return data
        return self._feed_client(data)

    def feed_server(self, data: bytes) -> bytes:
        """Decode server bytes; return what to forward to the client."""
        if self.passthrough:
            if self.s.buf:
                data, self.s.buf = self.s.buf + data, b""
            return data
        s = self.s
        if (
            self.s_state == S_RESULT
            and self._pending
            and not s.buf
            and not s.skip
            and not s.cont
            and self.phase == PH_COMMAND
            and self._pending[0].kind == P.RESP_RESULT
        ):
            try:
                end = self._fast_result(self._pending[0], data)
            except Exception as e:
                self._fail(s, data, 0, e)
                return data
            if end == len(data):
                s.offset += end
                return data
            if end:  # more after a complete response (pipelining): the general path
                s.offset += end
                return data[:end] + self._feed_server(data[end:])
        return self._feed_server(data)

    @property
    def _fast_c(self) -> bool:
        """The client fast path applies: command phase, no edits, no query attributes."""
        return (
            self.phase == PH_COMMAND
            and not self.sqlcommenter
            and not self.caps & P.CLIENT_QUERY_ATTRIBUTES
        )

    def _query(self, data: bytes, n: int) -> None:
        """A complete single-packet COM_QUERY (``data`` is the whole packet)."""
        if len(self._pending) >= _PENDING_MAX:
            raise P.PacketError(f"more than {_PENDING_MAX} commands without an answer")
        cmd = _Cmd(3, self._clock(), self._span_id(), self.database)
        raw = data[5:]
        text = raw.decode(self.enc, "replace")
        cmd.text = text
        if b";" in raw:
            cmd.multi = True
        if raw[:1] in (b"U", b"u") and text[:4].upper() in ("USE ", "USE`"):
            cmd.use_db = text[4:].strip().strip("`;").strip() or None
        self._pending.append(cmd)

    def _fast_result(self, cmd: _Cmd, data: bytes) -> int:
        """The whole answer to ``cmd`` when ``data`` holds all of it and it is plain (OK
        packets and small result sets, several if SERVER_MORE_RESULTS_EXISTS): its end
        offset, with the command completed. 0 (and nothing changed) otherwise: errors,
        LOCAL INFILE, cursors, 16 MiB packets and answers split across chunks are left
        to the general state machine."""
        n = len(data)
        pos = 0
        caps = self.caps
        deprecate = caps & P.CLIENT_DEPRECATE_EOF
        meta_flag = caps & (P.MARIADB_CLIENT_CACHE_METADATA | P.CLIENT_OPTIONAL_RESULTSET_METADATA)
        got: list[tuple[int | None, int | None, int, int | None, int, str | None]] = []
        unpack = _EOF.unpack_from
        while True:
            if n - pos < 5:
                return 0
            ln = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            end = pos + 4 + ln
            if ln >= P.MAX_PACKET or end > n:
                return 0
            h = data[pos + 4]
            if h == 0:
                if ln < 7:
                    return 0
                ok = P.parse_ok(data[pos + 4 : end], caps)
                status = ok.status
                got.append(
                    (None, ok.affected_rows, ok.warnings, ok.last_insert_id, status, ok.schema)
                )
                pos = end
            elif 0 < h < 0xFB:
                follows = not meta_flag or ln < 2 or data[pos + 5] != 0
                pos = end
                if follows:
                    for _ in range(h):
                        if n - pos < 4:
                            return 0
                        ln = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                        if ln >= P.MAX_PACKET:
                            return 0
                        pos += 4 + ln
                if not deprecate:  # the EOF after the column definitions
                    if n - pos < 9 or data[pos + 4] != 0xFE:
                        return 0
                    if (data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16) != 5:
                        return 0
                    if unpack(data, pos + 5)[1] & P.SERVER_STATUS_CURSOR_EXISTS:
                        return 0
                    pos += 9
                rows = 0
                while True:
                    if n - pos < 5:
                        return 0
                    ln = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                    first = data[pos + 4]
                    if first == 0xFE and ln < P.MAX_PACKET:
                        break
                    if first == 0xFF or ln >= P.MAX_PACKET:
                        return 0
                    rows += 1
                    pos += 4 + ln
                end = pos + 4 + ln
                if end > n:
                    return 0
                if deprecate:
                    ok = P.parse_ok(data[pos + 4 : end], caps)
                    status = ok.status
                    got.append(
                        (rows, ok.affected_rows or None, ok.warnings, None, status, ok.schema)
                    )
                else:
                    if ln < 5:
                        return 0
                    warnings, status = unpack(data, pos + 5)
                    got.append((rows, None, warnings, None, status, None))
                pos = end
            else:
                return 0
            if not status & P.SERVER_MORE_RESULTS_EXISTS:
                break
        now = self._clock()
        append = cmd.results.append
        for rows_, aff, warn, insert_id, status_, schema in got:
            append(_Result(now, rows_, aff, warn, insert_id, None, status_))
            if schema:
                self.database = schema
        if cmd.use_db:
            self.database = cmd.use_db
        self._pending.popleft()
        self.rows = 0
        self._emit_cmd(cmd)
        return pos

    def flush_client(self) -> bytes:
        """Release held-back client bytes unchanged (EOF, shutdown)."""
        held, self.c.buf = self.c.buf, b""
        return held

    def flush_server(self) -> bytes:
        held, self.s.buf = self.s.buf, b""
        return held

    def closed(self, reason: str) -> None:
        """The connection ended: finish in-flight commands, explain early hang-ups."""
        if self.passthrough:
            return
        now = self._clock()
        if self.phase == PH_HANDSHAKE and not self.client_tls:
            self._hangup_after_greeting(now)
        elif self.phase == PH_AUTH:
            self._connect_done(now, P.Err(0, None, f"connection closed during login ({reason})"))
        while self._pending:
            cmd = self._pending.popleft()
            err = P.Err(0, None, f"connection closed before the response ({reason})")
            cmd.results.append(_Result(now, cmd.rows or None, None, 0, None, err))
            self._emit_cmd(cmd)
        self.phase = PH_DONE

    # --- framing: client -> server -------------------------------------------------------

    def _feed_client(self, data: bytes) -> bytes:
        st = self.c
        if st.buf:
            data = st.buf + data
            st.buf = b""
        n = len(data)
        pos = 0
        last = 0  # bytes before ``last`` are in ``parts`` (only when edited)
        parts: list[bytes] | None = None
        now = self._clock()
        try:
            while pos < n:
                if st.skip:
                    take = st.skip if st.skip <= n - pos else n - pos
                    pos += take
                    st.skip -= take
                    continue
                if n - pos < 4:
                    break
                ln = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                seq = data[pos + 3]
                cont = st.cont
                st.cont = ln == P.MAX_PACKET
                phase = self.phase
                if phase == PH_COMMAND and not cont and seq == 0:
                    if ln == 0:
                        raise P.PacketError("empty command packet")
                    if n - pos < 5:
                        st.cont = cont
                        break
                    want = self._command_want(data[pos + 4], ln)
                elif phase == PH_HANDSHAKE and not cont:
                    if ln > _HANDSHAKE_MAX:
                        raise P.PacketError(f"handshake response of {ln} bytes")
                    want = ln
                else:
                    # auth data, LOCAL INFILE contents, continuations: step over
                    if phase == PH_COMMAND and self._pending and self._pending[-1].infile:
                        self._pending[-1].infile_bytes += ln
                    if self.shift_seq and phase in (PH_HANDSHAKE, PH_AUTH):
                        if parts is None:
                            parts = []
                        parts.append(data[last:pos])
                        parts.append(data[pos : pos + 3] + bytes(((seq - 1) & 0xFF,)))
                        last = pos + 4
                    pos += 4
                    st.skip = ln
                    continue
                end = pos + 4 + want
                if end > n:
                    st.cont = cont
                    break
                payload = data[pos + 4 : end]
                if phase == PH_COMMAND:
                    repl = self._client_command(payload, ln, seq, now)
                else:
                    repl = self._handshake_response(payload, seq, now)
                if repl is not None:
                    if parts is None:
                        parts = []
                    parts.append(data[last:pos])
                    parts.append(repl)
                    last = end
                pos = end
                st.skip = ln - want
                if self.passthrough:  # decided by the packet (compression, TLS, stream)
                    break
        except Exception as e:
            return self._fail_client(data, pos, last, parts, e)
        if pos < n and not self.passthrough:
            st.buf = data[pos:]
        st.offset += pos
        out_end = pos if not self.passthrough else n
        if parts is None:
            return data if out_end == n else data[:out_end]
        parts.append(data[last:out_end])
        return b"".join(parts)

    def _command_want(self, code: int, ln: int) -> int:
        if code == P.COM_QUERY:
            if self.sqlcommenter and ln < P.MAX_PACKET - 256:
                return ln  # whole packet: it may be edited
            return min(ln, self.max_statement + 1 + 256)
        if code in (P.COM_STMT_EXECUTE, P.COM_STMT_BULK_EXECUTE):
            return min(ln, self.max_statement)  # parameters: shared ids (and values, if kept)
        if code == P.COM_STMT_SEND_LONG_DATA:
            return min(ln, 7)
        if code == P.COM_STMT_PREPARE:
            return min(ln, self.max_statement + 1)
        return min(ln, _COMMAND_MAX)

    def _fail_client(
        self, data: bytes, pos: int, last: int, parts: list[bytes] | None, e: BaseException
    ) -> bytes:
        self._fail(self.c, data, pos, e)
        if parts is None:
            return data[last:] if last else data
        parts.append(data[last:])
        return b"".join(parts)

    # --- framing: server -> client -------------------------------------------------------

    def _feed_server(self, data: bytes) -> bytes:
        st = self.s
        if st.buf:
            data = st.buf + data
            st.buf = b""
        n = len(data)
        pos = 0
        last = 0
        parts: list[bytes] | None = None
        now = self._clock()
        try:
            while pos < n:
                if st.skip:
                    take = st.skip if st.skip <= n - pos else n - pos
                    pos += take
                    st.skip -= take
                    continue
                state = self.s_state
                if state == S_ROWS and self.phase == PH_COMMAND:
                    # the hot loop: count rows from their first byte, skip their bodies
                    rows = self.rows
                    cont = st.cont
                    while n - pos >= 5:
                        ln = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                        if not cont:
                            first = data[pos + 4]
                            if first == 0xFF or (first == 0xFE and ln < P.MAX_PACKET):
                                break  # terminator or error: read it whole below
                            rows += 1
                        cont = ln == P.MAX_PACKET
                        end = pos + 4 + ln
                        if end > n:
                            st.skip = end - n
                            pos = n
                            break
                        pos = end
                    self.rows = rows
                    st.cont = cont
                    if pos >= n:
                        continue
                    if n - pos < 5:
                        if n - pos == 4 and not (data[pos] | data[pos + 1] | data[pos + 2]):
                            raise P.PacketError("empty packet in a result set")
                        break
                    # a terminator at ``pos``: handled below
                if n - pos < 4:
                    break
                ln = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                seq = data[pos + 3]
                if st.cont:  # continuation of a logical packet we step over
                    st.cont = ln == P.MAX_PACKET
                    st.skip = ln
                    pos += 4
                    continue
                if self.s_state == S_SKIP and self.phase == PH_COMMAND:
                    # column / parameter definitions: count, never read
                    st.cont = ln == P.MAX_PACKET
                    st.skip = ln
                    pos += 4
                    self._skip_left -= 1
                    if self._skip_left <= 0:
                        self._skip_done(now)
                    continue
                if ln >= P.MAX_PACKET or ln > _SERVER_PACKET_MAX:
                    raise P.PacketError(f"unexpected {ln}-byte packet from the server")
                end = pos + 4 + ln
                if end > n:
                    break
                payload = data[pos + 4 : end]
                phase = self.phase
                repl = self._server_packet(payload, seq, now)
                if self.shift_seq and phase == PH_AUTH:
                    # the client counted the SSLRequest the server never saw
                    repl = P.packet(seq + 1, payload)
                if repl is not None:
                    if parts is None:
                        parts = []
                    parts.append(data[last:pos])
                    parts.append(repl)
                    last = end
                pos = end
                if self.passthrough:
                    break
        except Exception as e:
            self._fail(self.s, data, pos, e)
            if parts is None:
                return data[last:] if last else data
            parts.append(data[last:])
            return b"".join(parts)
        if pos < n and not self.passthrough:
            st.buf = data[pos:]
        st.offset += pos
        out_end = pos if not self.passthrough else n
        if parts is None:
            return data if out_end == n else data[:out_end]
        parts.append(data[last:out_end])
        return b"".join(parts)

    # --- failure -------------------------------------------------------------------------

    def _gone_passthrough(self) -> None:
        self.passthrough = True
        if self.on_passthrough is not None:
            self.on_passthrough()

    def _fail(self, st: _Dir, data: bytes, pos: int, e: BaseException) -> None:
        if isinstance(e, _DECODE_ERRORS):
            reason = str(e) or type(e).__name__
        else:  # a decoder bug: still no exception for the relay, but say what it was
            reason = f"internal decoder error: {type(e).__name__}: {e}"
            log.exception("mysql decoder failed on connection %s", self.conn, exc_info=e)
        self._gone_passthrough()
        self._emit(
            ProtocolError(
                self._clock(),
                self.conn,
                "mysql",
                "c2s" if st.c2s else "s2c",
                st.offset + pos,
                reason,
                data[pos : pos + 32].hex(),
            )
        )
        self._release_held(st)

    def _release_held(self, failing: _Dir) -> None:
        """Going passthrough: bytes the *other* direction holds go out unchanged."""
        other = self.s if failing is self.c else self.c
        if other.buf:
            held, other.buf = other.buf, b""
            release = self._release_client if other is self.c else self._release_server
            if release is not None:
                release(held)
        failing.buf = b""

    def _passthrough(self, code: str, message: str, level: int = logging.INFO) -> None:
        """Stop decoding on purpose (compression, TLS end to end, replication)."""
        self._gone_passthrough()
        log.log(level, "connection %s: %s", self.conn, message)
        self._emit(Note(self._clock(), self.conn, code, message))

    # --- connection phase ----------------------------------------------------------------

    def _greeting(self, p: bytes, now: int) -> bytes | None:
        self.greeting_seen = True
        self._connect_ts = now
        self._connect_span = self._span_id()
        if p[:1] == b"\xff":  # refused before the handshake (too many connections, blocked)
            self._connect_done(now, P.parse_err(p))
            self.phase = PH_DONE
            return None
        g = P.parse_greeting(p)
        self.server_caps = g.capabilities
        self.server_version = g.server_version
        self.connection_id = g.connection_id
        self.auth_plugin = g.auth_plugin
        self.db_system = "mariadb" if "mariadb" in g.server_version.lower() else "mysql"
        self.phase = PH_HANDSHAKE
        clear = P.CLIENT_COMPRESS | P.CLIENT_ZSTD_COMPRESSION_ALGORITHM
        setb = 0
        if self.terminate_tls:
            setb = P.CLIENT_SSL
        else:
            clear |= P.CLIENT_SSL
            if g.capabilities & P.CLIENT_SSL:
                self.ssl_stripped = True
                msg = (
                    "the server offers TLS; sniff removed CLIENT_SSL from its greeting so that "
                    "clients which allow plaintext talk plaintext through the proxy (and can be "
                    "decoded). Clients that require TLS will refuse to connect: configure "
                    f"tls = {{ cert = ..., key = ... }} on proxy {self.shared.proxy_name!r} to "
                    "terminate TLS in sniff."
                )
                if self.shared.warn("ssl-stripped", msg):
                    self._emit(Note(now, self.conn, "mysql.tls_stripped", msg))
        new_caps = (g.capabilities | setb) & ~clear
        if new_caps == g.capabilities:
            return None
        return P.packet(0, P.edit_greeting_caps(p, g, setb, clear))

    def _hangup_after_greeting(self, now: int) -> None:
        if self.ssl_stripped:
            msg = (
                "a client closed the connection right after the server greeting without "
                "logging in: it probably requires TLS, which sniff removed from the greeting. "
                f"Configure tls = {{ cert = ..., key = ... }} on proxy {self.shared.proxy_name!r}"
                " to terminate TLS in sniff, or let the client connect without TLS "
                "(e.g. ssl-mode=PREFERRED)."
            )
        else:
            msg = (
                "a client closed the connection right after the server greeting without "
                "logging in (the server does not offer TLS; a client that requires TLS gives "
                "up here). To give such clients TLS, configure "
                f"tls = {{ cert = ..., key = ... }} on proxy {self.shared.proxy_name!r}."
            )
        # rate-limited: a TCP health check (connect, close) looks the same
        if self.shared.warn("hangup-after-greeting", msg, every_s=60.0):
            self._emit(Note(now, self.conn, "mysql.client_hangup_after_greeting", msg))

    def _handshake_response(self, p: bytes, seq: int, now: int) -> bytes | None:
        if self.phase != PH_HANDSHAKE:
            raise P.PacketError("client packet before the server greeting")
        hr = P.parse_handshake_response(p, self.server_caps)
        if hr.ssl_request:
            self.client_tls = True
            if not self.terminate_tls:
                self._passthrough(
                    "mysql.tls_end_to_end",
                    "the client started TLS with the server although sniff removed CLIENT_SSL "
                    "from the greeting; the connection is encrypted end to end and cannot be "
                    "decoded. Configure tls = { cert = ..., key = ... } on proxy "
                    f"{self.shared.proxy_name!r} to decode it.",
                    logging.WARNING,
                )
                return None
            if self.upstream_tls != "off" and self.server_caps & P.CLIENT_SSL:
                self.server_tls = True  # forward the SSLRequest: TLS on both legs
                return None
            if self.upstream_tls == "require":
                raise P.PacketError("tls.upstream = 'require' but the server does not offer TLS")
            self.shift_seq = True  # the server never sees the SSLRequest
            return b""
        self.client_caps = hr.capabilities
        self.caps = hr.capabilities & (self.server_caps | P.CLIENT_SSL)
        self.charset = hr.charset
        self.enc = P.charset_codec(hr.charset)
        self.user = hr.user
        self.database = hr.database
        if hr.auth_plugin:
            self.auth_plugin = hr.auth_plugin
        self.compress = bool(
            hr.capabilities
            & (P.CLIENT_COMPRESS | P.CLIENT_ZSTD_COMPRESSION_ALGORITHM)
            & self.server_caps
        )
        if hr.attrs:
            self._emit(ConnIdentity(now, self.conn, "mysql.connect_attrs", dict(hr.attrs)))
        login = {"user": hr.user, "server_version": self.server_version}
        if hr.database:
            login["database"] = hr.database
        self._emit(ConnIdentity(now, self.conn, "mysql.login", login))
        self.phase = PH_AUTH
        if self.shift_seq:  # plaintext upstream: the server must not see CLIENT_SSL
            b = bytearray(p)
            struct.pack_into("<I", b, 0, (hr.capabilities & ~P.CLIENT_SSL) & 0xFFFFFFFF)
            return P.packet((seq - 1) & 0xFF, bytes(b))
        return None

    def _auth_packet(self, p: bytes, now: int) -> bool:
        """A server packet during authentication; True when the exchange is over."""
        h = p[0] if p else 0
        if h == 0x00:
            ok = P.parse_ok(p, self.caps | P.CLIENT_PROTOCOL_41)
            if ok.schema:
                self.database = ok.schema
            return True
        if h == 0xFF:
            return True
        if h == 0xFE and len(p) > 1:  # auth switch: remember the plugin, never the data
            end = p.find(b"\x00", 1)
            self.auth_plugin = p[1 : end if end > 0 else len(p)].decode("ascii", "replace")
        return False

    def _connect_done(self, now: int, err: P.Err | None) -> None:
        self._emit(
            MysqlConnect(
                self._connect_ts or now,
                self.conn,
                now,
                self.db_system,
                self.server_version,
                self.connection_id,
                self.user,
                self.database,
                self.auth_plugin,
                "error" if err else "ok",
                str(err.code) if err else None,
                err.message if err else None,
                self.client_tls,
                self.server_tls,
                P.capability_names(self.caps),
                self._connect_span or self._span_id(),
            )
        )

    # --- client commands -----------------------------------------------------------------

    def _client_command(self, p: bytes, ln: int, seq: int, now: int) -> bytes | None:
        code = p[0]
        if code == P.COM_STMT_SEND_LONG_DATA:  # no answer, no event: the EXECUTE carries it
            sid, param = struct.unpack_from("<IH", p, 1)
            stmt = self._stmts.get(sid)
            if stmt is not None:
                stmt.long_data[param] = stmt.long_data.get(param, 0) + ln - 7
            return None
        cmd = _Cmd(code, now, self._span_id(), self.database)
        repl: bytes | None = None
        if code == P.COM_QUERY:
            off = self._query_text_offset(p)
            raw = p[off : off + self.max_statement]
            cmd.truncated = ln - off > self.max_statement
            text = raw.decode(self.enc, "replace")
            cmd.text = text
            cmd.multi = ";" in text
            if text[:4].upper() == "USE " or text[:4].upper() == "USE`":
                cmd.use_db = text[4:].strip().strip("`;").strip() or None
            if self.sqlcommenter and len(p) == ln:
                repl = self._tag(cmd, p, seq)
        elif code in (P.COM_STMT_EXECUTE, P.COM_STMT_BULK_EXECUTE):
            sid = struct.unpack_from("<I", p, 1)[0]
            cmd.flags = p[5] if len(p) > 5 else 0
            if sid == _STMT_DIRECT and self._last_prepare is not None:
                cmd.direct = self._last_prepare
                cmd.text = self._last_prepare.text
                cmd.truncated = self._last_prepare.truncated
            else:
                cmd.stmt_id = sid
                stmt = self._stmts.get(sid)
                if stmt is not None:
                    cmd.text = stmt.text
                    if stmt.long_data:
                        cmd.long_data, stmt.long_data = stmt.long_data, {}
            cmd.exec_payload = p[1:]
        elif code == P.COM_STMT_PREPARE:
            cmd.text = p[1 : 1 + self.max_statement].decode(self.enc, "replace")
            cmd.truncated = ln - 1 > self.max_statement
            self._last_prepare = cmd
        elif code == P.COM_STMT_CLOSE:
            sid = struct.unpack_from("<I", p, 1)[0]
            cmd.stmt_id = sid
            self._stmts.pop(sid, None)
        elif code in (P.COM_STMT_RESET, P.COM_STMT_FETCH):
            cmd.stmt_id = struct.unpack_from("<I", p, 1)[0]
            if code == P.COM_STMT_RESET:
                stmt = self._stmts.get(cmd.stmt_id)
                if stmt is not None:
                    stmt.long_data = {}
        elif code == P.COM_INIT_DB:
            cmd.text = p[1:].decode(self.enc, "replace")
        elif code == P.COM_FIELD_LIST:
            end = p.find(b"\x00", 1)
            cmd.text = p[1 : end if end > 0 else len(p)].decode(self.enc, "replace")
        elif code == P.COM_CHANGE_USER:
            cmd.user = P.parse_change_user(p[1:], self.caps, self.charset)
            if cmd.user.attrs:
                self._emit(ConnIdentity(now, self.conn, "mysql.connect_attrs", cmd.user.attrs))
        elif code == P.COM_PROCESS_KILL and len(p) >= 5:
            cmd.text = str(struct.unpack_from("<I", p, 1)[0])
        elif cmd.kind == 0:
            raise P.PacketError(f"unknown command 0x{code:02x}")
        kind = cmd.kind
        if kind == P.RESP_NONE:
            self._emit_command(cmd, now, None, status="none")
            if code == P.COM_QUIT:
                self.phase = PH_DONE
            return repl
        if kind == P.RESP_STREAM:
            self._pending.append(cmd)
            self._passthrough(
                "mysql.replication",
                f"{P.COMMAND_NAMES.get(code, code)}: a replication stream follows; "
                "the connection is relayed without decoding from here",
            )
            return repl
        if len(self._pending) >= _PENDING_MAX:
            raise P.PacketError(f"more than {_PENDING_MAX} commands without an answer")
        self._pending.append(cmd)
        return repl

    def _query_text_offset(self, p: bytes) -> int:
        """Where a COM_QUERY's text starts (after MySQL 8 query attributes, if any)."""
        if not self.caps & P.CLIENT_QUERY_ATTRIBUTES:
            return 1
        count, pos = P.lenenc_int(p, 1)
        _, pos = P.lenenc_int(p, pos)  # parameter set count (always 1)
        if not count:
            return pos
        nb = (count + 7) // 8
        nulls = p[pos : pos + nb]
        pos += nb
        if not p[pos]:
            raise P.PacketError("query attributes without types")
        pos += 1
        types = []
        for _ in range(count):
            types.append(p[pos] | p[pos + 1] << 8)
            _, pos = P.lenenc_bytes(p, pos + 2)
        for i, t in enumerate(types):
            if not nulls[i >> 3] & (1 << (i & 7)):
                _, pos = P.binary_value(p, pos, t & 0xFF, bool(t & 0x8000), self.enc)
        return pos

    def _tag(self, cmd: _Cmd, p: bytes, seq: int) -> bytes | None:
        """sqlcommenter: the COM_QUERY packet with a traceparent comment appended."""
        text = cmd.text or ""
        if "traceparent" in text:
            return None  # the application tags its own statements
        trace_id = self._trace_id()
        tp = ids.format_traceparent(trace_id, cmd.span_id)
        new = tag_payload(p, tp)
        if new is None or len(new) >= P.MAX_PACKET:
            return None
        cmd.trace_id = trace_id
        cmd.traceparent = tp
        cmd.injected = True
        return P.packet(seq, new)

    # --- server packets ------------------------------------------------------------------

    def _server_packet(self, p: bytes, seq: int, now: int) -> bytes | None:
        phase = self.phase
        if phase == PH_COMMAND:
            self._response_packet(p, now)
            return None
        if phase == PH_GREETING:
            return self._greeting(p, now)
        if phase == PH_AUTH:
            if self._auth_packet(p, now):
                err = P.parse_err(p) if p[:1] == b"\xff" else None
                self._connect_done(now, err)
                if err is not None:
                    self.phase = PH_DONE
                    return None
                self.phase = PH_COMMAND
                self.s_state = S_RESULT
                if self.compress:
                    self._passthrough(
                        "mysql.compressed",
                        "the client negotiated protocol compression (sniff clears "
                        "CLIENT_COMPRESS in the greeting, but this client set it anyway); "
                        "the connection is relayed without decoding",
                        logging.WARNING,
                    )
            return None
        if phase == PH_HANDSHAKE:
            raise P.PacketError("server packet before the client's handshake response")
        return None  # PH_DONE: e.g. the server's goodbye after a failed login

    def _response_packet(self, p: bytes, now: int) -> None:
        state = self.s_state
        if not self._pending:
            if p[:1] == b"\xff":  # the server speaks first: it is closing the connection
                err = P.parse_err(p)
                self._emit(Note(now, self.conn, "mysql.server_error", f"{err.code}: {err.message}"))
                return
            raise P.PacketError(f"server packet 0x{p[0] if p else 0:02x} with no command pending")
        cmd = self._pending[0]
        h = p[0] if p else -1
        if state == S_RESULT:
            kind = cmd.kind
            if kind == P.RESP_RESULT:
                self._result_first(cmd, p, h, now)
            elif kind == P.RESP_OK:
                if h == 0xFF:
                    err = P.parse_err(p)
                    if err.code == P.PROGRESS_ERRNO:
                        return
                    self._finish(cmd, now, None, None, 0, None, err)
                elif h == 0x00 or h == 0xFE:
                    ok = P.parse_ok(p, self.caps) if h == 0x00 else None
                    if ok is not None and ok.schema:
                        self.database = ok.schema
                    if cmd.code == P.COM_INIT_DB:
                        self.database = cmd.text or self.database
                    elif cmd.code == P.COM_RESET_CONNECTION:
                        self._stmts.clear()
                    self._finish(cmd, now, None, None, 0, None, None)
                else:
                    raise P.PacketError(f"unexpected 0x{h:02x} answering {_name(cmd.code)}")
            elif kind == P.RESP_PREPARE:
                if h == 0xFF:
                    self._finish(cmd, now, None, None, 0, None, P.parse_err(p))
                    return
                if h != 0x00:
                    raise P.PacketError(f"unexpected 0x{h:02x} answering COM_STMT_PREPARE")
                pok = P.parse_prepare_ok(p, self.caps)
                cmd.stmt_id = pok.statement_id
                if len(self._stmts) >= _STMTS_MAX:
                    self._stmts.pop(next(iter(self._stmts)))
                self._stmts[pok.statement_id] = _Stmt(cmd.text or "", pok.params)
                self._prep_cols = pok.columns if pok.metadata_follows else 0
                params = pok.params if pok.metadata_follows else 0
                if params:
                    self._skip(
                        params, S_PREP_PARAMS_EOF if not self._deprecate_eof else S_PREP_COLS
                    )
                else:
                    self.s_state = S_PREP_COLS
                    self._prep_columns(now)
            elif kind == P.RESP_ROWS:
                self.rows = 0
                self.s_state = S_ROWS
                self._rows_end(cmd, p, h, now)
            elif kind == P.RESP_FIELDS:
                self.s_state = S_FIELDS
                self._fields(cmd, p, h, now)
            elif kind == P.RESP_STRING:
                self._finish(cmd, now, None, None, 0, None, P.parse_err(p) if h == 0xFF else None)
            elif kind == P.RESP_AUTH:
                self.s_state = S_AUTH
                self._change_user(cmd, p, now)
            else:
                raise P.PacketError(f"no response handling for {_name(cmd.code)}")
        elif state == S_ROWS:
            self._rows_end(cmd, p, h, now)
        elif state == S_COLEOF:
            if h == 0xFF:
                self._finish(cmd, now, 0, None, 0, None, P.parse_err(p))
                return
            if h != 0xFE:
                raise P.PacketError(f"expected EOF after column definitions, got 0x{h:02x}")
            _, status = P.parse_eof(p)
            if status & P.SERVER_STATUS_CURSOR_EXISTS:  # rows come later, by COM_STMT_FETCH
                self._result_done(cmd, now, 0, None, 0, None, None, status)
            else:
                self.rows = 0
                self.s_state = S_ROWS
        elif state == S_PREP_PARAMS_EOF:
            if h != 0xFE:
                raise P.PacketError(f"expected EOF after parameter definitions, got 0x{h:02x}")
            self.s_state = S_PREP_COLS
            self._prep_columns(now)
        elif state == S_PREP_COLS_EOF:
            if h != 0xFE:
                raise P.PacketError(f"expected EOF after column definitions, got 0x{h:02x}")
            self.s_state = S_RESULT
            self._prepare_done(now)
        elif state == S_FIELDS:
            self._fields(cmd, p, h, now)
        elif state == S_AUTH:
            self._change_user(cmd, p, now)
        else:
            raise P.PacketError(f"server packet in state {state}")

    @property
    def _deprecate_eof(self) -> bool:
        return bool(self.caps & P.CLIENT_DEPRECATE_EOF)

    def _skip_done(self, now: int) -> None:
        after = self._after_skip
        self.s_state = after
        if after == S_PREP_COLS:
            self._prep_columns(now)
        elif after == S_RESULT:
            self._prepare_done(now)

    def _skip(self, n: int, after: int) -> None:
        self._skip_left = n
        self._after_skip = after
        self.s_state = S_SKIP

    def _result_first(self, cmd: _Cmd, p: bytes, h: int, now: int) -> None:
        if h == 0x00 and len(p) >= 7:
            ok = P.parse_ok(p, self.caps)
            self._result_done(
                cmd,
                now,
                None,
                ok.affected_rows,
                ok.warnings,
                ok.last_insert_id,
                None,
                ok.status,
                ok.schema,
            )
        elif h == 0xFF:
            err = P.parse_err(p)
            if err.code == P.PROGRESS_ERRNO:
                return  # MariaDB progress report: the answer is still to come
            self._result_done(cmd, now, None, None, 0, None, err, 0)
        elif h == 0xFB:
            cmd.infile = True  # the client now sends the file; OK/ERR follows
        elif h == 0xFE or h < 0:
            raise P.PacketError(f"unexpected packet {p[:1].hex() or 'empty'} opening a result")
        else:
            ncols, pos = P.lenenc_int(p, 0)
            if not ncols:
                raise P.PacketError("result set with no columns")
            follows = True
            if pos < len(p) and self.caps & (
                P.MARIADB_CLIENT_CACHE_METADATA | P.CLIENT_OPTIONAL_RESULTSET_METADATA
            ):
                follows = p[pos] != 0
            self.rows = 0
            after = S_ROWS if self._deprecate_eof else S_COLEOF
            if follows:
                self._skip(ncols, after)
            else:
                self.s_state = after

    def _rows_end(self, cmd: _Cmd, p: bytes, h: int, now: int) -> None:
        """A packet in the rows state that the fast loop handed over (or the first of a
        FETCH): a terminator, an error, or (for a FETCH's first packet) a row."""
        if h == 0xFF:
            err = P.parse_err(p)
            if err.code == P.PROGRESS_ERRNO:
                return
            self._result_done(cmd, now, self.rows, None, 0, None, err, 0)
        elif h == 0xFE and len(p) < P.MAX_PACKET:
            if self._deprecate_eof:
                ok = P.parse_ok(p, self.caps)
                self._result_done(
                    cmd,
                    now,
                    self.rows,
                    ok.affected_rows or None,
                    ok.warnings,
                    None,
                    None,
                    ok.status,
                    ok.schema,
                )
            else:
                warnings, status = P.parse_eof(p)
                self._result_done(cmd, now, self.rows, None, warnings, None, None, status)
        else:
            self.rows += 1

    def _result_done(
        self,
        cmd: _Cmd,
        now: int,
        rows: int | None,
        affected: int | None,
        warnings: int,
        insert_id: int | None,
        err: P.Err | None,
        status: int,
        schema: str | None = None,
    ) -> None:
        cmd.results.append(
            _Result(now, rows, affected, warnings, insert_id, err, None if err else status)
        )
        if schema:
            self.database = schema
        self.rows = 0
        if err is None and status & P.SERVER_MORE_RESULTS_EXISTS:
            self.s_state = S_RESULT  # the next result of the same command
            return
        if err is None and cmd.use_db:
            self.database = cmd.use_db
        self._pending.popleft()
        self.s_state = S_RESULT
        self._emit_cmd(cmd)

    def _finish(
        self,
        cmd: _Cmd,
        now: int,
        rows: int | None,
        affected: int | None,
        warnings: int,
        insert_id: int | None,
        err: P.Err | None,
    ) -> None:
        """The single answer of a non-statement command (its status flags do not matter)."""
        cmd.results.append(_Result(now, rows, affected, warnings, insert_id, err))
        if self._pending and self._pending[0] is cmd:
            self._pending.popleft()
        self.s_state = S_RESULT
        self.rows = 0
        self._emit_cmd(cmd)

    def _prep_columns(self, now: int) -> None:
        cols = self._prep_cols
        if cols:
            self._skip(cols, S_PREP_COLS_EOF if not self._deprecate_eof else S_RESULT)
        else:
            self.s_state = S_RESULT
            self._prepare_done(now)

    def _prepare_done(self, now: int) -> None:
        cmd = self._pending[0]
        if cmd.code == P.COM_STMT_PREPARE:
            self._finish(cmd, now, None, None, 0, None, None)

    def _fields(self, cmd: _Cmd, p: bytes, h: int, now: int) -> None:
        if h == 0xFF:
            self._finish(cmd, now, None, None, 0, None, P.parse_err(p))
        elif h == 0xFE and (len(p) < 9 or self._deprecate_eof):
            self._finish(cmd, now, None, None, 0, None, None)

    def _change_user(self, cmd: _Cmd, p: bytes, now: int) -> None:
        if not self._auth_packet(p, now):
            return
        if p[:1] == b"\xff":
            self._finish(cmd, now, None, None, 0, None, P.parse_err(p))
            return
        cu = cmd.user
        if cu is not None:
            self.user = cu.user
            self.database = cu.database
            login = {"user": cu.user, "server_version": self.server_version}
            if cu.database:
                login["database"] = cu.database
            self._emit(ConnIdentity(now, self.conn, "mysql.login", login))
        self._stmts.clear()
        self._finish(cmd, now, None, None, 0, None, None)

    # --- events --------------------------------------------------------------------------

    def _emit_cmd(self, cmd: _Cmd) -> None:
        code = cmd.code
        if code in (P.COM_QUERY, P.COM_STMT_EXECUTE, P.COM_STMT_BULK_EXECUTE):
            self._emit_statement(cmd)
            return
        r = cmd.results[-1] if cmd.results else None
        self._emit_command(cmd, r.ts_end if r else self._clock(), r)

    def _emit_command(
        self, cmd: _Cmd, ts_end: int, r: _Result | None, status: str | None = None
    ) -> None:
        err = r.err if r is not None else None
        rows = r.rows if r is not None and cmd.code == P.COM_STMT_FETCH else None
        self.events += 1
        self._emit(
            MysqlCommand(
                cmd.ts,
                self.conn,
                self.db_system,
                cmd.db,
                _name(cmd.code),
                ts_end,
                status or ("error" if err else "ok"),
                str(err.code) if err else None,
                err.message if err else None,
                cmd.span_id,
                str(cmd.stmt_id) if cmd.stmt_id is not None else None,
                cmd.text,
                self.keep_literals,
                rows,
            )
        )

    def _emit_statement(self, cmd: _Cmd) -> None:
        results = cmd.results
        stmt_id = cmd.stmt_id
        if cmd.direct is not None:
            stmt_id = cmd.direct.stmt_id
        params = (
            self._params(cmd, stmt_id)
            if cmd.exec_payload is not None
            and self.keep_literals
            and cmd.code == P.COM_STMT_EXECUTE
            else None
        )
        sid = None if stmt_id is None else str(stmt_id)
        text = cmd.text or ""
        name = _NAMES[cmd.code]
        if cmd.code == P.COM_QUERY and cmd.multi and len(results) > 1:
            start = cmd.ts
            for i, r in enumerate(results):
                self._emit_one(
                    cmd,
                    name,
                    text,
                    start,
                    r,
                    [r],
                    sid,
                    params,
                    i,
                    len(results),
                    cmd.span_id if i == 0 else self._span_id(),
                    self._transaction([r]),
                )
                start = r.ts_end
            return
        txn = self._transaction(results)
        self._emit_one(
            cmd, name, text, cmd.ts, results[-1], results, sid, params, None, None, cmd.span_id, txn
        )

    def _transaction(self, results: list[_Result]) -> tuple[int | None, bool]:
        """(transaction number, ended here) from the server's in-transaction flag."""
        before = self._in_txn
        after = before
        for r in results:
            if r.status is not None:
                after = bool(r.status & P.SERVER_STATUS_IN_TRANS)
        self._in_txn = after
        if not before and not after:
            return None, False
        if not before:
            self._txn_no += 1
        return self._txn_no, before and not after

    def _emit_one(
        self,
        cmd: _Cmd,
        name: str,
        text: str,
        ts: int,
        last: _Result,
        results: list[_Result],
        sid: str | None,
        params: list[str | None] | None,
        batch: int | None,
        batch_size: int | None,
        span_id: str,
        txn: tuple[int | None, bool],
    ) -> None:
        if len(results) == 1:  # the common case, without the generators
            err = last.err
            rows = last.rows
            affected = last.affected
            insert_id = last.insert_id or None
            warnings = last.warnings
        else:
            err = next((r.err for r in results if r.err is not None), None)
            rows_l = [r.rows for r in results if r.rows is not None]
            aff_l = [r.affected for r in results if r.affected is not None]
            rows = sum(rows_l) if rows_l else None
            affected = sum(aff_l) if aff_l else None
            insert_id = next((r.insert_id for r in reversed(results) if r.insert_id), None)
            warnings = sum(r.warnings for r in results)
        self.events += 1
        self._emit(
            MysqlQuery(
                ts,
                self.conn,
                self.db_system,
                cmd.db,
                name,
                text,
                self.keep_literals,
                last.ts_end,
                "error" if err else "ok",
                str(err.code) if err else None,
                err.message if err else None,
                rows,
                affected,
                span_id,
                sid,
                cmd.traceparent,
                warnings,
                batch,
                batch_size,
                cmd.trace_id,
                cmd.injected,
                cmd.truncated,
                params,
                txn[0],
                txn[1],
                None,
                cmd.exec_payload[:_ID_SCAN_MAX] if cmd.exec_payload else None,
                last_insert_id=insert_id,
                infile_bytes=cmd.infile_bytes if cmd.infile else None,
            )
        )

    def _params(self, cmd: _Cmd, stmt_id: int | None) -> list[str | None] | None:
        stmt = self._stmts.get(stmt_id) if stmt_id is not None else None
        if stmt is None or cmd.exec_payload is None:
            return None
        try:
            vals, types = P.parse_binary_params(
                cmd.exec_payload,
                stmt.params,
                stmt.types,
                self.caps,
                self.enc,
                set(cmd.long_data or ()),
            )
        except _DECODE_ERRORS:
            return None
        stmt.types = types
        for i, n in (cmd.long_data or {}).items():
            if i < len(vals):
                vals[i] = f"<long data: {n} bytes>"
        return vals


_NAMES = tuple(P.COMMAND_NAMES.get(c, f"COM_0x{c:02x}") for c in range(256))


def _name(code: int) -> str:
    return _NAMES[code & 0xFF]
