"""The decoder on hand-built message sequences: pairing, errors, portals, rewriting."""

from __future__ import annotations

import struct

from proxies.postgres.decoder import TAG_HOLD_MAX
from tests.unit.proxies.postgres.pgwire import (
    AUTH_OK,
    BIND_OK,
    CLOSE_OK,
    EMPTY,
    FLUSH,
    GSSENC_REQUEST,
    NO_DATA,
    PARSE_OK,
    ROWDESC,
    SERVER_HELLO,
    SSL_REQUEST,
    SUSPENDED,
    SYNC,
    Replay,
    bind,
    close,
    complete,
    cstr,
    datarow,
    describe,
    error,
    execute,
    messages,
    msg,
    parse,
    query,
    ready,
    startup,
)


def session(**kw: object) -> Replay:
    r = Replay(**kw)  # type: ignore[arg-type]
    r.feed([(True, startup()), (False, SERVER_HELLO)])
    return r


def test_simple_query_rows_and_tags() -> None:
    r = session()
    r.feed(
        [
            (True, query("SELECT a FROM t")),
            (False, ROWDESC + datarow(b"1") * 3 + complete("SELECT 3") + ready()),
        ]
    )
    r.feed([(True, query("INSERT INTO t VALUES (1)")), (False, complete("INSERT 0 1") + ready())])
    r.feed([(True, query("UPDATE t SET a = 2")), (False, complete("UPDATE 7") + ready())])
    r.feed([(True, query("CREATE TABLE x AS SELECT 1")), (False, complete("SELECT 1") + ready())])
    sel, ins, upd, ctas = r.of("postgres.query")
    assert (sel.rows_returned, sel.rows_affected, sel.command, sel.database) == (
        3,
        None,
        "Query",
        "db",
    )
    assert (ins.rows_returned, ins.rows_affected) == (None, 1)
    assert (upd.rows_returned, upd.rows_affected) == (None, 7)
    assert (ctas.rows_returned, ctas.rows_affected) == (None, 1)


def test_extended_pipeline_error_skips_until_sync() -> None:
    r = session()
    c = (
        parse("", "INSERT INTO t VALUES ($1)") + bind() + execute()
        + parse("", "UPDATE t SET a = 1") + bind() + execute()
        + SYNC
        + parse("s1", "SELECT 1") + describe("S", "s1") + SYNC
        + bind("", "s1") + execute() + SYNC
    )  # fmt: skip
    s = (
        PARSE_OK + BIND_OK + error("23505", "dup") + ready()  # second statement skipped
        + PARSE_OK + msg(b"t", b"\x00\x00") + ROWDESC + ready()
        + BIND_OK + datarow(b"1") + complete("SELECT 1") + ready()
    )  # fmt: skip
    r.feed([(True, c), (False, s)])
    q = r.of("postgres.query")
    assert [(e.text, e.status, e.command) for e in q] == [
        ("INSERT INTO t VALUES ($1)", "error", "Execute"),
        ("SELECT 1", "ok", "Execute"),
    ]
    assert q[0].error_code == "23505" and q[0].error_message == "dup"
    assert q[1].statement_id == "s1" and q[1].rows_returned == 1
    assert not r.dec._pending and "core.protocol_error" not in r.kinds()


def test_error_after_flush_before_sync_arrives() -> None:
    r = session()
    r.feed([(True, parse("", "SELEC") + FLUSH), (False, error("42601", "syntax"))])
    r.feed(
        [(True, bind() + execute() + SYNC), (False, ready())]
    )  # sent before the client saw the error
    r.feed([(True, query("SELECT 1")), (False, datarow(b"1") + complete("SELECT 1") + ready())])
    assert [(e.command, e.status) for e in r.of("postgres.query")] == [
        ("Parse", "error"),
        ("Query", "ok"),
    ]
    assert "core.protocol_error" not in r.kinds()


