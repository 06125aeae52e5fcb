"""Protocol paths MariaDB on this machine cannot produce, built packet by packet from
the protocol documentation: caching_sha2_password's full authentication, MySQL 8
query attributes, 16 MiB packets, a server that offers TLS and compression,
sqlcommenter tagging, TLS termination's sequence-id shift, replication."""

from __future__ import annotations

import struct

from proxies.mysql import packets as P
from proxies.sql.sqlcommenter import tag_sql_bytes
from sniff.events import dumps
from tests.unit.proxies.mysql.wire import (
    DEFAULT_CAPS,
    SCRAMBLE,
    Chunks,
    Run,
    bytewise,
    eof,
    err,
    greeting,
    handshake_response,
    lenenc,
    login,
    ok,
    pkt,
    query,
    resultset,
    stream,
    text_row,
)

PASSWORD = b"hunter2-very-secret"


def test_caching_sha2_full_authentication_keeps_no_secret() -> None:
    caps = DEFAULT_CAPS | P.CLIENT_SSL
    token = bytes(range(200, 232))
    pem = b"-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----\n"
    rsa_blob = bytes(range(256))
    chunks: Chunks = [
        (1, greeting(caps, plugin="caching_sha2_password")),
        (0, handshake_response(caps & ~P.CLIENT_SSL, auth=token, plugin=b"caching_sha2_password")),
        (1, pkt(2, b"\x01\x04")),  # perform full authentication
        (0, pkt(3, b"\x02")),  # request the server's public key
        (1, pkt(4, b"\x01" + pem)),
        (0, pkt(5, rsa_blob)),  # the password, RSA-encrypted
        (1, ok(6)),
        (0, query(b"SELECT 1")),
        (1, resultset(1, [b"1"], [[b"1"]])),
    ]
    for feed in (chunks, bytewise(chunks)):
        r = Run().feed(feed).close()
        (conn,) = r.of("mysql.connect")
        assert conn.status == "ok" and conn.auth_plugin == "caching_sha2_password"
        assert conn.server_version == "8.0.36" and conn.db_system == "mysql"
        (q,) = r.of("mysql.query")
        assert q.rows_returned == 1 and q.status == "ok"
        blob = b"\n".join(dumps(e) for e in r.events)
        for secret in (token, rsa_blob[:32], SCRAMBLE, pem[30:60], PASSWORD):
            assert secret not in blob and secret.hex().encode() not in blob
        assert r.out_c == stream(chunks, 0)


def test_caching_sha2_fast_auth_and_failure() -> None:
    chunks: Chunks = [
        (1, greeting(DEFAULT_CAPS, plugin="caching_sha2_password")),
        (0, handshake_response(DEFAULT_CAPS, auth=b"x" * 32, plugin=b"caching_sha2_password")),
        (1, pkt(2, b"\x01\x03")),  # fast auth success
        (1, ok(3)),
    ]
    (conn,) = Run().feed(chunks).close().of("mysql.connect")
    assert conn.status == "ok"
    failed: Chunks = [
        (1, greeting(DEFAULT_CAPS, plugin="caching_sha2_password")),
        (0, handshake_response(DEFAULT_CAPS, auth=b"x" * 32, plugin=b"caching_sha2_password")),
        (1, pkt(2, b"\x01\x04")),
        (0, pkt(3, PASSWORD + b"\x00")),  # cleartext over TLS: skipped, never read
        (1, err(4, 1045, "Access denied for user 'app'@'10.0.0.5' (using password: YES)", "28000")),
    ]
    r = Run().feed(failed).close()
    (conn,) = r.of("mysql.connect")
    assert conn.status == "error" and conn.error_code == "1045"
    assert PASSWORD not in b"".join(dumps(e) for e in r.events)


def test_server_refuses_before_the_handshake() -> None:
    r = Run().feed([(1, err(0, 1040, "Too many connections", "08004"))]).close()
    (conn,) = r.of("mysql.connect")
    assert conn.status == "error" and conn.error_code == "1040"
    assert not r.of("core.protocol_error")


