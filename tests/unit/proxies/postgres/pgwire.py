"""Helpers for decoder tests: build protocol messages, replay transcripts, frame streams."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from proxies.postgres.decoder import PostgresDecoder
from sniff.events import Event, dumps
from tests.fixtures.postgres.record import read_transcript

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "postgres"

Chunks = list[tuple[bool, bytes]]


def fixture(name: str) -> Chunks:
    return read_transcript(FIXTURES / name)


def msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack(">I", 4 + len(body)) + body


def cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def startup(user: str = "u", database: str = "db", **extra: str) -> bytes:
    body = struct.pack(">I", 196608)
    for k, v in {"user": user, "database": database, **extra}.items():
        body += cstr(k) + cstr(v)
    body += b"\x00"
    return struct.pack(">I", 4 + len(body)) + body


SSL_REQUEST = struct.pack(">II", 8, 80877103)
GSSENC_REQUEST = struct.pack(">II", 8, 80877104)


def query(sql: str) -> bytes:
    return msg(b"Q", cstr(sql))


def parse(name: str, sql: str, ntypes: int = 0) -> bytes:
    return msg(
        b"P", cstr(name) + cstr(sql) + struct.pack(">H", ntypes) + b"\x00\x00\x00\x17" * ntypes
    )


def bind(portal: str = "", stmt: str = "", params: Iterable[bytes] = ()) -> bytes:
    ps = list(params)
    body = cstr(portal) + cstr(stmt) + struct.pack(">H", 0) + struct.pack(">H", len(ps))
    for p in ps:
        body += struct.pack(">i", len(p)) + p
    return msg(b"B", body + struct.pack(">H", 0))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", cstr(portal) + struct.pack(">I", max_rows))


def describe(kind: str, name: str = "") -> bytes:
    return msg(b"D", kind.encode() + cstr(name))


def close(kind: str, name: str = "") -> bytes:
    return msg(b"C", kind.encode() + cstr(name))


SYNC = msg(b"S")
FLUSH = msg(b"H")

# server side
AUTH_OK = msg(b"R", struct.pack(">I", 0))


def ready(status: str = "I") -> bytes:
    return msg(b"Z", status.encode())


def complete(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


def datarow(*cols: bytes) -> bytes:
    body = struct.pack(">H", len(cols))
    for c in cols:
        body += struct.pack(">i", len(c)) + c
    return msg(b"D", body)


def error(code: str, message: str, severity: str = "ERROR") -> bytes:
    return msg(
        b"E",
        b"S"
        + cstr(severity)
        + b"V"
        + cstr(severity)
        + b"C"
        + cstr(code)
        + b"M"
        + cstr(message)
        + b"\x00",
    )


ROWDESC = msg(b"T", struct.pack(">H", 1) + cstr("c") + struct.pack(">IhIhih", 0, 0, 25, -1, -1, 0))
PARSE_OK = msg(b"1")
BIND_OK = msg(b"2")
CLOSE_OK = msg(b"3")
NO_DATA = msg(b"n")
SUSPENDED = msg(b"s")
EMPTY = msg(b"I")
SERVER_HELLO = (
    AUTH_OK
    + msg(b"S", cstr("server_version") + cstr("15.0"))
    + msg(b"K", struct.pack(">II", 4242, 0xDEADBEEF))
    + ready()
)


class Replay:
    """A decoder with a fixed clock and counting span ids, fed chunk by chunk."""

    def __init__(self, **kw: Any) -> None:
        self.events: list[Event] = []
        self.replies: list[bytes] = []
        self.out: list[bytes] = []
        counter = itertools.count(1)
        kw.setdefault("ssl_policy", "forward")
        self.dec = PostgresDecoder(
            7,
            self.events.append,
            clock=lambda: 1_000,
            new_span_id=lambda: f"{next(counter):016x}",
            new_trace_id=lambda: f"{next(counter):032x}",
            reply=self.replies.append,
            **kw,
        )

    def feed(self, chunks: Iterable[tuple[bool, bytes]]) -> Replay:
        for c2s, chunk in chunks:
            if c2s:
                self.out.append(self.dec.feed_client(chunk))
            else:
                self.dec.feed_server(chunk)
        return self

    def end(self) -> Replay:
        self.out.append(self.dec.flush_client())
        self.dec.close("eof")
        return self

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.kind == kind]

    def dumped(self) -> list[bytes]:
        return [dumps(e) for e in self.events]

    def forwarded(self) -> bytes:
        return b"".join(self.out)


def replay(chunks: Chunks, **kw: Any) -> Replay:
    return Replay(**kw).feed(chunks).end()


def runs(chunks: Chunks) -> Chunks:
    """Consecutive chunks of one direction joined: each direction's bytes 'whole' between turns."""
    out: Chunks = []
    for c2s, chunk in chunks:
        if out and out[-1][0] == c2s:
            out[-1] = (c2s, out[-1][1] + chunk)
        else:
            out.append((c2s, chunk))
    return out


def split_at(chunks: Chunks, c2s: bool, offset: int) -> Chunks:
    """The same transcript with the ``c2s`` stream cut in two at ``offset``."""
    out: Chunks = []
    pos = 0
    for d, chunk in chunks:
        if d == c2s and pos < offset < pos + len(chunk):
            cut = offset - pos
            out += [(d, chunk[:cut]), (d, chunk[cut:])]
        else:
            out.append((d, chunk))
        if d == c2s:
            pos += len(chunk)
    return out


def bytewise(chunks: Chunks) -> Chunks:
    return [(d, chunk[i : i + 1]) for d, chunk in chunks for i in range(len(chunk))]


def stream(chunks: Chunks, c2s: bool) -> bytes:
    return b"".join(c for d, c in chunks if d == c2s)


def boundaries(data: bytes, c2s: bool) -> list[int]:
    """Offsets where messages start in one direction's stream (startup-aware)."""
    out = []
    pos = 0
    startup = c2s
    while pos + 5 <= len(data):
        out.append(pos)
        if startup:
            (ln, code) = struct.unpack_from(">II", data, pos)
            pos += ln
            if code >> 16 == 3 or code == 80877102:
                startup = False
            continue
        if not c2s and data[pos] in b"NS" and pos + 1 < len(data) and data[pos + 1] in b"RE":
            pos += 1  # the server's one-byte answer to a forwarded SSLRequest
            continue
        (ln,) = struct.unpack_from(">I", data, pos + 1)
        pos += 1 + ln
    return out


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of each typed message in ``data``."""
    out = []
    pos = 0
    while pos + 5 <= len(data):
        (ln,) = struct.unpack_from(">I", data, pos + 1)
        out.append((data[pos : pos + 1], data[pos + 5 : pos + 1 + ln]))
        pos += 1 + ln
    return out
