"""Builders for MySQL packets in unit tests, and the decoder test driver.

Real sessions are recorded in ``tests/fixtures/mysql``; these builders cover what
MariaDB on this machine cannot produce (caching_sha2_password, MySQL 8 query
attributes, a server that offers TLS or compression, garbage).
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path
from typing import Any

from proxies.mysql import packets as P
from proxies.mysql.decoder import MysqlDecoder
from tests.fixtures.mysql.record import read_transcript

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "mysql"

Chunks = list[tuple[int, bytes]]  # (0 = client -> server, 1 = server -> client, bytes)


def load(name: str) -> Chunks:
    return [(0 if d == "C" else 1, b) for d, b in read_transcript(FIXTURES / f"{name}.bin")]


def pkt(seq: int, payload: bytes) -> bytes:
    return P.packet(seq, payload)


def lenenc(n: int) -> bytes:
    if n < 0xFB:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfc" + struct.pack("<H", n)
    if n < 1 << 24:
        return b"\xfd" + struct.pack("<I", n)[:3]
    return b"\xfe" + struct.pack("<Q", n)


def lstr(b: bytes) -> bytes:
    return lenenc(len(b)) + b


SCRAMBLE = bytes(range(0x41, 0x41 + 20))
DEFAULT_CAPS = (
    P.CLIENT_LONG_PASSWORD
    | P.CLIENT_CONNECT_WITH_DB
    | P.CLIENT_PROTOCOL_41
    | P.CLIENT_TRANSACTIONS
    | P.CLIENT_SECURE_CONNECTION
    | P.CLIENT_MULTI_STATEMENTS
    | P.CLIENT_MULTI_RESULTS
    | P.CLIENT_PLUGIN_AUTH
    | P.CLIENT_CONNECT_ATTRS
    | P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
)


def greeting(caps: int, plugin: str = "mysql_native_password", version: str = "8.0.36") -> bytes:
    body = b"\x0a" + version.encode() + b"\x00" + struct.pack("<I", 42) + SCRAMBLE[:8] + b"\x00"
    body += struct.pack("<H", caps & 0xFFFF) + b"\x21" + struct.pack("<H", 2)
    body += struct.pack("<H", (caps >> 16) & 0xFFFF) + bytes([21]) + b"\x00" * 10
    body += SCRAMBLE[8:] + b"\x00" + plugin.encode() + b"\x00"
    return pkt(0, body)


def handshake_response(
    caps: int,
    user: bytes = b"app",
    auth: bytes = b"",
    db: bytes | None = b"nova",
    plugin: bytes = b"mysql_native_password",
    attrs: dict[bytes, bytes] | None = None,
    seq: int = 1,
) -> bytes:
    body = struct.pack("<IIB23s", caps, 1 << 24, 45, b"") + user + b"\x00" + lstr(auth)
    if db is not None:
        body += db + b"\x00"
    body += plugin + b"\x00"
    if attrs:
        a = b"".join(lstr(k) + lstr(v) for k, v in attrs.items())
        body += lstr(a)
    return pkt(seq, body)


def ok(seq: int, affected: int = 0, status: int = 2, warnings: int = 0, header: int = 0) -> bytes:
    return pkt(
        seq, bytes([header]) + lenenc(affected) + lenenc(0) + struct.pack("<HH", status, warnings)
    )


def err(seq: int, code: int, message: str, state: str = "HY000") -> bytes:
    return P.err_packet(seq, code, state, message)


def eof(seq: int, status: int = 2, warnings: int = 0) -> bytes:
    return pkt(seq, b"\xfe" + struct.pack("<HH", warnings, status))


def coldef(seq: int, name: bytes) -> bytes:
    body = lstr(b"def") + lstr(b"db") + lstr(b"t") + lstr(b"t") + lstr(name) + lstr(name)
    body += b"\x0c" + struct.pack("<HIBHB", 33, 255, 0xFD, 0, 0) + b"\x00\x00"
    return pkt(seq, body)


def text_row(seq: int, *vals: bytes | None) -> bytes:
    return pkt(seq, b"".join(b"\xfb" if v is None else lstr(v) for v in vals))


def resultset(
    seq: int,
    cols: list[bytes],
    rows: list[list[bytes | None]],
    deprecate_eof: bool = False,
    status: int = 2,
) -> bytes:
    out = [pkt(seq, lenenc(len(cols)))]
    seq += 1
    for c in cols:
        out.append(coldef(seq, c))
        seq += 1
    if not deprecate_eof:
        out.append(eof(seq, status))
        seq += 1
    for r in rows:
        out.append(text_row(seq, *r))
        seq += 1
    out.append(ok(seq, status=status, header=0xFE) if deprecate_eof else eof(seq, status))
    return b"".join(out)


def query(text: bytes, seq: int = 0) -> bytes:
    return pkt(seq, b"\x03" + text)


def login(caps: int = DEFAULT_CAPS, **kw: Any) -> Chunks:
    """Greeting, handshake response and OK: a logged-in session to continue from."""
    return [(1, greeting(caps)), (0, handshake_response(caps, **kw)), (1, ok(2))]


class Run:
    """Feed chunks to a decoder with deterministic clock and ids; collect everything."""

    def __init__(self, **kw: Any) -> None:
        counter = itertools.count(1)
        self.events: list[Any] = []
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.dec = MysqlDecoder(
            7,
            self.events.append,
            clock=lambda: 1000,
            new_span_id=lambda: f"{next(counter):016x}",
            new_trace_id=lambda: f"{next(counter):032x}",
            release_client=self.to_server.append,
            release_server=self.to_client.append,
            **kw,
        )

    def feed(self, chunks: Chunks) -> Run:
        for d, data in chunks:
            if d == 0:
                self.to_server.append(self.dec.feed_client(data))
            else:
                self.to_client.append(self.dec.feed_server(data))
        return self

    def close(self, reason: str = "eof") -> Run:
        self.to_server.append(self.dec.flush_client())
        self.to_client.append(self.dec.flush_server())
        self.dec.closed(reason)
        for e in self.events:
            if e.needs_prepare:
                e.prepare()
        return self

    @property
    def out_c(self) -> bytes:
        return b"".join(self.to_server)

    @property
    def out_s(self) -> bytes:
        return b"".join(self.to_client)

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.kind == kind]


def merged(chunks: Chunks) -> Chunks:
    out: Chunks = []
    for d, data in chunks:
        if out and out[-1][0] == d:
            out[-1] = (d, out[-1][1] + data)
        else:
            out.append((d, data))
    return out


def split_at(chunks: Chunks, direction: int, offset: int) -> Chunks:
    out: Chunks = []
    seen = 0
    for d, data in chunks:
        if d == direction and seen < offset < seen + len(data):
            k = offset - seen
            out.extend([(d, data[:k]), (d, data[k:])])
        else:
            out.append((d, data))
        if d == direction:
            seen += len(data)
    return out


def bytewise(chunks: Chunks) -> Chunks:
    return [(d, data[i : i + 1]) for d, data in chunks for i in range(len(data))]


def stream(chunks: Chunks, direction: int) -> bytes:
    return b"".join(data for d, data in chunks if d == direction)


def sessions(chunks: Chunks) -> list[Chunks]:
    """A transcript of several consecutive connections, cut at each server greeting."""
    out: list[Chunks] = []
    for d, data in chunks:
        if (d == 1 and data[3:5] == b"\x00\x0a") or not out:
            out.append([])
        out[-1].append((d, data))
    return out


class Multi:
    """Runs over every session of a transcript, with the events of all of them."""

    def __init__(self, chunks: Chunks, **kw: Any) -> None:
        self.runs = [Run(**kw).feed(s).close() for s in sessions(chunks)]
        self.events = [e for r in self.runs for e in r.events]

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.kind == kind]