def test_tls_and_compression_bits_cleared_in_the_greeting() -> None:
    caps = DEFAULT_CAPS | P.CLIENT_SSL | P.CLIENT_COMPRESS | P.CLIENT_ZSTD_COMPRESSION_ALGORITHM
    g = greeting(caps)
    r = Run().feed([(1, g)])
    out = r.out_s
    assert len(out) == len(g)
    parsed = P.parse_greeting(out[4:])
    assert parsed.capabilities == caps & ~(
        P.CLIENT_SSL | P.CLIENT_COMPRESS | P.CLIENT_ZSTD_COMPRESSION_ALGORITHM
    )
    assert [e.code for e in r.of("core.note")] == ["mysql.tls_stripped"]
    # a client that gives up right after the greeting (it requires TLS) is explained
    r.close("client closed")
    notes = [e for e in r.of("core.note") if e.code == "mysql.client_hangup_after_greeting"]
    assert len(notes) == 1 and "tls = {" in notes[0].message


def test_client_negotiating_compression_anyway_turns_passthrough() -> None:
    caps = DEFAULT_CAPS | P.CLIENT_COMPRESS
    chunks: Chunks = [(1, greeting(caps)), (0, handshake_response(caps)), (1, ok(2))]
    r = Run().feed(chunks)
    r.feed([(0, b"\x05\x00\x00\x00\x00\x00\x00compressed?")]).close()
    assert r.dec.passthrough
    assert [e.code for e in r.of("core.note")] == ["mysql.compressed"]
    assert not r.of("core.protocol_error")


def test_query_attributes_mysql8() -> None:
    caps = DEFAULT_CAPS | P.CLIENT_QUERY_ATTRIBUTES
    # one attribute "trace" = 'abc' (VARCHAR), then the statement text
    attrs = (
        lenenc(1)
        + lenenc(1)
        + b"\x00"
        + b"\x01"
        + b"\xfd\x00"
        + lenenc(5)
        + b"trace"
        + lenenc(3)
        + b"abc"
    )
    chunks: Chunks = [
        (1, greeting(caps)),
        (0, handshake_response(caps)),
        (1, ok(2)),
        (0, pkt(0, b"\x03" + attrs + b"SELECT id FROM instances WHERE uuid = 'u-1'")),
        (1, resultset(1, [b"id"], [[b"1"], [b"2"]])),
        (0, pkt(0, b"\x03" + lenenc(0) + lenenc(1) + b"COMMIT")),
        (1, ok(1)),
    ]
    r = Run().feed(chunks).close()
    q = r.of("mysql.query")
    assert [e.text for e in q] == ["SELECT id FROM instances WHERE uuid = ?", "COMMIT"]
    assert q[0].rows_returned == 2 and q[0].tables == ["instances"]


def test_sixteen_megabyte_packets() -> None:
    big = b"x" * (P.MAX_PACKET + 1000)  # a statement and a row longer than one packet
    text = b"INSERT INTO blobs VALUES ('" + big + b"')"
    payload = b"\x03" + text
    c2s = pkt(0, payload[: P.MAX_PACKET]) + pkt(1, payload[P.MAX_PACKET :])
    row_payload = lenenc(len(big)) + big  # begins with 0xFE (8-byte length)
    row = pkt(4, row_payload[: P.MAX_PACKET]) + pkt(5, row_payload[P.MAX_PACKET :])
    s2c = (
        pkt(1, b"\x01")
        + pkt(2, b"\x03def\x00\x00\x00\x01b\x00\x0c\x3f\x00")
        + eof(3)
        + row
        + text_row(6, b"small")
        + eof(7)
    )
    chunks: Chunks = [
        *login(),
        (0, c2s),
        (1, ok(2, affected=1)),
        (0, query(b"SELECT b FROM blobs")),
    ]
    # the server stream in 64 KiB pieces, as a socket delivers it
    chunks += [(1, s2c[i : i + 65536]) for i in range(0, len(s2c), 65536)]
    r = Run(max_statement_bytes=4096).feed(chunks).close()
    ins, sel = r.of("mysql.query")
    assert ins.truncated and ins.operation == "INSERT" and ins.rows_affected == 1
    assert len(ins.text) < 5000
    assert sel.rows_returned == 2 and sel.status == "ok"
    assert r.out_c == stream(chunks, 0) and r.out_s == stream(chunks, 1)
    assert not r.of("core.protocol_error")


def test_progress_reports_are_not_errors() -> None:
    progress = pkt(1, b"\xff\xff\xff\x01\x02\x02\x00\x00\x00\x0fEnd bulk insert")
    chunks: Chunks = [
        *login(),
        (0, query(b"ALTER TABLE t ADD COLUMN c INT")),
        (1, progress),
        (1, ok(2)),
    ]
    (q,) = Run().feed(chunks).close().of("mysql.query")
    assert q.status == "ok" and q.operation == "ALTER"


