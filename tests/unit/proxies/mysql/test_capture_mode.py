"""``decode = "capture"`` gives the same events as ``decode = "inline"`` for the same traffic.

The recorded MariaDB sessions (tests/fixtures/mysql) and built packet sequences for
what this machine's MariaDB cannot produce (a server offering TLS and compression,
clients that insist on them, garbage) are played through the real relay with the
handler each mode uses (see ``tests/unit/proxies/sql/modes.py``): the events must
be equal field by field (timestamps and ids from one fake clock and counters), the
bytes on both wires equal, and what capture mode shipped exactly what it forwarded.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxies.mysql import packets as P
from proxies.mysql.handler import MysqlCaptureHandler, MysqlHandler, MysqlTlsHandler
from proxies.sql.capture import IdleDecoder, capture_mode
from sniff.decode_host import DecoderHost
from sniff.events import ConnOpen
from tests.unit.proxies.mysql.test_decoder import NAMES
from tests.unit.proxies.mysql.wire import (
    DEFAULT_CAPS,
    Chunks,
    bytewise,
    err,
    greeting,
    handshake_response,
    load,
    login,
    merged,
    ok,
    pkt,
    query,
    resultset,
    sessions,
    split_at,
    stream,
)
from tests.unit.proxies.sql.modes import (
    ListSink,
    Outcome,
    ShipSink,
    assert_same,
    both,
    one_conn,
    proxy,
)

CFG = proxy("mysql")


def _play(
    chunks: Chunks, monkeypatch: pytest.MonkeyPatch, **opts: object
) -> tuple[Outcome, Outcome]:
    inline, capture = both(proxy("mysql", **opts), one_conn(chunks), monkeypatch)
    assert isinstance(inline.handlers[11], MysqlHandler)
    assert isinstance(capture.handlers[11], MysqlCaptureHandler)
    assert_same(inline, capture)
    return inline, capture


def _cases() -> list[tuple[str, int]]:
    return [(n, i) for n in NAMES for i in range(len(sessions(load(n))))]


@pytest.mark.parametrize("name,index", _cases())
def test_recorded_sessions_same_events(
    name: str, index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = sessions(load(name))[index]
    inline, _ = _play(chunks, monkeypatch)
    assert inline.of("mysql.connect") and not inline.of("core.protocol_error")
    _play(merged(chunks), monkeypatch)


@pytest.mark.parametrize("name", ["pymysql_basic", "mariadb_ps", "password"])
def test_recorded_sessions_byte_by_byte(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _play(bytewise(sessions(load(name))[0]), monkeypatch)


@pytest.mark.parametrize("name", ["pymysql_basic", "cli"])
def test_split_around_the_greeting_and_login(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the capture handler does its own work: the greeting (held until whole and
    edited) and the client's first packet (checked for an SSLRequest)."""
    chunks = sessions(load(name))[0]
    for direction in (0, 1):
        for k in range(1, min(200, len(stream(chunks, direction)))):
            _play(split_at(chunks, direction, k), monkeypatch)