def test_suspended_portal_is_one_statement_until_closed() -> None:
    r = session()
    r.feed([(True, query("BEGIN")), (False, complete("BEGIN") + ready("T"))])
    r.feed([(True, parse("", "SELECT * FROM big") + bind("c1") + execute("c1", 2) + SYNC)])
    r.feed([(False, PARSE_OK + BIND_OK + datarow(b"a") * 2 + SUSPENDED + ready("T"))])
    r.feed([(True, execute("c1", 2) + SYNC), (False, datarow(b"a") * 2 + SUSPENDED + ready("T"))])
    assert len(r.of("postgres.query")) == 1  # only BEGIN
    r.feed([(True, close("P", "c1") + SYNC), (False, CLOSE_OK + ready("T"))])
    _begin, sel = r.of("postgres.query")
    assert (sel.text, sel.rows_returned, sel.command) == ("SELECT * FROM big", 4, "Execute")
    # the portal is forgotten once closed
    assert "c1" not in r.dec._portals


def test_suspended_portal_ends_with_the_transaction() -> None:
    r = session()
    r.feed([(True, parse("", "SELECT 1") + bind("p") + execute("p", 1) + SYNC)])
    r.feed([(False, PARSE_OK + BIND_OK + datarow(b"1") + SUSPENDED + ready("I"))])
    (sel,) = r.of("postgres.query")
    assert sel.rows_returned == 1 and not r.dec._portals


def test_named_statement_text_reaches_every_execute_and_close_forgets_it() -> None:
    r = session()
    r.feed(
        [(True, parse("st", "DELETE FROM t WHERE id = $1", 1) + SYNC), (False, PARSE_OK + ready())]
    )
    for _ in range(3):
        r.feed(
            [
                (True, bind("", "st", [b"1"]) + execute() + SYNC),
                (False, BIND_OK + complete("DELETE 1") + ready()),
            ]
        )
    r.feed([(True, close("S", "st") + SYNC), (False, CLOSE_OK + ready())])
    q = r.of("postgres.query")
    assert [(e.text, e.statement_id, e.rows_affected) for e in q] == [
        ("DELETE FROM t WHERE id = $1", "st", 1)
    ] * 3
    assert "st" not in r.dec._stmts
    # a Bind to an unknown statement still pairs, with empty text
    r.feed(
        [
            (True, bind("", "gone") + execute() + SYNC),
            (False, error("26000", "no such statement") + ready()),
        ]
    )
    assert r.of("postgres.query")[-1].command == "Bind"


def test_describe_portal_and_nodata() -> None:
    r = session()
    c = parse("", "UPDATE t SET a = 1") + bind() + describe("P") + execute() + SYNC
    r.feed([(True, c), (False, PARSE_OK + BIND_OK + NO_DATA + complete("UPDATE 2") + ready())])
    (u,) = r.of("postgres.query")
    assert u.rows_affected == 2


def test_multi_statement_query_and_error_inside() -> None:
    r = session()
    sql = "SELECT 1; UPDATE t SET a = ';'; DELETE FROM t; SELECT 2"
    r.feed([(True, query(sql))])
    s = ROWDESC + datarow(b"1") + complete("SELECT 1") + complete("UPDATE 1")
    r.feed([(False, s + error("23503", "fk") + ready("E"))])  # the last SELECT never ran
    q = r.of("postgres.query")
    # the whole text on each result; prepare() (off the hot path) cuts out each statement
    assert [(e.batch, e.batch_size, e.text, e.status) for e in q] == [
        (0, 3, sql, "ok"),
        (1, 3, sql, "ok"),
        (2, 3, sql, "error"),
    ]
    for e in q:
        e.keep_literals = True
        e.prepare()
    assert [e.text for e in q] == ["SELECT 1", "UPDATE t SET a = ';'", "DELETE FROM t"]
    assert [e.operation for e in q] == ["SELECT", "UPDATE", "DELETE"]


