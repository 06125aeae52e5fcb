"""Bind parameter rendering (only used with capture_sql_literals)."""

from __future__ import annotations

import struct

from proxies.postgres.params import parse_bind


def _bind(fmts: list[int], vals: list[bytes | None]) -> bytes:
    body = b"p\x00s\x00" + struct.pack(f">H{len(fmts)}H", len(fmts), *fmts)
    body += struct.pack(">H", len(vals))
    for v in vals:
        body += struct.pack(">i", -1) if v is None else struct.pack(">i", len(v)) + v
    return body + b"\x00\x00"


def test_text_format() -> None:
    assert parse_bind(_bind([], [b"42", "é".encode(), None]), None, "utf-8") == ["42", "é", None]


def test_binary_by_type() -> None:
    vals = [
        struct.pack(">q", -5),
        struct.pack(">h", 7),
        struct.pack(">d", 1.5),
        b"\x01",
        struct.pack(">i", 1),
        struct.pack(">q", 86_400_000_000),
        b"\x01{}",
        b"\xde\xad",
    ]
    types = (20, 21, 701, 16, 1082, 1114, 3802, 9999)
    assert parse_bind(_bind([1], vals), types, "utf-8") == [
        "-5",
        "7",
        "1.5",
        "true",
        "2000-01-02",
        "2000-01-02 00:00:00",
        "{}",
        "\\xdead",
    ]


def test_mixed_formats_and_unknown_types() -> None:
    got = parse_bind(_bind([0, 1], [b"text", b"\x00\x00\x00\x2a"]), None, "utf-8")
    assert got == ["text", "\\x0000002a"]


def test_malformed_is_none_not_an_exception() -> None:
    assert parse_bind(b"", None, "utf-8") is None
    assert parse_bind(b"p\x00s\x00\x00\x00\x00\x01\x00\x00\x00\x09ab", None, "utf-8") is None
    assert parse_bind(_bind([1], [b"\x00"]), (23,), "utf-8") == ["\\x00"]  # too short for int4
