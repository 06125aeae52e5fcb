"""``decode = "capture"`` gives the same events as ``decode = "inline"`` for the same traffic.

The recorded PostgreSQL sessions (tests/fixtures/postgres) and built message
sequences are played through the real relay with the handler each mode uses (see
``tests/unit/proxies/sql/modes.py``): events equal field by field, the bytes on both
wires equal, and capture mode shipped exactly what it forwarded, plus the SSL and
GSSENC requests it answered itself as marked chunks (never as bytes the server saw).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxies.postgres.handler import PostgresCaptureHandler, PostgresHandler
from proxies.sql.capture import capture_mode
from tests.unit.proxies.postgres.pgwire import (
    GSSENC_REQUEST,
    SERVER_HELLO,
    SSL_REQUEST,
    SYNC,
    bind,
    complete,
    datarow,
    execute,
    fixture,
    parse,
    query,
    ready,
    startup,
)
from tests.unit.proxies.sql.modes import (
    Outcome,
    ShipSink,
    Step,
    assert_same,
    both,
    one_conn,
    proxy,
)

CFG = proxy("postgres", capture_sql_literals=True)
Chunks = list[tuple[int, bytes]]


def through_sniff(name: str) -> Chunks:
    """A recorded transcript as it runs through sniff: SSL/GSSENC requests at the start are
    answered by sniff, so the server's recorded one-byte answers never come."""
    chunks = [(0 if c2s else 1, b) for c2s, b in fixture(name)]
    c = b"".join(b for d, b in chunks if d == 0)
    answers = 0
    while c[8 * answers : 8 * answers + 8] in (SSL_REQUEST, GSSENC_REQUEST):
        answers += 1
    out: Chunks = []
    for d, b in chunks:
        if d == 1 and answers:
            k = min(answers, len(b))
            assert b[:k] == b"N" * k
            b, answers = b[k:], answers - k
            if not b:
                continue
        out.append((d, b))
    return out


def _play(
    script: list[Step], monkeypatch: pytest.MonkeyPatch, **opts: Any
) -> tuple[Outcome, Outcome]:
    cfg = proxy("postgres", **opts) if opts else CFG
    inline, capture = both(cfg, script, monkeypatch)
    for conn in capture.handlers:
        assert isinstance(inline.handlers[conn], PostgresHandler)
        assert isinstance(capture.handlers[conn], PostgresCaptureHandler)
    assert_same(inline, capture)
    return inline, capture


def _bytewise(chunks: Chunks) -> Chunks:
    return [(d, b[i : i + 1]) for d, b in chunks for i in range(len(b))]


NAMES = [
    "asyncpg.bin",
    "asyncpg_large.bin",
    "auth_fail.bin",
    "auth_md5.bin",
    "auth_pw.bin",
    "auth_scram.bin",
    "psycopg.bin",
]