def test_transactions_from_ready_for_query_status() -> None:
    r = session()
    r.feed([(True, query("SELECT 1")), (False, datarow(b"1") + complete("SELECT 1") + ready("I"))])
    r.feed([(True, query("BEGIN")), (False, complete("BEGIN") + ready("T"))])
    r.feed([(True, query("UPDATE t SET a = 1")), (False, complete("UPDATE 1") + ready("T"))])
    r.feed([(True, query("SELEC")), (False, error("42601", "syntax") + ready("E"))])
    r.feed([(True, query("ROLLBACK")), (False, complete("ROLLBACK") + ready("I"))])
    # an extended-protocol batch in autocommit: one implicit transaction, not a block
    r.feed([(True, parse("", "INSERT INTO t VALUES (1)") + bind() + execute() + SYNC)])
    r.feed([(False, PARSE_OK + BIND_OK + complete("INSERT 0 1") + ready("I"))])
    got = [(e.text.split()[0], e.transaction, e.transaction_end) for e in r.of("postgres.query")]
    assert got == [
        ("SELECT", None, False),
        ("BEGIN", 1, False),
        ("UPDATE", 1, False),
        ("SELEC", 1, False),
        ("ROLLBACK", 1, True),
        ("INSERT", None, False),
    ]
    r.feed([(True, query("BEGIN")), (False, complete("BEGIN") + ready("T"))])
    r.feed([(True, query("COMMIT")), (False, complete("COMMIT") + ready("I"))])
    assert [(e.transaction, e.transaction_end) for e in r.of("postgres.query")[-2:]] == [
        (2, False),
        (2, True),
    ]


def test_events_wait_for_ready_for_query() -> None:
    r = session()
    r.feed([(True, query("SELECT 1")), (False, datarow(b"1") + complete("SELECT 1"))])
    assert not r.of("postgres.query")
    r.feed([(False, ready())])
    assert len(r.of("postgres.query")) == 1


def test_empty_query_and_notice_counts_as_warning() -> None:
    r = session()
    r.feed([(True, query("")), (False, EMPTY + ready())])
    notice = msg(b"N", b"SWARNING\x00C01000\x00Mhm\x00\x00")
    r.feed(
        [
            (True, query("DROP TABLE IF EXISTS zz")),
            (False, notice + complete("DROP TABLE") + ready()),
        ]
    )
    e, d = r.of("postgres.query")
    assert (e.text, e.status, e.warnings) == ("", "ok", None)
    assert d.warnings == 1


def test_copy_in_and_out() -> None:
    r = session()
    r.feed([(True, query("COPY t FROM STDIN")), (False, msg(b"G", b"\x00\x00\x00"))])
    r.feed([(True, msg(b"d", b"1\n") * 5 + msg(b"c")), (False, complete("COPY 5") + ready())])
    r.feed(
        [
            (True, query("COPY t TO STDOUT")),
            (
                False,
                msg(b"H", b"\x00\x00\x00")
                + msg(b"d", b"1\n") * 5
                + msg(b"c")
                + complete("COPY 5")
                + ready(),
            ),
        ]
    )
    r.feed([(True, query("COPY t FROM STDIN")), (False, msg(b"G", b"\x00\x00\x00"))])
    r.feed(
        [
            (True, msg(b"f", cstr("client gave up"))),
            (False, error("57014", "COPY from stdin failed") + ready()),
        ]
    )
    cin, cout, fail = r.of("postgres.query")
    assert (cin.rows_affected, cin.rows_returned) == (5, None)
    assert (cout.rows_affected, cout.rows_returned) == (None, 5)
    assert fail.status == "error"


def test_startup_error_and_parameter_status() -> None:
    r = Replay()
    r.feed([(True, startup(user="bob", database="nodb", application_name="nova-api"))])
    r.feed([(False, error("3D000", 'database "nodb" does not exist', "FATAL"))])
    (s,) = r.of("postgres.session")
    assert (s.status, s.error_code, s.user, s.database, s.application_name) == (
        "error", "3D000", "bob", "nodb", "nova-api",
    )  # fmt: skip
    (ident,) = r.of("core.identity")
    assert ident.attrs == {
        "protocol": "3.0",
        "application_name": "nova-api",
        "user": "bob",
        "database": "nodb",
    }


def test_database_defaults_to_user() -> None:
    r = Replay()
    body = struct.pack(">I", 196608) + cstr("user") + cstr("carol") + b"\x00"
    r.feed([(True, struct.pack(">I", 4 + len(body)) + body), (False, SERVER_HELLO)])
    assert r.dec.database == "carol"


