"""Pure functions over AMQP content-header frames: read properties, find and add
the ``traceparent`` header.

Why not pamqp here: decoding a content header with pamqp costs ~6.5 us and
re-marshalling it is not byte-identical (it sorts table keys and re-picks integer
types), which would alter every other header an application sent. These
functions instead walk the property list with ``struct`` and splice one table
entry in, so every other byte stays as the client wrote it. They are checked
against pamqp in tests/unit/proxies/amqp/test_rewrite.py.

A content-header payload (after the 7-byte frame header) is::

    class-id:2 weight:2 body-size:8 property-flags:2 [more flag words] properties...

with properties in flag-bit order 15..2 (content_type ... cluster_id).
"""

from __future__ import annotations

import struct
from typing import Any

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HDR = struct.Struct(">HHQH")  # class, weight, body size, first flag word
_FRAME_HDR = struct.Struct(">BHI")

FLAG_HEADERS = 1 << 13
TRACEPARENT_KEY = b"traceparent"
_NEEDLE = b"\x0b" + TRACEPARENT_KEY

# (flag bit, name, kind) in wire order; kind: s=shortstr, t=table, o=octet, T=timestamp
_PROPS = (
    (15, "content_type", "s"),
    (14, "content_encoding", "s"),
    (13, "headers", "t"),
    (12, "delivery_mode", "o"),
    (11, "priority", "o"),
    (10, "correlation_id", "s"),
    (9, "reply_to", "s"),
    (8, "expiration", "s"),
    (7, "message_id", "s"),
    (6, "timestamp", "T"),
    (5, "type", "s"),
    (4, "user_id", "s"),
    (3, "app_id", "s"),
    (2, "cluster_id", "s"),
)


class HeaderError(ValueError):
    """A content header that does not parse."""


class ContentHeader:
    """The parsed view of a content-header payload (offsets into it, decoded properties)."""

    __slots__ = (
        "body_size",
        "class_id",
        "flags",
        "headers_end",
        "headers_start",
        "props",
        "props_start",
    )

    def __init__(self) -> None:
        self.class_id = 0
        self.body_size = 0
        self.flags = 0
        self.props: dict[str, Any] = {}
        self.props_start = 0
        # headers table: [headers_start, headers_end) covers the 4-byte length and
        # the entries; when absent, headers_start is where it would be inserted.
        self.headers_start = -1
        self.headers_end = -1

    @property
    def has_headers(self) -> bool:
        return bool(self.flags & FLAG_HEADERS)


_PLANS: dict[int, tuple[tuple[str, str], ...]] = {}


def _plan(flags: int) -> tuple[tuple[str, str], ...]:
    """The (name, kind) of the properties present for ``flags``, in wire order (cached:
    a connection sends a handful of distinct flag words)."""
    plan = _PLANS.get(flags)
    if plan is None:
        plan = _PLANS[flags] = tuple(
            (name, kind) for bit, name, kind in _PROPS if flags & (1 << bit)
        )
    return plan


def parse_content_header(
    p: bytes, start: int = 0, end: int | None = None, props: bool = True
) -> ContentHeader:
    """Parse the payload ``p[start:end]`` of a content-header frame (``props=False``:
    only locate the properties, e.g. the headers table, without decoding values)."""
    if end is None:
        end = len(p)
    if end - start < 14:
        raise HeaderError("content header shorter than 14 bytes")
    h = ContentHeader()
    h.class_id, _weight, h.body_size, flags = _HDR.unpack_from(p, start)
    pos = start + 14
    more = flags & 1
    while more:  # continuation flag words: Basic defines no properties there
        if pos + 2 > end:
            raise HeaderError("truncated property flags")
        (extra,) = _U16.unpack_from(p, pos)
        pos += 2
        if extra & 0xFFFE:
            raise HeaderError("property flag beyond the Basic class's 14 properties")
        more = extra & 1
    if flags & 0b10:
        raise HeaderError("reserved property flag bit 1 set")
    h.flags = flags
    h.props_start = pos
    values = h.props
    want = props
    if not flags & FLAG_HEADERS:
        h.headers_start = -2  # computed below, once content_type/encoding are skipped
    for name, kind in _plan(flags & 0xFFFC):
        if kind == "s":
            if h.headers_start == -2 and name != "content_type" and name != "content_encoding":
                h.headers_start = h.headers_end = pos
            n = p[pos]
            stop = pos + 1 + n
            if stop > end:
                raise HeaderError(f"{name} runs past the frame")
            if want:
                values[name] = p[pos + 1 : stop].decode("utf-8", "replace")
            pos = stop
            continue
        if h.headers_start == -2:
            h.headers_start = h.headers_end = pos
        if kind == "t":
            (n,) = _U32.unpack_from(p, pos)
            stop = pos + 4 + n
            if stop > end:
                raise HeaderError("headers table runs past the frame")
            h.headers_start, h.headers_end = pos, stop
            pos = stop
        elif kind == "o":
            if pos >= end:
                raise HeaderError(f"{name} runs past the frame")
            if want:
                values[name] = p[pos]
            pos += 1
        else:  # timestamp
            if pos + 8 > end:
                raise HeaderError("timestamp runs past the frame")
            if want:
                (values[name],) = _U64.unpack_from(p, pos)
            pos += 8
    if h.headers_start == -2:  # no property after the headers' place
        h.headers_start = h.headers_end = pos
    if pos != end:
        raise HeaderError(f"{end - pos} unexpected bytes after the properties")
    return h