def test_pipelined_commands() -> None:
    chunks: Chunks = [
        *login(),
        (0, query(b"SELECT 1") + query(b"SELECT * FROM nope") + pkt(0, b"\x0e")),
        (
            1,
            resultset(1, [b"1"], [[b"1"]])
            + err(1, 1146, "Table 'nova.nope' doesn't exist")
            + ok(1),
        ),
    ]
    r = Run().feed(chunks).close()
    q = r.of("mysql.query")
    assert [(e.text, e.status) for e in q] == [("SELECT ?", "ok"), ("SELECT * FROM nope", "error")]
    assert [e.command for e in r.of("mysql.command")] == ["COM_PING"]


def test_database_tracking() -> None:
    chunks: Chunks = [
        *login(),
        (0, query(b"USE glance")),
        (1, ok(1)),
        (0, query(b"SELECT 1")),
        (1, resultset(1, [b"1"], [[b"1"]])),
        (0, pkt(0, b"\x02cinder")),
        (1, ok(1)),
        (0, query(b"SELECT 2")),
        (1, resultset(1, [b"2"], [[b"2"]])),
    ]
    r = Run().feed(chunks).close()
    assert [e.database for e in r.of("mysql.query")] == ["nova", "glance", "cinder"]


def test_unknown_command_is_a_protocol_error_and_passthrough() -> None:
    chunks: Chunks = [*login(), (0, pkt(0, b"\x77hello")), (1, ok(1)), (0, query(b"SELECT 1"))]
    r = Run().feed(chunks).close()
    errs = r.of("core.protocol_error")
    assert len(errs) == 1 and "unknown command 0x77" in errs[0].reason
    assert r.dec.passthrough and not r.of("mysql.query")
    assert r.out_c == stream(chunks, 0) and r.out_s == stream(chunks, 1)


def test_replication_stream_is_relayed_without_decoding() -> None:
    chunks: Chunks = [*login(), (0, pkt(0, b"\x12" + b"\x00" * 10)), (1, pkt(1, b"\x00binlog..."))]
    r = Run().feed(chunks).close()
    assert [e.code for e in r.of("core.note")] == ["mysql.replication"]
    assert r.dec.passthrough and not r.of("core.protocol_error")


def test_connection_lost_mid_response() -> None:
    chunks: Chunks = [*login(), (0, query(b"SELECT * FROM big")), (1, pkt(1, b"\x01"))]
    (q,) = Run().feed(chunks).close("server connection lost").of("mysql.query")
    assert q.status == "error" and "connection closed before the response" in (
        q.error_message or ""
    )


# --- sqlcommenter -------------------------------------------------------------------------


def test_sqlcommenter_tags_queries_and_nothing_else() -> None:
    chunks: Chunks = [
        *login(),
        (0, query(b"SELECT * FROM instances WHERE id = 1;\n")),
        (1, resultset(1, [b"id"], [[b"1"]])),
        (0, query(b"SELECT 1 -- trailing comment")),
        (1, resultset(1, [b"1"], [[b"1"]])),
        (
            0,
            query(
                b"SELECT 2 /*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/"
            ),
        ),
        (1, resultset(1, [b"2"], [[b"2"]])),
    ]
    r = Run(sqlcommenter=True).feed(chunks).close()
    out = r.out_c
    q = r.of("mysql.query")
    assert [e.injected for e in q] == [True, True, False]
    t0 = q[0]
    assert t0.traceparent == f"00-{t0.trace_id}-{t0.span_id}-01"
    tag = f"/*traceparent='{t0.traceparent}'*/".encode()
    assert b"SELECT * FROM instances WHERE id = 1 " + tag + b";\n" in out
    assert b"SELECT 1 -- trailing comment\n/*traceparent=" in out
    # the application's own tag is kept and becomes the span's parent context
    assert q[2].traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    # every packet of the rewritten stream is well formed, sequence ids unchanged
    pos, seqs = 0, []
    while pos < len(out):
        n = int.from_bytes(out[pos : pos + 3], "little")
        seqs.append(out[pos + 3])
        pos += 4 + n
    assert pos == len(out)
    orig = stream(chunks, 0)
    assert len(out) == len(orig) + 2 * (len(tag) + 1)
    # the event's text is the statement as the client sent it, without sniff's tag
    assert "traceparent" not in q[0].text
    # split anywhere, the same bytes go out
    r2 = Run(sqlcommenter=True).feed(bytewise(chunks)).close()
    assert r2.out_c == out