def test_notification_payload_only_with_literals() -> None:
    note = msg(b"A", struct.pack(">I", 99) + cstr("chan") + cstr("secret payload"))
    r = session()
    r.feed([(False, note)])
    r2 = session(keep_literals=True)
    r2.feed([(False, note)])
    (a,) = r.of("postgres.notification")
    (b,) = r2.of("postgres.notification")
    assert (a.channel, a.sender_pid, a.payload_size, a.payload) == ("chan", 99, 14, None)
    assert b.payload == "secret payload"


def test_async_fatal_is_a_note() -> None:
    r = session()
    r.feed(
        [(False, error("57P01", "terminating connection due to administrator command", "FATAL"))]
    )
    (n,) = r.of("core.note")
    assert n.code == "postgres.server_error" and "57P01" in n.message


def test_connection_closed_mid_statement() -> None:
    r = session()
    r.feed([(True, query("SELECT pg_sleep(10)"))])
    r.end()
    (q,) = r.of("postgres.query")
    assert q.status == "error" and "connection closed" in (q.error_message or "")


def test_ssl_request_refused_is_answered_and_dropped() -> None:
    r = Replay(ssl_policy="refuse")
    r.feed([(True, SSL_REQUEST)])
    assert r.replies == [b"N"] and r.forwarded() == b"" and r.dec.ssl_refused
    r.feed([(True, GSSENC_REQUEST)])
    assert r.replies == [b"N", b"N"] and r.forwarded() == b""
    r.feed([(True, startup())])
    assert r.forwarded() == startup() and r.dec.startup_done and not r.dec.ssl_refused
    assert not r.dec.rewriting  # from here the relay forwards first
    (note,) = r.of("core.note")
    assert note.code == "postgres.ssl_refused"


def test_ssl_request_split_across_chunks() -> None:
    r = Replay(ssl_policy="refuse")
    r.feed(
        [(True, SSL_REQUEST[:3]), (True, SSL_REQUEST[3:] + startup()[:5]), (True, startup()[5:])]
    )
    assert r.replies == [b"N"] and r.forwarded() == startup()


def test_ssl_request_and_startup_in_one_chunk() -> None:
    """The StartupMessage switches rewriting off, but only after this chunk: the request in
    front of it is still dropped (it was forwarded to the server before the fix)."""
    r = Replay(ssl_policy="refuse")
    r.feed([(True, SSL_REQUEST + startup() + query("SELECT 1"))])
    assert r.replies == [b"N"] and r.forwarded() == startup() + query("SELECT 1")
    r = Replay(ssl_policy="refuse")
    cancel = struct.pack(">IIII", 16, 80877102, 42, 7)
    r.feed([(True, GSSENC_REQUEST + cancel)])
    assert r.replies == [b"N"] and r.forwarded() == cancel


def test_ssl_request_accepted_hands_over_leftover() -> None:
    r = Replay(ssl_policy="accept")
    r.feed([(True, SSL_REQUEST + b"\x16\x03\x01")])
    assert r.replies == [b"S"] and r.dec.tls_request and r.dec.take_leftover() == b"\x16\x03\x01"
    assert r.forwarded() == b""


def test_direct_tls_without_certificate_goes_passthrough() -> None:
    r = Replay(ssl_policy="refuse")
    hello = b"\x16\x03\x01\x00\x05hello"
    r.feed([(True, hello)])
    assert r.forwarded() == hello and r.dec.passthrough
    assert r.of("core.note")[0].code == "postgres.direct_tls_passthrough"


def test_forwarded_ssl_request_server_says_yes_goes_passthrough() -> None:
    r = Replay(ssl_policy="forward")
    r.feed([(True, SSL_REQUEST), (False, b"S\x16\x03\x03junk")])
    assert r.dec.passthrough and r.of("core.note")[0].code == "postgres.encrypted_passthrough"