@pytest.mark.parametrize("name", NAMES)
def test_recorded_sessions_same_events(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inline, _ = _play(one_conn(through_sniff(name)), monkeypatch)
    assert inline.of("postgres.session") and not inline.of("core.protocol_error")
    _play(one_conn(through_sniff(name)), monkeypatch, capture_sql_literals=False)


@pytest.mark.parametrize("name", ["psycopg.bin", "auth_scram.bin"])
def test_recorded_sessions_byte_by_byte(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _play(one_conn(_bytewise(through_sniff(name))), monkeypatch)


def test_psycopg_ssl_request_is_answered_in_line_and_shipped_marked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunks = through_sniff("psycopg.bin")
    assert chunks[0] == (0, SSL_REQUEST)
    _, capture = _play(one_conn(chunks), monkeypatch)
    assert capture.to_client[11][:1] == b"N"
    assert not capture.to_server[11].startswith(SSL_REQUEST)  # the server never sees it
    first = capture.shipped[0]
    assert (first.data, first.meta) == (SSL_REQUEST, ("answered", "10.1.2.3:40000"))
    assert [e.code for e in capture.of("core.note")] == ["postgres.ssl_refused"]


def test_split_around_the_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the capture handler does its own work: the requests and the startup packet,
    cut at every offset, and delivered in one chunk."""
    chunks = through_sniff("psycopg.bin")
    for k in range(1, 130):
        _play(one_conn(_split_client(chunks, k)), monkeypatch)
    c = b"".join(b for d, b in chunks if d == 0)
    (ln,) = struct.unpack_from(">I", c, 8)
    joined = [(0, c[: 8 + ln]), *_split_client(chunks, 8 + ln)[2:]]
    assert b"".join(b for d, b in joined if d == 0) == c
    _play(one_conn(joined), monkeypatch)


def _split_client(chunks: Chunks, k: int) -> Chunks:
    """The transcript with the client stream cut in two at offset ``k``."""
    out: Chunks = []
    seen = 0
    for d, b in chunks:
        if d == 0 and seen < k < seen + len(b):
            out += [(d, b[: k - seen]), (d, b[k - seen :])]
        else:
            out.append((d, b))
        if d == 0:
            seen += len(b)
    return out


def test_gssenc_then_ssl_then_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: Chunks = [
        (0, GSSENC_REQUEST),
        (0, SSL_REQUEST + startup()),
        (1, SERVER_HELLO),
        (0, query("SELECT 1")),
        (1, datarow(b"1") + complete("SELECT 1") + ready()),
    ]
    _, capture = _play(one_conn(chunks), monkeypatch)
    assert capture.to_client[11][:2] == b"NN"
    assert [e.code for e in capture.of("core.note")] == ["postgres.ssl_refused"]
    (q,) = capture.of("postgres.query")
    assert q.rows_returned == 1


def test_client_requiring_tls_leaves_after_the_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    _, capture = _play(one_conn([(0, SSL_REQUEST)]), monkeypatch)
    notes = capture.of("core.note")
    assert [n.code for n in notes] == ["postgres.ssl_refused", "postgres.tls_required"]
    assert "client 10.1.2.3:40000 closed the connection" in notes[1].message


def test_direct_tls_is_shipped_once_then_only_relayed(monkeypatch: pytest.MonkeyPatch) -> None:
    hello = b"\x16\x03\x01\x02\x00" + b"\x01" * 60
    chunks: Chunks = [(0, hello), (1, b"\x16\x03\x03" + b"\x02" * 40), (0, b"\x17" * 30)]
    _, capture = _play(one_conn(chunks), monkeypatch)
    assert [e.code for e in capture.of("core.note")] == ["postgres.direct_tls_passthrough"]
    assert [r.data for r in capture.shipped] == [hello]
    assert capture.handlers[11].observe is False


def test_cancel_request_names_the_connection_it_cancels(monkeypatch: pytest.MonkeyPatch) -> None:
    main = through_sniff("asyncpg_cancel.bin")
    cancel = through_sniff("asyncpg_cancel-1.bin")
    script: list[Step] = [
        ("open", 1),
        *((1, d, b) for d, b in main),
        ("open", 2),
        *((2, d, b) for d, b in cancel),
        ("close", 2),
        ("close", 1),
    ]
    _, capture = _play(script, monkeypatch)
    (c,) = capture.of("postgres.cancel")
    assert c.target_conn == 1 and c.conn == 2
    assert capture.handlers[2].observe is False  # nothing after a CancelRequest is decoded


def test_replication_startup_is_shipped_then_only_relayed(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: Chunks = [
        (0, startup(replication="database")),
        (1, SERVER_HELLO),
        (0, query("IDENTIFY_SYSTEM")),
        (1, b"W" + struct.pack(">I", 7) + b"\x00\x00\x00"),
    ]
    _, capture = _play(one_conn(chunks), monkeypatch)
    assert [e.code for e in capture.of("core.note")] == ["postgres.replication"]
    assert len(capture.shipped) == 1 and capture.handlers[11].observe is False


def test_extended_protocol_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: Chunks = [
        (0, startup()),
        (1, SERVER_HELLO),
        (0, parse("s1", "SELECT $1::int") + bind("", "s1", [b"7"]) + execute() + SYNC),
        (1, b"1\x00\x00\x00\x04" + b"2\x00\x00\x00\x04" + datarow(b"7") + complete("SELECT 1")),
        (1, ready()),
        (0, b"X\x00\x00\x00\x03"),  # a bad length: a protocol error, traffic untouched
    ]
    _, capture = _play(one_conn(chunks), monkeypatch)
    assert len(capture.of("core.protocol_error")) == 1
    assert [q.text for q in capture.of("postgres.query")] == ["SELECT $1::int"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.binary(min_size=1, max_size=40)), min_size=1, max_size=8
    ),
    st.sampled_from([b"", SSL_REQUEST, GSSENC_REQUEST + SSL_REQUEST, startup()]),
)
def test_fuzz_same_events_and_bytes_untouched(chunks: Chunks, opening: bytes) -> None:
    script = one_conn(([(0, opening)] if opening else []) + chunks)
    with pytest.MonkeyPatch.context() as mp:
        inline, capture = both(CFG, script, mp)
    assert capture.dumped() == inline.dumped()
    assert capture.to_server == inline.to_server
    assert capture.to_client == inline.to_client


def test_in_line_where_statements_are_rewritten() -> None:
    from proxies.postgres import create_listener

    assert capture_mode(CFG, ShipSink())
    assert not capture_mode(proxy("postgres", sqlcommenter=True))
    assert not capture_mode(proxy("postgres", tls={"cert": "c", "key": "k"}))
    assert not capture_mode(proxy("postgres", decode="inline"))
    assert create_listener(CFG, ShipSink()).handler_factory is PostgresCaptureHandler