def test_tag_sql_bytes() -> None:
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert tag_sql_bytes(b"SELECT 1", tp) == b"SELECT 1 /*traceparent='" + tp.encode() + b"'*/"
    assert tag_sql_bytes(b"  ;\n", tp) is None
    assert (
        tag_sql_bytes(b"SELECT 1 # x", tp)
        == b"SELECT 1 # x\n/*traceparent='" + tp.encode() + b"'*/"
    )


# --- TLS termination with a plaintext upstream: the sequence-id shift -----------------------


def test_tls_client_plaintext_upstream_shifts_handshake_sequence_ids() -> None:
    r = Run(terminate_tls=True, upstream_tls="auto")
    g = greeting(DEFAULT_CAPS)  # the server does not offer TLS
    r.feed([(1, g)])
    out_g = P.parse_greeting(r.out_s[4:])
    assert out_g.capabilities & P.CLIENT_SSL  # sniff offers TLS itself
    caps = DEFAULT_CAPS | P.CLIENT_SSL
    ssl_request = pkt(1, struct.pack("<IIB23s", caps, 1 << 24, 45, b""))
    assert r.dec.feed_client(ssl_request) == b""  # the server never sees it
    assert r.dec.client_tls and r.dec.shift_seq and not r.dec.server_tls
    # (decrypted) handshake response, seq 2 -> forwarded as seq 1 without CLIENT_SSL
    out = r.dec.feed_client(handshake_response(caps, seq=2))
    assert out[3] == 1
    assert not struct.unpack_from("<I", out, 4)[0] & P.CLIENT_SSL
    # auth switch from the server (seq 2 -> 3), client's answer (seq 4 -> 3), OK (seq 4 -> 5)
    switch = pkt(2, b"\xfemysql_native_password\x00" + SCRAMBLE + b"\x00")
    assert r.dec.feed_server(switch)[3] == 3
    assert r.dec.feed_client(pkt(4, b"x" * 20))[3] == 3
    assert r.dec.feed_server(ok(4))[3] == 5
    # commands: no shift
    assert r.dec.feed_client(query(b"SELECT 1"))[3] == 0
    assert r.dec.feed_server(ok(1))[3] == 1
    r.close()
    (conn,) = r.of("mysql.connect")
    assert conn.status == "ok" and conn.client_tls and not conn.server_tls


def test_tls_client_tls_upstream_forwards_the_ssl_request() -> None:
    r = Run(terminate_tls=True, upstream_tls="auto")
    r.feed([(1, greeting(DEFAULT_CAPS | P.CLIENT_SSL))])
    caps = DEFAULT_CAPS | P.CLIENT_SSL
    ssl_request = pkt(1, struct.pack("<IIB23s", caps, 1 << 24, 45, b""))
    assert r.dec.feed_client(ssl_request) == ssl_request
    assert r.dec.server_tls and not r.dec.shift_seq
    resp = handshake_response(caps, seq=2)
    assert r.dec.feed_client(resp) == resp


def test_ssl_request_without_tls_configured_goes_end_to_end() -> None:
    caps = DEFAULT_CAPS | P.CLIENT_SSL
    r = Run()
    r.feed([(1, greeting(caps)), (0, pkt(1, struct.pack("<IIB23s", caps, 1 << 24, 45, b"")))])
    r.feed([(0, b"\x16\x03\x01\x02\x00\x01")]).close()  # a TLS ClientHello follows
    assert r.dec.passthrough
    notes = [e for e in r.of("core.note") if e.code == "mysql.tls_end_to_end"]
    assert notes and "tls = {" in notes[0].message


def test_ok_packet_with_session_tracking_updates_the_database() -> None:
    caps = DEFAULT_CAPS | P.CLIENT_SESSION_TRACK
    state = bytes([P.SESSION_TRACK_SCHEMA]) + lenenc(len(b"\x08keystone")) + b"\x08keystone"
    ok_payload = b"\x00\x00\x00" + struct.pack("<HH", 2 | P.SERVER_SESSION_STATE_CHANGED, 0)
    ok_payload += lenenc(0) + lenenc(len(state)) + state
    chunks: Chunks = [
        (1, greeting(caps)),
        (0, handshake_response(caps)),
        (1, ok(2)),
        (0, query(b"CALL switch_db()")),
        (1, pkt(1, ok_payload)),
        (0, query(b"SELECT 1")),
        (1, resultset(1, [b"1"], [[b"1"]])),
    ]
    q = Run().feed(chunks).close().of("mysql.query")
    assert [e.database for e in q] == ["nova", "keystone"]