def test_server_offering_tls_and_compression(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = DEFAULT_CAPS | P.CLIENT_SSL | P.CLIENT_COMPRESS | P.CLIENT_ZSTD_COMPRESSION_ALGORITHM
    chunks: Chunks = [
        (1, greeting(caps)),
        (0, handshake_response(DEFAULT_CAPS)),
        (1, ok(2)),
        (0, query(b"SELECT * FROM instances WHERE id = 1")),
        (1, resultset(1, [b"id"], [[b"1"]])),
    ]
    _, capture = _play(chunks, monkeypatch)
    g = P.parse_greeting(capture.to_client[11][4 : len(greeting(caps))])
    assert not g.capabilities & P.GREETING_CLEARED
    assert [e.code for e in capture.of("core.note")] == ["mysql.tls_stripped"]
    # the greeting went out edited, with the server's original beside it for the decoder
    first = capture.shipped[0]
    assert first.direction == 1 and first.meta == greeting(caps) and first.data != first.meta


def test_client_requiring_tls_hangs_up_after_the_greeting(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = DEFAULT_CAPS | P.CLIENT_SSL
    _, capture = _play([(1, greeting(caps))], monkeypatch)
    notes = [e.code for e in capture.of("core.note")]
    assert notes == ["mysql.tls_stripped", "mysql.client_hangup_after_greeting"]


def test_hangup_after_a_greeting_without_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    _, capture = _play([(1, greeting(DEFAULT_CAPS))], monkeypatch)
    assert [e.code for e in capture.of("core.note")] == ["mysql.client_hangup_after_greeting"]


def test_ssl_request_anyway_goes_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = DEFAULT_CAPS | P.CLIENT_SSL
    chunks: Chunks = [
        (1, greeting(DEFAULT_CAPS)),
        (0, pkt(1, struct.pack("<IIB23s", caps, 1 << 24, 45, b""))),
        (0, b"\x16\x03\x01\x02\x00\x01" + b"\x00" * 50),  # a ClientHello
        (1, b"\x16\x03\x03\x00\x10" + b"\x01" * 16),
    ]
    inline, capture = both(CFG, one_conn(chunks), monkeypatch)
    assert capture.dumped() == inline.dumped()
    assert capture.to_server == inline.to_server == {11: stream(chunks, 0)}
    assert [e.code for e in capture.of("core.note")] == ["mysql.tls_end_to_end"]
    # nothing after the SSLRequest is shipped: the relay is a plain pump from there
    assert [r.data for r in capture.shipped if r.direction == 0] == [chunks[1][1]]
    assert capture.handlers[11].observe is False


def test_client_negotiating_compression_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = DEFAULT_CAPS | P.CLIENT_COMPRESS
    chunks: Chunks = [
        (1, greeting(caps)),
        (0, handshake_response(caps)),
        (1, ok(2)),
        (0, b"\x05\x00\x00\x00\x00\x00\x00compressed?"),
    ]
    _, capture = _play(chunks, monkeypatch)
    assert [e.code for e in capture.of("core.note")] == ["mysql.compressed"]


def test_server_refusing_before_the_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    _, capture = _play([(1, err(0, 1040, "Too many connections", "08004"))], monkeypatch)
    (c,) = capture.of("mysql.connect")
    assert c.status == "error" and c.error_code == "1040"


def test_protocol_errors_in_the_capture_process(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: Chunks = [*login(), (0, pkt(0, b"\x77hello")), (1, ok(1)), (0, query(b"SELECT 1"))]
    _, capture = _play(chunks, monkeypatch)
    (e,) = capture.of("core.protocol_error")
    assert "unknown command 0x77" in e.reason and not capture.of("mysql.query")


def test_a_garbage_greeting_is_forwarded_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: Chunks = [(1, pkt(0, b"\x09not a v10 greeting")), (0, b"hello"), (1, b"more")]
    _, capture = _play(chunks, monkeypatch)
    assert capture.to_client[11] == stream(chunks, 1)
    assert len(capture.of("core.protocol_error")) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.binary(min_size=1, max_size=40)), min_size=1, max_size=8
    )
)
def test_fuzz_same_events_and_bytes_untouched(chunks: Chunks) -> None:
    with pytest.MonkeyPatch.context() as mp:
        inline, capture = both(CFG, one_conn([(1, greeting(DEFAULT_CAPS)), *chunks]), mp)
    assert capture.dumped() == inline.dumped()
    assert capture.to_server[11] == stream(chunks, 0)
    assert capture.to_client[11][len(greeting(DEFAULT_CAPS)) :] == stream(chunks, 1)
    assert {e.kind for e in capture.events} <= {
        "core.conn_open", "core.conn_close", "core.protocol_error", "core.note", "core.identity",
        "mysql.connect", "mysql.query", "mysql.command",
    }  # fmt: skip


# --- which mode a proxy gets -----------------------------------------------------------------


def test_in_line_where_statements_are_rewritten_or_the_sink_cannot_ship() -> None:
    from proxies.mysql import create_listener

    assert capture_mode(CFG) and capture_mode(CFG, ShipSink())
    assert not capture_mode(CFG, ListSink())
    assert not capture_mode(proxy("mysql", decode="inline"))
    sql = proxy("mysql", sqlcommenter=True)
    assert not capture_mode(sql)
    assert capture_mode(proxy("mysql", sqlcommenter=True, inject=False))
    assert create_listener(CFG, ShipSink()).handler_factory is MysqlCaptureHandler
    # the capture process builds no real decoder for a proxy that decodes in-line
    host = DecoderHost([sql])
    host.expand([ConnOpen(1, 5, "db", "mysql", "a", 1, "b", 2, "c", 3, 4, "d")])
    assert isinstance(host.decoders[5], IdleDecoder)


def test_tls_termination_stays_in_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import proxies.mysql as mod

    cfg = proxy("mysql", tls={"cert": "c.pem", "key": "k.pem"})
    assert not capture_mode(cfg, ShipSink())
    monkeypatch.setattr(mod, "server_context", lambda tls: None)
    monkeypatch.setattr(mod, "upstream_context", lambda tls: None)
    lst = mod.create_listener(cfg, ShipSink())

    class Ctx:
        conn_id = 1
        proxy = cfg
        server = ("h", 1)

        def emit(self, ev: object) -> None:
            pass

        def send_to_server(self, b: bytes) -> None:
            pass

        def send_to_client(self, b: bytes) -> None:
            pass

    assert isinstance(lst.handler_factory(Ctx()), MysqlTlsHandler)  # type: ignore[arg-type]


def test_ssl_request_before_the_greeting_is_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A greeting still held is never stranded: the relay stays observing until it is out."""
    caps = DEFAULT_CAPS | P.CLIENT_SSL
    g = greeting(DEFAULT_CAPS | P.CLIENT_COMPRESS)
    ssl_request = pkt(1, struct.pack("<IIB23s", caps, 1 << 24, 45, b""))
    chunks: Chunks = [(1, g[:10]), (0, ssl_request), (1, g[10:]), (0, b"\x16\x03\x01")]
    inline, capture = both(CFG, one_conn(chunks), monkeypatch)
    assert capture.dumped() == inline.dumped()
    assert capture.to_client == inline.to_client and len(capture.to_client[11]) == len(g)
    assert capture.to_server == inline.to_server == {11: stream(chunks, 0)}
