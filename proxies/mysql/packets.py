"""MySQL/MariaDB wire constants and pure packet parsers (no state, no I/O).

Why our own parsers rather than mysql-mimic's: mysql-mimic is a *server*; its
client-packet parsers assume its own session state (they AND capabilities with
the ones it advertised, treat any 32-byte response as an SSLRequest, refuse
``new_params_bound_flag = 0`` and DATETIME/DECIMAL/TIME parameters, and know
nothing of MariaDB's extended capabilities in the handshake filler), and it has
no parsers at all for the server-to-client packets a proxy must read (handshake
v10, OK/ERR/EOF, STMT_PREPARE_OK). Each parser here is a few lines over
``bytes`` with explicit bounds; every one raises :class:`PacketError` (or
``IndexError``/``struct.error`` on truncation, which the decoder treats the same)
and never anything else.

Secrets: the parsers that walk over authentication data (handshake response,
COM_CHANGE_USER) skip it by length and never return it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from decimal import Decimal

# --- capability flags --------------------------------------------------------------------

CLIENT_LONG_PASSWORD = 1  # MariaDB calls it CLIENT_MYSQL: unset => extended caps in filler
CLIENT_FOUND_ROWS = 1 << 1
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_COMPRESS = 1 << 5
CLIENT_LOCAL_FILES = 1 << 7
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_SSL = 1 << 11
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PS_MULTI_RESULTS = 1 << 18
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_SESSION_TRACK = 1 << 23
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25
CLIENT_ZSTD_COMPRESSION_ALGORITHM = 1 << 26
CLIENT_QUERY_ATTRIBUTES = 1 << 27
# MariaDB extended capabilities (the upper 32 bits)
MARIADB_CLIENT_PROGRESS = 1 << 32
MARIADB_CLIENT_STMT_BULK_OPERATIONS = 1 << 34
MARIADB_CLIENT_EXTENDED_METADATA = 1 << 35
MARIADB_CLIENT_CACHE_METADATA = 1 << 36

CAPABILITY_NAMES = {
    CLIENT_CONNECT_WITH_DB: "CONNECT_WITH_DB",
    CLIENT_COMPRESS: "COMPRESS",
    CLIENT_LOCAL_FILES: "LOCAL_FILES",
    CLIENT_PROTOCOL_41: "PROTOCOL_41",
    CLIENT_SSL: "SSL",
    CLIENT_TRANSACTIONS: "TRANSACTIONS",
    CLIENT_MULTI_STATEMENTS: "MULTI_STATEMENTS",
    CLIENT_MULTI_RESULTS: "MULTI_RESULTS",
    CLIENT_PS_MULTI_RESULTS: "PS_MULTI_RESULTS",
    CLIENT_PLUGIN_AUTH: "PLUGIN_AUTH",
    CLIENT_CONNECT_ATTRS: "CONNECT_ATTRS",
    CLIENT_SESSION_TRACK: "SESSION_TRACK",
    CLIENT_DEPRECATE_EOF: "DEPRECATE_EOF",
    CLIENT_OPTIONAL_RESULTSET_METADATA: "OPTIONAL_RESULTSET_METADATA",
    CLIENT_ZSTD_COMPRESSION_ALGORITHM: "ZSTD_COMPRESSION",
    CLIENT_QUERY_ATTRIBUTES: "QUERY_ATTRIBUTES",
    MARIADB_CLIENT_PROGRESS: "MARIADB_PROGRESS",
    MARIADB_CLIENT_STMT_BULK_OPERATIONS: "MARIADB_STMT_BULK_OPERATIONS",
    MARIADB_CLIENT_EXTENDED_METADATA: "MARIADB_EXTENDED_METADATA",
    MARIADB_CLIENT_CACHE_METADATA: "MARIADB_CACHE_METADATA",
}


def capability_names(caps: int) -> list[str]:
    return [name for bit, name in CAPABILITY_NAMES.items() if caps & bit]


# --- server status flags -----------------------------------------------------------------

SERVER_STATUS_IN_TRANS = 0x0001
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040
SERVER_STATUS_LAST_ROW_SENT = 0x0080
SERVER_SESSION_STATE_CHANGED = 0x4000

SESSION_TRACK_SCHEMA = 0x01

PROGRESS_ERRNO = 0xFFFF  # MariaDB progress reports travel as ERR packets with this code

# --- commands ----------------------------------------------------------------------------

COM_SLEEP = 0x00
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_CREATE_DB = 0x05
COM_DROP_DB = 0x06
COM_REFRESH = 0x07
COM_SHUTDOWN = 0x08
COM_STATISTICS = 0x09
COM_PROCESS_INFO = 0x0A
COM_CONNECT = 0x0B
COM_PROCESS_KILL = 0x0C
COM_DEBUG = 0x0D
COM_PING = 0x0E
COM_TIME = 0x0F
COM_DELAYED_INSERT = 0x10
COM_CHANGE_USER = 0x11
COM_BINLOG_DUMP = 0x12
COM_TABLE_DUMP = 0x13
COM_CONNECT_OUT = 0x14
COM_REGISTER_SLAVE = 0x15
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_DAEMON = 0x1D
COM_BINLOG_DUMP_GTID = 0x1E
COM_RESET_CONNECTION = 0x1F
COM_STMT_BULK_EXECUTE = 0xFA  # MariaDB

COMMAND_NAMES = {
    COM_SLEEP: "COM_SLEEP",
    COM_QUIT: "COM_QUIT",
    COM_INIT_DB: "COM_INIT_DB",
    COM_QUERY: "COM_QUERY",
    COM_FIELD_LIST: "COM_FIELD_LIST",
    COM_CREATE_DB: "COM_CREATE_DB",
    COM_DROP_DB: "COM_DROP_DB",
    COM_REFRESH: "COM_REFRESH",
    COM_SHUTDOWN: "COM_SHUTDOWN",
    COM_STATISTICS: "COM_STATISTICS",
    COM_PROCESS_INFO: "COM_PROCESS_INFO",
    COM_CONNECT: "COM_CONNECT",
    COM_PROCESS_KILL: "COM_PROCESS_KILL",
    COM_DEBUG: "COM_DEBUG",
    COM_PING: "COM_PING",
    COM_TIME: "COM_TIME",
    COM_DELAYED_INSERT: "COM_DELAYED_INSERT",
    COM_CHANGE_USER: "COM_CHANGE_USER",
    COM_BINLOG_DUMP: "COM_BINLOG_DUMP",
    COM_TABLE_DUMP: "COM_TABLE_DUMP",
    COM_CONNECT_OUT: "COM_CONNECT_OUT",
    COM_REGISTER_SLAVE: "COM_REGISTER_SLAVE",
    COM_STMT_PREPARE: "COM_STMT_PREPARE",
    COM_STMT_EXECUTE: "COM_STMT_EXECUTE",
    COM_STMT_SEND_LONG_DATA: "COM_STMT_SEND_LONG_DATA",
    COM_STMT_CLOSE: "COM_STMT_CLOSE",
    COM_STMT_RESET: "COM_STMT_RESET",
    COM_SET_OPTION: "COM_SET_OPTION",
    COM_STMT_FETCH: "COM_STMT_FETCH",
    COM_DAEMON: "COM_DAEMON",
    COM_BINLOG_DUMP_GTID: "COM_BINLOG_DUMP_GTID",
    COM_RESET_CONNECTION: "COM_RESET_CONNECTION",
    COM_STMT_BULK_EXECUTE: "COM_STMT_BULK_EXECUTE",
}

# how the server answers each command
RESP_RESULT = 1  # OK | ERR | LOCAL INFILE request | result set(s)
RESP_OK = 2  # OK | ERR (| EOF for a few old commands)
RESP_NONE = 3  # no answer at all
RESP_PREPARE = 4  # STMT_PREPARE_OK + param/column definitions | ERR
RESP_ROWS = 5  # rows + terminator | ERR (COM_STMT_FETCH)
RESP_FIELDS = 6  # column definitions + EOF | ERR (COM_FIELD_LIST)
RESP_STRING = 7  # one human-readable packet | ERR (COM_STATISTICS)
RESP_AUTH = 8  # the authentication exchange again (COM_CHANGE_USER)
RESP_STREAM = 9  # replication streams: no request/response structure to follow

RESPONSE_KIND = {
    COM_QUERY: RESP_RESULT,
    COM_STMT_EXECUTE: RESP_RESULT,
    COM_STMT_BULK_EXECUTE: RESP_RESULT,
    COM_PROCESS_INFO: RESP_RESULT,
    COM_INIT_DB: RESP_OK,
    COM_CREATE_DB: RESP_OK,
    COM_DROP_DB: RESP_OK,
    COM_REFRESH: RESP_OK,
    COM_SHUTDOWN: RESP_OK,
    COM_PROCESS_KILL: RESP_OK,
    COM_DEBUG: RESP_OK,
    COM_PING: RESP_OK,
    COM_STMT_RESET: RESP_OK,
    COM_SET_OPTION: RESP_OK,
    COM_RESET_CONNECTION: RESP_OK,
    COM_QUIT: RESP_NONE,
    COM_STMT_SEND_LONG_DATA: RESP_NONE,
    COM_STMT_CLOSE: RESP_NONE,
    COM_STMT_PREPARE: RESP_PREPARE,
    COM_STMT_FETCH: RESP_ROWS,
    COM_FIELD_LIST: RESP_FIELDS,
    COM_STATISTICS: RESP_STRING,
    COM_CHANGE_USER: RESP_AUTH,
    COM_BINLOG_DUMP: RESP_STREAM,
    COM_BINLOG_DUMP_GTID: RESP_STREAM,
    COM_REGISTER_SLAVE: RESP_STREAM,
    COM_TABLE_DUMP: RESP_STREAM,
}

MAX_PACKET = 0xFFFFFF  # a payload of this length continues in the next packet

# --- field types (binary protocol parameters) -------------------------------------------

T_DECIMAL = 0x00
T_TINY = 0x01
T_SHORT = 0x02
T_LONG = 0x03
T_FLOAT = 0x04
T_DOUBLE = 0x05
T_NULL = 0x06
T_TIMESTAMP = 0x07
T_LONGLONG = 0x08
T_INT24 = 0x09
T_DATE = 0x0A
T_TIME = 0x0B
T_DATETIME = 0x0C
T_YEAR = 0x0D
T_NEWDATE = 0x0E
T_VARCHAR = 0x0F
T_BIT = 0x10
T_TIMESTAMP2 = 0x11
T_DATETIME2 = 0x12
T_TIME2 = 0x13
T_JSON = 0xF5
T_NEWDECIMAL = 0xF6

_LENENC_TYPES = frozenset(
    {T_DECIMAL, T_VARCHAR, T_BIT, T_JSON, T_NEWDECIMAL, *range(0xF7, 0x100)}
)  # ENUM SET TINY_BLOB MEDIUM_BLOB LONG_BLOB BLOB VAR_STRING STRING GEOMETRY
_DATE_TYPES = frozenset({T_TIMESTAMP, T_DATE, T_DATETIME, T_NEWDATE, T_TIMESTAMP2, T_DATETIME2})


class PacketError(Exception):
    """Bytes that are not the packet the protocol state says must come next."""


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def lenenc_int(b: bytes, pos: int) -> tuple[int | None, int]:
    """A length-encoded integer at ``pos``: (value or None for NULL, next position)."""
    c = b[pos]
    if c < 0xFB:
        return c, pos + 1
    if c == 0xFC:
        return b[pos + 1] | b[pos + 2] << 8, pos + 3
    if c == 0xFD:
        return b[pos + 1] | b[pos + 2] << 8 | b[pos + 3] << 16, pos + 4
    if c == 0xFE:
        if pos + 9 > len(b):
            raise PacketError("length-encoded integer runs past the packet")
        return _U64.unpack_from(b, pos + 1)[0], pos + 9
    if c == 0xFB:
        return None, pos + 1
    raise PacketError(f"invalid length-encoded integer prefix 0x{c:02x}")


def lenenc_bytes(b: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = lenenc_int(b, pos)
    if n is None:
        return b"", pos
    end = pos + n
    if end > len(b):
        raise PacketError("length-encoded string runs past the packet")
    return b[pos:end], end


def null_str(b: bytes, pos: int) -> tuple[bytes, int]:
    end = b.find(b"\x00", pos)
    if end < 0:
        raise PacketError("NUL-terminated string has no NUL")
    return b[pos:end], end + 1


# --- server greeting ---------------------------------------------------------------------


@dataclass(slots=True)
class Greeting:
    protocol_version: int
    server_version: str
    connection_id: int
    capabilities: int  # including MariaDB's extended capabilities in the upper 32 bits
    charset: int
    status: int
    auth_plugin: str
    caps_lo_offset: int  # payload offset of the lower 2 capability bytes (for editing)
    caps_hi_offset: int | None  # payload offset of the upper 2 bytes, if present


def parse_greeting(p: bytes) -> Greeting:
    """Handshake v10. The auth plugin data (the scramble) is skipped, never returned."""
    if not p:
        raise PacketError("empty greeting")
    if p[0] != 10:
        raise PacketError(f"unsupported handshake protocol version {p[0]} (sniff speaks v10)")
    version_b, pos = null_str(p, 1)
    if pos + 4 + 8 + 1 + 2 > len(p):
        raise PacketError("truncated greeting")
    conn_id = _U32.unpack_from(p, pos)[0]
    pos += 4 + 8 + 1  # scramble part 1 + filler
    lo_off = pos
    caps = _U16.unpack_from(p, pos)[0]
    pos += 2
    charset = status = 0
    hi_off: int | None = None
    plugin = ""
    if pos < len(p):
        charset = p[pos]
        status = _U16.unpack_from(p, pos + 1)[0]
        hi_off = pos + 3
        caps |= _U16.unpack_from(p, hi_off)[0] << 16
        auth_len = p[pos + 5]
        reserved = pos + 6
        if not caps & CLIENT_LONG_PASSWORD and reserved + 10 <= len(p):
            caps |= _U32.unpack_from(p, reserved + 6)[0] << 32  # MariaDB extended caps
        pos = reserved + 10
        if caps & CLIENT_SECURE_CONNECTION:
            pos += max(13, auth_len - 8)
        if caps & CLIENT_PLUGIN_AUTH and pos < len(p):
            end = p.find(b"\x00", pos)
            plugin = p[pos : end if end >= 0 else len(p)].decode("ascii", "replace")
    return Greeting(
        10,
        version_b.decode("utf-8", "replace"),
        conn_id,
        caps,
        charset,
        status,
        plugin,
        lo_off,
        hi_off,
    )


def edit_greeting_caps(p: bytes, g: Greeting, set_bits: int, clear_bits: int) -> bytes:
    """The greeting with capability bits changed in place (same length)."""
    caps = (g.capabilities | set_bits) & ~clear_bits
    b = bytearray(p)
    _U16.pack_into(b, g.caps_lo_offset, caps & 0xFFFF)
    if g.caps_hi_offset is not None:
        _U16.pack_into(b, g.caps_hi_offset, (caps >> 16) & 0xFFFF)
    return bytes(b)


GREETING_CLEARED = CLIENT_SSL | CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION_ALGORITHM


def plaintext_greeting(p: bytes) -> bytes | None:
    """The greeting payload with CLIENT_SSL and protocol compression cleared (what sniff
    offers clients when it does not terminate TLS), the same edit the decoder makes;
    None when nothing changes or ``p`` is not a v10 greeting (an ERR, garbage: it goes
    through unchanged and the decoder reports it)."""
    try:
        g = parse_greeting(p)
    except (PacketError, IndexError, struct.error, UnicodeDecodeError, ValueError):
        return None
    if not g.capabilities & GREETING_CLEARED:
        return None
    return edit_greeting_caps(p, g, 0, GREETING_CLEARED)


# --- client handshake response -----------------------------------------------------------


@dataclass(slots=True)
class HandshakeResponse:
    capabilities: int
    max_packet: int
    charset: int
    ssl_request: bool  # only the 32-byte prefix: TLS starts next
    user: str = ""
    database: str | None = None
    auth_plugin: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


def parse_handshake_response(p: bytes, server_caps: int) -> HandshakeResponse:
    """HandshakeResponse41 or SSLRequest. The auth response is skipped by its length."""
    if len(p) < 4:
        raise PacketError("truncated handshake response")
    caps = _U32.unpack_from(p, 0)[0]
    if not caps & CLIENT_PROTOCOL_41:
        return _parse_handshake_320(p)
    if len(p) < 32:
        raise PacketError("truncated handshake response")
    max_packet = _U32.unpack_from(p, 4)[0]
    charset = p[8]
    if not caps & CLIENT_LONG_PASSWORD and not server_caps & CLIENT_LONG_PASSWORD:
        caps |= _U32.unpack_from(p, 28)[0] << 32  # MariaDB extended caps in the filler
    if len(p) == 32:
        if not caps & CLIENT_SSL:
            raise PacketError("32-byte handshake response without CLIENT_SSL")
        return HandshakeResponse(caps, max_packet, charset, True)
    user_b, pos = null_str(p, 32)
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        n, pos = lenenc_int(p, pos)
        pos += n or 0
    elif caps & CLIENT_SECURE_CONNECTION:
        pos += 1 + p[pos]
    else:
        _, pos = null_str(p, pos)
    if pos > len(p):
        raise PacketError("auth response runs past the packet")
    enc = charset_codec(charset)
    db: str | None = None
    if caps & CLIENT_CONNECT_WITH_DB and pos < len(p):
        db_b, pos = null_str(p, pos)
        db = db_b.decode(enc, "replace") or None
    plugin = ""
    if caps & CLIENT_PLUGIN_AUTH and pos < len(p):
        pl, pos = null_str(p, pos)
        plugin = pl.decode("ascii", "replace")
    attrs: dict[str, str] = {}
    if caps & CLIENT_CONNECT_ATTRS and pos < len(p):
        attrs = _attrs(p, pos, enc)
    return HandshakeResponse(
        caps, max_packet, charset, False, user_b.decode(enc, "replace"), db, plugin, attrs
    )


def _parse_handshake_320(p: bytes) -> HandshakeResponse:
    caps = _U16.unpack_from(p, 0)[0]
    max_packet = p[2] | p[3] << 8 | p[4] << 16
    user_b, pos = null_str(p, 5)
    db: str | None = None
    if caps & CLIENT_CONNECT_WITH_DB:
        _, pos = null_str(p, pos)  # the password hash comes first
        if pos < len(p):
            db = null_str(p, pos)[0].decode("utf-8", "replace") or None
    return HandshakeResponse(caps, max_packet, 8, False, user_b.decode("latin-1"), db)


_MAX_ATTRS = 64


def _attrs(p: bytes, pos: int, enc: str) -> dict[str, str]:
    total, pos = lenenc_int(p, pos)
    end = min(len(p), pos + (total or 0))
    attrs: dict[str, str] = {}
    while pos < end and len(attrs) < _MAX_ATTRS:
        k, pos = lenenc_bytes(p, pos)
        v, pos = lenenc_bytes(p, pos)
        attrs[k.decode(enc, "replace")] = v.decode(enc, "replace")[:256]
    return attrs


@dataclass(slots=True)
class ChangeUser:
    user: str
    database: str | None
    auth_plugin: str
    attrs: dict[str, str]


def parse_change_user(p: bytes, caps: int, charset: int) -> ChangeUser:
    """COM_CHANGE_USER without its command byte; the auth response is skipped."""
    enc = charset_codec(charset)
    user_b, pos = null_str(p, 0)
    if caps & CLIENT_SECURE_CONNECTION:
        pos += 1 + p[pos]
    else:
        _, pos = null_str(p, pos)
    db: str | None = None
    plugin = ""
    attrs: dict[str, str] = {}
    if pos < len(p):
        db_b, pos = null_str(p, pos)
        db = db_b.decode(enc, "replace") or None
    if pos + 2 <= len(p) and caps & CLIENT_PROTOCOL_41:
        charset = _U16.unpack_from(p, pos)[0]
        enc = charset_codec(charset)
        pos += 2
        if caps & CLIENT_PLUGIN_AUTH and pos < len(p):
            pl, pos = null_str(p, pos)
            plugin = pl.decode("ascii", "replace")
        if caps & CLIENT_CONNECT_ATTRS and pos < len(p):
            attrs = _attrs(p, pos, enc)
    return ChangeUser(user_b.decode(enc, "replace"), db, plugin, attrs)


# --- OK / ERR / EOF ----------------------------------------------------------------------


@dataclass(slots=True)
class Ok:
    affected_rows: int
    last_insert_id: int
    status: int
    warnings: int
    schema: str | None  # from session-state tracking, when the current schema changed


def parse_ok(p: bytes, caps: int) -> Ok:
    """An OK packet (header 0x00, or 0xFE for the OK that replaces EOF)."""
    affected, pos = lenenc_int(p, 1)
    last_id, pos = lenenc_int(p, pos)
    status = warnings = 0
    schema: str | None = None
    if caps & CLIENT_PROTOCOL_41 and pos + 4 <= len(p):
        status, warnings = struct.unpack_from("<HH", p, pos)
        pos += 4
    elif caps & CLIENT_TRANSACTIONS and pos + 2 <= len(p):
        status = _U16.unpack_from(p, pos)[0]
        pos += 2
    if caps & CLIENT_SESSION_TRACK and status & SERVER_SESSION_STATE_CHANGED and pos < len(p):
        _, pos = lenenc_bytes(p, pos)  # human-readable info
        if pos < len(p):
            state, _ = lenenc_bytes(p, pos)
            schema = _session_schema(state)
    return Ok(affected or 0, last_id or 0, status, warnings, schema)


def _session_schema(state: bytes) -> str | None:
    pos = 0
    schema: str | None = None
    while pos < len(state):
        kind = state[pos]
        data, pos = lenenc_bytes(state, pos + 1)
        if kind == SESSION_TRACK_SCHEMA:
            name, _ = lenenc_bytes(data, 0)
            schema = name.decode("utf-8", "replace")
    return schema


@dataclass(slots=True)
class Err:
    code: int
    sqlstate: str | None
    message: str


def parse_err(p: bytes) -> Err:
    if len(p) < 3:
        raise PacketError("truncated ERR packet")
    code = _U16.unpack_from(p, 1)[0]
    if len(p) >= 9 and p[3] == 0x23:  # '#'
        return Err(code, p[4:9].decode("ascii", "replace"), p[9:].decode("utf-8", "replace"))
    return Err(code, None, p[3:].decode("utf-8", "replace"))


def parse_eof(p: bytes) -> tuple[int, int]:
    """(warnings, status) of a classic EOF packet."""
    if len(p) >= 5:
        w, s = struct.unpack_from("<HH", p, 1)
        return w, s
    return 0, 0


# --- prepared statements -----------------------------------------------------------------


@dataclass(slots=True)
class PrepareOk:
    statement_id: int
    columns: int
    params: int
    warnings: int
    metadata_follows: bool


def parse_prepare_ok(p: bytes, caps: int) -> PrepareOk:
    if len(p) < 9:
        raise PacketError("truncated STMT_PREPARE_OK")
    stmt_id, cols, params = struct.unpack_from("<IHH", p, 1)
    warnings = _U16.unpack_from(p, 10)[0] if len(p) >= 12 else 0
    follows = True
    if caps & CLIENT_OPTIONAL_RESULTSET_METADATA and len(p) >= 13:
        follows = p[12] != 0
    return PrepareOk(stmt_id, cols, params, warnings, follows)


def parse_binary_params(
    p: bytes,
    num_params: int,
    types: list[int] | None,
    caps: int,
    enc: str,
    long_data: set[int] | frozenset[int] = frozenset(),
) -> tuple[list[str | None], list[int] | None]:
    """Parameter values of COM_STMT_EXECUTE (payload without the command byte).

    Returns (values rendered as text, the parameter types now bound). ``types``
    are the ones bound by a previous execute (sent only when the client re-binds).
    Values the client streamed with COM_STMT_SEND_LONG_DATA (``long_data``, by
    index) are not in the packet: they come back as None and the caller fills them in.
    """
    pos = 9  # statement id (4), flags (1), iteration count (4)
    flags = p[4]
    if flags & 0x08 and caps & CLIENT_QUERY_ATTRIBUTES:  # PARAMETER_COUNT_AVAILABLE
        n, pos = lenenc_int(p, pos)
        num_params = n or 0
    if num_params <= 0 or pos >= len(p):
        return [], types
    nb = (num_params + 7) // 8
    nulls = p[pos : pos + nb]
    pos += nb
    bound = p[pos]
    pos += 1
    if bound:
        types = []
        for _ in range(num_params):
            types.append(p[pos] | (p[pos + 1] << 8))
            pos += 2
            if caps & CLIENT_QUERY_ATTRIBUTES:
                _, pos = lenenc_bytes(p, pos)  # parameter name
    if types is None or len(types) < num_params:
        raise PacketError("EXECUTE without bound parameter types")
    out: list[str | None] = []
    for i in range(num_params):
        if nulls[i >> 3] & (1 << (i & 7)):
            out.append("NULL")
            continue
        if i in long_data:
            out.append(None)
            continue
        t = types[i]
        v, pos = binary_value(p, pos, t & 0xFF, bool(t & 0x8000), enc)
        out.append(v)
    return out, types


_MAX_PARAM_TEXT = 1024


def binary_value(p: bytes, pos: int, t: int, unsigned: bool, enc: str) -> tuple[str, int]:
    if t in _LENENC_TYPES:
        b, pos = lenenc_bytes(p, pos)
        if t in (T_DECIMAL, T_NEWDECIMAL):
            return str(Decimal(b.decode("ascii"))), pos
        if (t >= 0xF9 and t <= 0xFC) or t == 0xFF:  # BLOBs, GEOMETRY: maybe binary
            try:
                s = b.decode(enc)
            except UnicodeDecodeError:
                return f"x'{b[: _MAX_PARAM_TEXT // 2].hex()}'", pos
            return _quote(s), pos
        return _quote(b.decode(enc, "replace")), pos
    if t == T_TINY:
        v = p[pos]
        return str(v if unsigned or v < 128 else v - 256), pos + 1
    if t in (T_SHORT, T_YEAR):
        return str(struct.unpack_from("<H" if unsigned else "<h", p, pos)[0]), pos + 2
    if t in (T_LONG, T_INT24):
        return str(struct.unpack_from("<I" if unsigned else "<i", p, pos)[0]), pos + 4
    if t == T_LONGLONG:
        return str(struct.unpack_from("<Q" if unsigned else "<q", p, pos)[0]), pos + 8
    if t == T_FLOAT:
        return repr(struct.unpack_from("<f", p, pos)[0]), pos + 4
    if t == T_DOUBLE:
        return repr(struct.unpack_from("<d", p, pos)[0]), pos + 8
    if t == T_NULL:
        return "NULL", pos
    if t in _DATE_TYPES:
        n = p[pos]
        d = p[pos + 1 : pos + 1 + n]
        pos += 1 + n
        if n == 0:
            return "'0000-00-00 00:00:00'", pos
        if n not in (4, 7, 11):
            raise PacketError(f"DATETIME parameter of {n} bytes")
        y = _U16.unpack_from(d, 0)[0]
        s = f"{y:04d}-{d[2]:02d}-{d[3]:02d}"
        if n >= 7:
            s += f" {d[4]:02d}:{d[5]:02d}:{d[6]:02d}"
        if n == 11:
            s += f".{_U32.unpack_from(d, 7)[0]:06d}"
        return f"'{s}'", pos
    if t in (T_TIME, T_TIME2):
        n = p[pos]
        d = p[pos + 1 : pos + 1 + n]
        pos += 1 + n
        if n == 0:
            return "'00:00:00'", pos
        if n not in (8, 12):
            raise PacketError(f"TIME parameter of {n} bytes")
        neg = "-" if d[0] else ""
        days = _U32.unpack_from(d, 1)[0]
        s = f"{neg}{days * 24 + d[5]:02d}:{d[6]:02d}:{d[7]:02d}"
        if n == 12:
            s += f".{_U32.unpack_from(d, 8)[0]:06d}"
        return f"'{s}'", pos
    raise PacketError(f"unknown parameter type 0x{t:02x}")


def _quote(s: str) -> str:
    if len(s) > _MAX_PARAM_TEXT:
        s = s[:_MAX_PARAM_TEXT] + "..."
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- character sets ----------------------------------------------------------------------

# collation ids whose character set is not a UTF-8 variant; everything else decodes as UTF-8
_LATIN1 = frozenset({5, 8, 15, 31, 47, 48, 49, 94})
_BINARY = 63


def charset_codec(collation: int) -> str:
    if collation in _LATIN1 or collation == _BINARY:
        return "latin-1"
    return "utf-8"


def packet(seq: int, payload: bytes) -> bytes:
    """Frame a payload (< 16 MiB) as one packet."""
    n = len(payload)
    return bytes((n & 0xFF, (n >> 8) & 0xFF, (n >> 16) & 0xFF, seq & 0xFF)) + payload


def err_packet(seq: int, code: int, sqlstate: str, message: str) -> bytes:
    body = b"\xff" + _U16.pack(code) + b"#" + sqlstate.encode("ascii")[:5]
    return packet(seq, body + message.encode("utf-8"))