# --- field tables --------------------------------------------------------------------------

# fixed value sizes by AMQP field type (RabbitMQ's dialect, which pamqp and every
# client speak: 's' is a short int, 'x' byte array, 'u' short uint)
_FIXED = {
    ord("t"): 1,
    ord("b"): 1,
    ord("B"): 1,
    ord("s"): 2,
    ord("u"): 2,
    ord("I"): 4,
    ord("i"): 4,
    ord("l"): 8,
    ord("L"): 8,
    ord("f"): 4,
    ord("d"): 8,
    ord("D"): 5,
    ord("T"): 8,
    ord("V"): 0,
    0: 0,  # void as some clients write it; pamqp accepts it too
}
_LONG_PREFIXED = (ord("S"), ord("x"), ord("A"), ord("F"))


def table_lookup(p: bytes, start: int, end: int, key: bytes) -> tuple[int, int, int] | None:
    """Find ``key`` among the top-level entries of the field table at ``p[start:end]``
    (``start`` points at its 4-byte length). Returns (type, value_start, value_end)."""
    (n,) = _U32.unpack_from(p, start)
    pos = start + 4
    stop = pos + n
    if stop != end:
        raise HeaderError("field table length disagrees with its frame")
    while pos < stop:
        klen = p[pos]
        k_end = pos + 1 + klen
        if k_end >= stop:
            raise HeaderError("field table key runs past the table")
        t = p[k_end]
        v = k_end + 1
        if t in _LONG_PREFIXED:
            if v + 4 > stop:
                raise HeaderError("field value length runs past the table")
            (vn,) = _U32.unpack_from(p, v)
            v_end = v + 4 + vn
        elif t in _FIXED:
            v_end = v + _FIXED[t]
        else:
            raise HeaderError(f"unknown field type {chr(t)!r}")
        if v_end > stop:
            raise HeaderError("field value runs past the table")
        if klen == len(key) and p[pos + 1 : k_end] == key:
            return t, v, v_end
        pos = v_end
    return None


def find_traceparent(p: bytes, h: ContentHeader) -> str | None:
    """The ``traceparent`` header's value as a string, or None (absent or not a string)."""
    if not h.flags & FLAG_HEADERS:
        return None
    hs, he = h.headers_start, h.headers_end
    at = p.find(_NEEDLE, hs, he)
    if at < 0:
        return None
    if at == hs + 4 and at + 17 <= he and p[at + 12] == 83:  # 'S'
        # the table's first key (where a table that only holds sniff's tag has
        # it): no walk needed to know this is a key and not inside a value
        (n,) = _U32.unpack_from(p, at + 13)
        if at + 17 + n <= he:
            return p[at + 17 : at + 17 + n].decode("latin-1")
    found = table_lookup(p, hs, he, TRACEPARENT_KEY)
    if found is None:
        return None
    t, v, v_end = found
    if t not in (ord("S"), ord("x")):
        return None
    return p[v + 4 : v_end].decode("latin-1")


_ENTRY_55 = _NEEDLE + b"S" + _U32.pack(55)  # what precedes a version-00 traceparent


def traceparent_entry(traceparent: str) -> bytes:
    value = traceparent.encode("ascii")
    if len(value) == 55:
        return _ENTRY_55 + value
    return _NEEDLE + b"S" + _U32.pack(len(value)) + value


def inject_traceparent(
    frame: bytes, start: int, end: int, h: ContentHeader, traceparent: str
) -> bytes:
    """Return a whole new content-header frame (7-byte header to end byte) equal to
    ``frame[start-7:end+1]`` with a ``traceparent`` entry appended to its headers
    table (created if the message had none). Nothing else changes."""
    entry = traceparent_entry(traceparent)
    channel = _U16.unpack_from(frame, start - 6)[0]
    if h.flags & FLAG_HEADERS:
        hs, he = h.headers_start, h.headers_end
        (n,) = _U32.unpack_from(frame, hs)
        payload = b"".join(
            (frame[start:hs], _U32.pack(n + len(entry)), frame[hs + 4 : he], entry, frame[he:end])
        )
    else:
        hs = h.headers_start
        flags_word = _U16.unpack_from(frame, start + 12)[0] | FLAG_HEADERS
        payload = b"".join(
            (
                frame[start : start + 12],
                _U16.pack(flags_word),
                frame[start + 14 : hs],
                _U32.pack(len(entry)),
                entry,
                frame[hs:end],
            )
        )
    return _FRAME_HDR.pack(2, channel, len(payload)) + payload + b"\xce"


def injected_size(h: ContentHeader, payload_len: int) -> int:
    """The full frame size (header + payload + end byte) after injection."""
    extra = 17 + 55 + (0 if h.flags & FLAG_HEADERS else 4)
    return 7 + payload_len + extra + 1


def decode_headers(raw: bytes | None) -> dict[str, Any]:
    """Decode a raw headers table with pamqp (off the hot path: correlator, reports)."""
    if not raw:
        return {}
    from pamqp import decode

    try:
        _, value = decode.field_table(raw)
    except Exception:
        return {}
    return {str(k): v for k, v in value.items()}
