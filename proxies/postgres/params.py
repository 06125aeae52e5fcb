"""Bound parameters of a Bind message, rendered as text (only with capture_sql_literals).

Strategy. A Bind carries each value in text or binary format. Text values are
decoded as they are. Binary values are rendered from their type, known from the
Parse message's parameter types or the server's ParameterDescription, for the
types clients bind most (integers, floats, bool, text, uuid, bytea, date,
timestamp); anything else is shown as ``\\x`` + hex, as PostgreSQL shows bytea.
This runs only when literals are kept (off by default); parsing errors give
``None`` rather than an exception, and never affect the relayed bytes.
"""

from __future__ import annotations

import datetime
import struct
import uuid
from collections.abc import Callable

_EPOCH_DATE = datetime.date(2000, 1, 1)
_EPOCH = datetime.datetime(2000, 1, 1)
_VALUE_MAX = 1024  # characters of one rendered value

_BINARY: dict[int, Callable[[bytes], str]] = {
    16: lambda b: "true" if b[:1] == b"\x01" else "false",  # bool
    20: lambda b: str(struct.unpack(">q", b)[0]),  # int8
    21: lambda b: str(struct.unpack(">h", b)[0]),  # int2
    23: lambda b: str(struct.unpack(">i", b)[0]),  # int4
    26: lambda b: str(struct.unpack(">I", b)[0]),  # oid
    700: lambda b: repr(struct.unpack(">f", b)[0]),  # float4
    701: lambda b: repr(struct.unpack(">d", b)[0]),  # float8
    2950: lambda b: str(uuid.UUID(bytes=b)),  # uuid
    1082: lambda b: (_EPOCH_DATE + datetime.timedelta(days=struct.unpack(">i", b)[0])).isoformat(),
    1114: lambda b: (_EPOCH + datetime.timedelta(microseconds=struct.unpack(">q", b)[0])).isoformat(
        " "
    ),
    1184: lambda b: (
        (_EPOCH + datetime.timedelta(microseconds=struct.unpack(">q", b)[0])).isoformat(" ") + "+00"
    ),
}
_TEXTUAL = frozenset(
    {18, 19, 25, 114, 142, 1042, 1043}
)  # char, name, text, json, xml, bpchar, varchar


def parse_bind(
    body: bytes, types: tuple[int, ...] | None, encoding: str
) -> list[str | None] | None:
    """The parameter values of a Bind message body, as text; None if it cannot be read."""
    try:
        i = body.index(0)
        i = body.index(0, i + 1) + 1  # after the portal and statement names
        (nfmt,) = struct.unpack_from(">H", body, i)
        fmts = struct.unpack_from(f">{nfmt}H", body, i + 2)
        i += 2 + 2 * nfmt
        (n,) = struct.unpack_from(">H", body, i)
        i += 2
        out: list[str | None] = []
        for k in range(n):
            (ln,) = struct.unpack_from(">i", body, i)
            i += 4
            if ln < 0:
                out.append(None)
                continue
            raw = body[i : i + ln]
            if len(raw) != ln:
                return None
            i += ln
            fmt = fmts[0] if nfmt == 1 else (fmts[k] if nfmt else 0)
            oid = types[k] if types is not None and k < len(types) else 0
            out.append(_render(raw, fmt, oid, encoding))
        return out
    except (ValueError, IndexError, struct.error):
        return None


def _render(raw: bytes, fmt: int, oid: int, encoding: str) -> str:
    if fmt == 0 or oid in _TEXTUAL:
        s = raw.decode(encoding, "replace")
    elif oid == 3802 and raw[:1] == b"\x01":  # jsonb: a version byte, then text
        s = raw[1:].decode(encoding, "replace")
    else:
        fn = _BINARY.get(oid)
        try:
            s = fn(raw) if fn is not None else "\\x" + raw[: _VALUE_MAX // 2].hex()
        except (ValueError, OverflowError, struct.error):
            s = "\\x" + raw[: _VALUE_MAX // 2].hex()
    return s if len(s) <= _VALUE_MAX else s[:_VALUE_MAX] + "..."