def test_sqlcommenter_tags_query_and_parse() -> None:
    r = session(inject=True)
    r.out.clear()
    c = query("SELECT 1;") + parse("s", "SELECT $1", 1) + bind("", "s", [b"x"]) + execute() + SYNC
    r.feed([(True, c)])
    out = messages(r.forwarded())
    (_qt, qb), (_pt, pb) = out[0], out[1]
    assert qb.startswith(b"SELECT 1 /*traceparent='00-") and qb.endswith(b"-01'*/;\x00")
    name, text, rest = pb.split(b"\x00", 2)
    assert name == b"s" and text.startswith(b"SELECT $1 /*traceparent='00-")
    assert rest == b"\x00\x01\x00\x00\x00\x17"
    assert [t for t, _ in out] == [b"Q", b"P", b"B", b"E", b"S"]
    assert out[2:] == messages(c)[2:]  # everything else untouched
    r.feed([(False, ROWDESC + datarow(b"1") + complete("SELECT 1") + ready())])
    r.feed([(False, PARSE_OK + BIND_OK + datarow(b"x") + complete("SELECT 1") + ready())])
    q1, q2 = r.of("postgres.query")
    assert q1.text == "SELECT 1;" and q1.traceparent and q1.traceparent in qb.decode()
    assert q1.traceparent.split("-")[2] == q1.span_id and q1.injected
    assert q1.trace_id == q1.traceparent.split("-")[1]
    assert q2.traceparent and q2.traceparent in text.decode()
    assert q2.traceparent.split("-")[2] == q2.span_id and q2.injected and q2.statement_id == "s"
    # the next execution of the same prepared statement is a new span, not the tagged one
    r.feed(
        [
            (True, bind("", "s", [b"y"]) + execute() + SYNC),
            (False, BIND_OK + complete("SELECT 0") + ready()),
        ]
    )
    last = r.of("postgres.query")[-1]
    assert last.traceparent is None and not last.injected


def test_sqlcommenter_keeps_an_applications_traceparent() -> None:
    r = session(inject=True)
    r.out.clear()
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    c = query(f"SELECT 1 /*traceparent='{tp}'*/")
    r.feed([(True, c), (False, complete("SELECT 0") + ready())])
    assert r.forwarded() == c
    (q,) = r.of("postgres.query")
    assert not q.injected and q.span_id != "b7ad6b7169203331"
    q.prepare()  # finds the application's context in the text, off the hot path
    assert q.traceparent == tp


def test_sqlcommenter_holds_a_partial_query_until_whole() -> None:
    r = session(inject=True)
    r.out.clear()
    c = query("SELECT 42")
    r.feed([(True, c[:3])])
    assert r.forwarded() == b""
    r.feed([(True, c[3:8])])
    assert r.forwarded() == b""
    r.feed([(True, c[8:] + SYNC)])
    (_qt, qb), (st, _) = messages(r.forwarded())
    assert qb.startswith(b"SELECT 42 /*traceparent=") and st == b"S"


def test_long_statement_text_is_truncated_but_tagged() -> None:
    r = session(inject=True, max_statement_bytes=1000)
    r.out.clear()
    c = query("INSERT INTO t VALUES ('" + "x" * 5000 + "')")
    r.feed([(True, c[i : i + 700]) for i in range(0, len(c), 700)])
    (_qt, qb) = messages(r.forwarded())[0]
    assert qb.startswith(b"INSERT INTO t VALUES ('xxx") and b"') /*traceparent='" in qb
    r.feed([(False, complete("INSERT 0 1") + ready())])
    (q,) = r.of("postgres.query")
    assert len(q.text) == 1000 and q.truncated and q.injected


def test_huge_statement_is_truncated_not_buffered() -> None:
    r = session(inject=True)
    r.out.clear()
    big = "INSERT INTO t VALUES ('" + "x" * (TAG_HOLD_MAX + 1000) + "')"
    c = query(big)
    for i in range(0, len(c), 65536):
        r.feed([(True, c[i : i + 65536])])
    assert r.forwarded() == c  # over what is held for tagging: forwarded untagged
    assert len(r.dec._c_buf) < 16
    r.feed([(False, complete("INSERT 0 1") + ready())])
    (q,) = r.of("postgres.query")
    assert q.text.startswith("INSERT INTO t VALUES ('xxx") and len(q.text) == 65536
    assert q.truncated and not q.injected
    assert r.of("core.note")[0].code == "postgres.inject_skipped"


