"""The MySQL decoder on real captured MariaDB sessions (tests/fixtures/mysql).

Each transcript, fed whole, split at every offset and one byte at a time, must
give the same events and forward the same bytes; the bytes forwarded are the
bytes received except for the deliberate greeting edit; no event holds a
password or a scramble; garbage gives one ProtocolError and passthrough.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxies.mysql import packets as P
from sniff.events import ProtocolError, dumps
from tests.fixtures.mysql.record import FX_PASSWORD
from tests.unit.proxies.mysql.wire import (
    Chunks,
    Multi,
    Run,
    bytewise,
    load,
    merged,
    sessions,
    split_at,
    stream,
)

NAMES = [
    "pymysql_basic",
    "pymysql_multi",
    "mariadb_ps",
    "cli",
    "cli_infile",
    "auth_switch",
    "commands",
    "change_user",
    "deprecate_eof",
    "password",
]


def fingerprint(run: Run) -> list[bytes]:
    return [dumps(e) for e in run.events]


def _cases() -> list[tuple[str, int]]:
    return [(n, i) for n in NAMES for i in range(len(sessions(load(n))))]


@pytest.mark.parametrize("name,index", _cases())
def test_whole_split_and_bytewise_agree(name: str, index: int) -> None:
    chunks = sessions(load(name))[index]
    whole = merged(chunks)
    ref = Run().feed(whole).close()
    assert ref.events and not ref.of("core.protocol_error"), ref.of("core.protocol_error")
    ref_fp, ref_c, ref_s = fingerprint(ref), ref.out_c, ref.out_s
    assert fingerprint(Run().feed(chunks).close()) == ref_fp
    r = Run().feed(bytewise(chunks)).close()
    assert fingerprint(r) == ref_fp
    assert (r.out_c, r.out_s) == (ref_c, ref_s)
    for direction in (0, 1):
        n = len(stream(whole, direction))
        for k in range(1, n):
            r = Run().feed(split_at(whole, direction, k)).close()
            assert fingerprint(r) == ref_fp, (direction, k)
            assert (r.out_c, r.out_s) == (ref_c, ref_s), (direction, k)


@pytest.mark.parametrize("name,index", _cases())
def test_forwarded_bytes_are_the_received_bytes(name: str, index: int) -> None:
    chunks = sessions(load(name))[index]
    r = Run().feed(chunks).close()
    c_in, s_in = stream(chunks, 0), stream(chunks, 1)
    assert r.out_c == c_in  # client bytes: untouched (no sqlcommenter)
    out = r.out_s
    assert len(out) == len(s_in)
    diff = [i for i in range(len(out)) if out[i] != s_in[i]]
    # only the greeting's lower capability bytes may differ: CLIENT_COMPRESS cleared
    g = P.parse_greeting(s_in[4 : 4 + int.from_bytes(s_in[:3], "little")])
    assert all(i - 4 in (g.caps_lo_offset, g.caps_lo_offset + 1) for i in diff)
    g2 = P.parse_greeting(out[4 : 4 + int.from_bytes(out[:3], "little")])
    assert g2.capabilities == g.capabilities & ~(P.CLIENT_COMPRESS | P.CLIENT_SSL)


# --- what the sessions contain ------------------------------------------------------------


def test_pymysql_session() -> None:
    r = Run().feed(load("pymysql_basic")).close()
    (conn,) = r.of("mysql.connect")
    assert conn.status == "ok" and conn.db_system == "mariadb" and conn.user == "root"
    assert conn.database == "test" and conn.auth_plugin == "mysql_native_password"
    attrs = [e for e in r.of("core.identity") if e.source == "mysql.connect_attrs"]
    assert attrs[0].attrs["program_name"] == "fixture-app"
    q = r.of("mysql.query")
    ops = [(e.operation, tuple(e.tables)) for e in q]
    assert ("INSERT", ("fx_basic",)) in ops and ("DELETE", ("fx_basic",)) in ops
    sel = next(e for e in q if e.operation == "SELECT" and e.status == "ok")
    assert sel.rows_returned == 3 and sel.text == "SELECT * FROM fx_basic WHERE id IN (?, ?, ?)"
    upd = next(e for e in q if e.operation == "UPDATE")
    assert upd.rows_affected == 2 and upd.rows_returned is None
    bad = next(e for e in q if e.status == "error")
    assert bad.error_code == "1146" and "fx_missing_table" in (bad.error_message or "")
    # the transaction pymysql opened (autocommit off) ends at COMMIT
    txn = [e for e in q if e.transaction is not None]
    assert txn[-1].operation == "COMMIT" and txn[-1].transaction_end
    assert {e.transaction for e in txn} == {1}
    cmds = [e.command for e in r.of("mysql.command")]
    assert cmds == ["COM_INIT_DB", "COM_PING", "COM_QUIT"]


def test_multi_statements_one_event_per_result() -> None:
    r = Run().feed(load("pymysql_multi")).close()
    batch = [e for e in r.of("mysql.query") if e.batch_size == 5]
    assert [e.operation for e in batch] == ["DROP", "CREATE", "INSERT", "SELECT", "SELECT"]
    assert [e.batch for e in batch] == [0, 1, 2, 3, 4]
    assert batch[2].rows_affected == 2 and batch[3].rows_returned == 2
    assert batch[4].text == "SELECT ? AS s, ?"  # the ';' inside the string is not a separator
    failed = [e for e in r.of("mysql.query") if e.batch_size == 2]
    assert [(e.status, e.error_code) for e in failed] == [("ok", None), ("error", "1146")]


def test_binary_protocol_session() -> None:
    r = Run(keep_literals=True).feed(load("mariadb_ps")).close()
    prep = [e for e in r.of("mysql.command") if e.command == "COM_STMT_PREPARE"]
    assert [p.operation for p in prep] == ["INSERT", "INSERT", "SELECT"]
    ex = [e for e in r.of("mysql.query") if e.command != "COM_QUERY"]
    assert [e.command for e in ex] == [
        "COM_STMT_EXECUTE",
        "COM_STMT_BULK_EXECUTE",
        "COM_STMT_EXECUTE",
    ]
    # execute-direct (statement id -1) gets the text and the id of the PREPARE before it
    assert ex[0].text == "INSERT INTO fx_ps VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    assert ex[0].statement_id == prep[0].statement_id
    assert ex[0].params == [
        "1",
        "'one'",
        "12.345",
        "'2024-01-02 03:04:05.678901'",
        "1.25",
        "x'0001ff'",
        "'2024-05-06'",
        "'05:00:03'",
    ]
    assert ex[1].rows_affected == 4  # the bulk insert of 4 rows
    # a cursor: EXECUTE opens it (no rows), COM_STMT_FETCH brings them
    assert ex[2].rows_returned == 0
    fetch = next(e for e in r.of("mysql.command") if e.command == "COM_STMT_FETCH")
    assert fetch.rows_returned == 5 and fetch.statement_id == ex[2].statement_id


def test_literals_are_not_kept_by_default() -> None:
    r = Run().feed(load("mariadb_ps")).close()
    for e in r.of("mysql.query"):
        assert e.params is None and e.id_scan is None
        assert "one" not in e.text and "12.345" not in e.text


def test_deprecate_eof_session() -> None:
    r = Run(keep_literals=True).feed(load("deprecate_eof")).close()
    q = r.of("mysql.query")
    sel = q[3]
    assert sel.text == "SELECT * FROM fx_eof" and sel.rows_returned == 2 and sel.batch_size == 3
    assert q[5].rows_affected == 1 and q[5].operation == "UPDATE"
    assert q[6].rows_returned == 0  # empty result set, terminated by an OK
    ex = [e for e in q if e.command == "COM_STMT_EXECUTE"]
    # long data for the BLOB, DECIMAL and DATETIME(6) parameters
    assert ex[0].params == ["3", "12.50", "'2024-02-29 23:59:58.123456'", "<long data: 11 bytes>"]
    assert ex[1].status == "error" and ex[1].error_code == "1210"
    fetches = [e.rows_returned for e in r.of("mysql.command") if e.command == "COM_STMT_FETCH"]
    assert fetches == [2, 1]
    prep_err = [e for e in r.of("mysql.command") if e.command == "COM_STMT_PREPARE"][-1]
    assert prep_err.status == "error" and prep_err.error_code == "1054"


def test_load_data_local_infile() -> None:
    r = Run().feed(load("cli_infile")).close()
    ld = next(e for e in r.of("mysql.query") if e.operation == "LOAD")
    assert ld.status == "ok" and ld.rows_affected == 20 and ld.infile_bytes == 160
    assert ld.tables == ["fx_inf"]


def test_auth_switch_and_change_user() -> None:
    r = Run().feed(load("auth_switch")).close()
    (conn,) = r.of("mysql.connect")
    assert conn.status == "ok" and conn.auth_plugin == "mysql_native_password"
    r = Run().feed(load("change_user")).close()
    cu = next(e for e in r.of("mysql.command") if e.command == "COM_CHANGE_USER")
    assert cu.status == "ok"
    q = r.of("mysql.query")
    assert [e.database for e in q if e.text == "SELECT DATABASE()"] == ["mysql", "test"]


def test_commands_session() -> None:
    r = Run().feed(load("commands")).close()
    cmds = [(e.command, e.status) for e in r.of("mysql.command")]
    assert cmds == [
        ("COM_RESET_CONNECTION", "ok"),
        ("COM_FIELD_LIST", "ok"),
        ("COM_STATISTICS", "ok"),
        ("COM_INIT_DB", "ok"),
        ("COM_PING", "ok"),
        ("COM_QUIT", "none"),
    ]


def test_no_secret_in_any_event() -> None:
    chunks = load("password")
    r = Multi(chunks, keep_literals=True)
    blob = b"\n".join(dumps(e) for e in r.events)
    assert FX_PASSWORD.encode() not in blob
    s2c, c2s = stream(chunks, 1), stream(chunks, 0)
    # every scramble the server sent, and every auth response the client sent
    for data in (s2c, c2s):
        pos = 0
        while pos + 4 <= len(data):
            n = int.from_bytes(data[pos : pos + 3], "little")
            payload = data[pos + 4 : pos + 4 + n]
            if payload[:1] == b"\x0a":  # greeting: scramble parts 1 and 2
                vend = payload.index(b"\x00", 1)
                secret = payload[vend + 5 : vend + 13]
                assert secret not in blob and secret.hex().encode() not in blob
            if payload[:1] == b"\xfe" and len(payload) > 30:  # auth switch data
                plugin_end = payload.index(b"\x00", 1)
                secret = payload[plugin_end + 1 : plugin_end + 21]
                assert secret not in blob and secret.hex().encode() not in blob
            pos += 4 + n
    connects = r.of("mysql.connect")
    assert [(c.user, c.status) for c in connects] == [
        ("sniff_fx_user", "ok"),
        ("sniff_fx_user", "error"),
        ("root", "ok"),
    ]
    assert connects[1].error_code == "1045"
    cu = next(e for e in r.of("mysql.command") if e.command == "COM_CHANGE_USER")
    assert cu.status == "ok"
    logins = [e.attrs for e in r.of("core.identity") if e.source == "mysql.login"]
    assert logins[-1]["user"] == "sniff_fx_user" and logins[-1]["database"] == "test"


# --- fuzz ---------------------------------------------------------------------------------


def _outcome(chunks: Chunks) -> None:
    r = Run()
    r.feed(chunks).close()
    assert r.out_c == stream(chunks, 0)
    s_in, s_out = stream(chunks, 1), r.out_s
    assert len(s_out) == len(s_in)
    if s_out != s_in:  # only a greeting's capability bits may have changed
        assert r.dec.greeting_seen
    errors = [i for i, e in enumerate(r.events) if isinstance(e, ProtocolError)]
    assert len(errors) <= 1
    if errors:
        assert r.dec.passthrough
        # nothing decoded after the error (closing the connection may still report
        # commands that were in flight; none, since passthrough stops that too)
        assert errors[0] == len(r.events) - 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.binary(max_size=400), st.booleans())
def test_fuzz_random_streams(c: bytes, s: bytes, after_login: bool) -> None:
    prefix: Chunks = merged(load("pymysql_basic"))[:3] if after_login else []
    _outcome([*prefix, (1, s), (0, c), (1, s[::-1])])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(NAMES),
    st.integers(0, 2**32),
    st.integers(1, 6),
    st.sampled_from(["flip", "drop", "insert", "truncate"]),
)
def test_fuzz_mutated_sessions(name: str, seed: int, n: int, how: str) -> None:
    rnd = random.Random(seed)
    chunks = [(d, bytearray(data)) for d, data in merged(load(name))]
    for _ in range(n):
        i = rnd.randrange(len(chunks))
        buf = chunks[i][1]
        if not buf:
            continue
        j = rnd.randrange(len(buf))
        if how == "flip":
            buf[j] ^= 1 << rnd.randrange(8)
        elif how == "drop":
            del buf[j]
        elif how == "insert":
            buf.insert(j, rnd.randrange(256))
        else:
            del buf[j:]
    _outcome([(d, bytes(b)) for d, b in chunks])