def test_bound_parameters_only_with_literals() -> None:
    uuid_bin = bytes.fromhex("6f1c2c3e4a5b4c6d8e9f0a1b2c3d4e5f")
    for keep in (False, True):
        r = session(keep_literals=keep)
        r.feed([(True, parse("s", "SELECT $1, $2, $3, $4, $5") + describe("S", "s") + SYNC)])
        pdesc = msg(b"t", struct.pack(">H5I", 5, 23, 2950, 25, 17, 25))
        r.feed([(False, PARSE_OK + pdesc + NO_DATA + ready())])
        vals = [struct.pack(">i", 42), uuid_bin, "héllo".encode(), b"\x00\x01"]
        body = cstr("") + cstr("s") + struct.pack(">HH", 1, 1) + struct.pack(">H", 5)
        body += b"".join(struct.pack(">i", len(v)) + v for v in vals)
        body += struct.pack(">i", -1) + struct.pack(">H", 0)
        r.feed([(True, msg(b"B", body) + execute() + SYNC)])
        r.feed([(False, BIND_OK + complete("SELECT 0") + ready())])
        (q,) = r.of("postgres.query")
        assert q.id_scan is not None  # scanned for shared ids by prepare(), then dropped
        if keep:
            uid = "6f1c2c3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
            assert q.params == ["42", uid, "héllo", "\\x0001", None]
        else:
            assert q.params is None
        q.prepare()
        assert q.id_scan is None


def test_large_datarow_is_skipped_not_buffered() -> None:
    r = session()
    r.feed([(True, query("SELECT blob"))])
    row = datarow(b"z" * 5_000_000)
    for i in range(0, len(row), 65536):
        r.feed([(False, row[i : i + 65536])])
        assert len(r.dec._s_buf) < 5
    r.feed([(False, complete("SELECT 1") + ready())])
    assert r.of("postgres.query")[0].rows_returned == 1


def test_protocol_error_then_passthrough() -> None:
    r = session(inject=True)
    r.out.clear()
    junk = b"\x01\x00\x00\x00\x05z" + query("SELECT 1")
    r.feed([(True, junk)])
    assert r.forwarded() == junk and r.dec.passthrough
    (pe,) = r.of("core.protocol_error")
    assert pe.direction == "c2s" and pe.offset == len(startup())
    r.feed([(True, query("SELECT 2")), (False, b"garbage")])
    assert r.forwarded() == junk + query("SELECT 2")
    assert len(r.of("core.protocol_error")) == 1


def test_unexpected_server_message_is_a_protocol_error() -> None:
    r = session()
    r.feed([(False, PARSE_OK)])
    (pe,) = r.of("core.protocol_error")
    assert pe.direction == "s2c" and "ParseComplete" in pe.reason


def test_auth_before_ready() -> None:
    r = Replay()
    r.feed([(True, startup()), (False, msg(b"R", struct.pack(">I", 5) + b"salt"))])
    r.feed(
        [(True, msg(b"p", b"md5abcdef0123456789abcdef0123456789\x00")), (False, AUTH_OK + ready())]
    )
    (s,) = r.of("postgres.session")
    assert s.auth == "md5"
    assert b"abcdef0123" not in b"".join(r.dumped()) and b"salt" not in b"".join(r.dumped())


def test_protocol_error_during_auth_shows_no_credential_bytes() -> None:
    r = Replay()
    r.feed([(True, startup()), (False, msg(b"R", struct.pack(">I", 3)))])
    bad = b"p\x7f\xff\xff\xffhunter2-password\x00"  # a corrupt length on a PasswordMessage
    r.feed([(True, bad)])
    (pe,) = r.of("core.protocol_error")
    assert pe.context == bad[:5].hex()
    assert b"hunter2" not in b"".join(r.dumped())


def test_ssl_request_inside_tls_is_refused() -> None:
    r = Replay(ssl_policy="accept")
    r.feed([(True, SSL_REQUEST)])
    assert r.dec.tls_request
    r.dec.tls_request = False
    r.feed([(True, SSL_REQUEST)])  # now inside the TLS session: no nesting
    assert r.replies == [b"S", b"N"] and not r.dec.tls_request
