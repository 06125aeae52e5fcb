"""The decoder on real byte streams recorded from PostgreSQL 15 (asyncpg, psycopg 3).

Every transcript must give the same events fed as recorded, with each
direction's consecutive chunks joined, cut in two at every offset (at every
message boundary and its neighbours, plus a sample, for the large one), and one
byte at a time. Credentials in the transcripts never reach an event.
"""

from __future__ import annotations

import random
import struct

import pytest

from proxies.postgres.decoder import PostgresDecoder
from tests.integration.postgres.cluster import PASSWORD
from tests.unit.proxies.postgres.pgwire import (
    FIXTURES,
    boundaries,
    bytewise,
    fixture,
    messages,
    replay,
    runs,
    split_at,
    stream,
)

ALL = sorted(p.name for p in FIXTURES.glob("*.bin"))
SMALL = [n for n in ALL if n != "asyncpg_large.bin"]


def test_fixtures_exist() -> None:
    assert {"asyncpg.bin", "psycopg.bin", "auth_scram.bin", "auth_md5.bin", "auth_pw.bin"} <= set(
        ALL
    )


@pytest.mark.parametrize("name", ALL)
def test_no_protocol_error_and_whole_runs_agree(name: str) -> None:
    chunks = fixture(name)
    ref = replay(chunks)
    assert "core.protocol_error" not in ref.kinds(), ref.of("core.protocol_error")
    assert not ref.dec.passthrough or name.startswith("asyncpg_cancel-")
    assert replay(runs(chunks)).dumped() == ref.dumped()
    # observe mode: what feed_client returns is exactly what it was given
    assert ref.forwarded() == stream(chunks, True)


@pytest.mark.parametrize("name", ALL)
def test_byte_by_byte(name: str) -> None:
    chunks = fixture(name)
    assert replay(bytewise(chunks)).dumped() == replay(chunks).dumped()


@pytest.mark.parametrize("name", SMALL)
def test_split_at_every_offset(name: str) -> None:
    chunks = fixture(name)
    ref = replay(chunks).dumped()
    for c2s in (True, False):
        for k in range(1, len(stream(chunks, c2s))):
            got = replay(split_at(chunks, c2s, k)).dumped()
            assert got == ref, f"{'client' if c2s else 'server'} stream cut at {k}"


def test_split_large_at_boundaries() -> None:
    chunks = fixture("asyncpg_large.bin")
    ref = replay(chunks).dumped()
    rnd = random.Random(5)
    for c2s in (True, False):
        data = stream(chunks, c2s)
        offsets = {b + d for b in boundaries(data, c2s) for d in (-2, -1, 0, 1, 2, 5, 6)}
        offsets |= {rnd.randrange(1, len(data)) for _ in range(100)}
        for k in sorted(o for o in offsets if 0 < o < len(data)):
            assert replay(split_at(chunks, c2s, k)).dumped() == ref, f"cut at {k}"


# --- what the fixtures must produce --------------------------------------------------------


def _ops(name: str) -> list[tuple[str, str, str]]:
    from proxies.sql.analysis import analyze

    return [
        (e.command, analyze(e.text).operation, e.status)
        for e in replay(fixture(name)).of("postgres.query")
    ]


def test_asyncpg_statements() -> None:
    r = replay(fixture("asyncpg.bin"))
    q = r.of("postgres.query")
    texts = [e.text for e in q]
    inserts = [e for e in q if e.text.startswith("INSERT INTO fx (id, name) VALUES ($1")]
    # 20 from the first executemany; the failing one ran 1 ok + the duplicate (error), then stopped
    assert [e.status for e in inserts] == ["ok"] * 21 + ["error"]
    assert all(e.statement_id and e.command == "Execute" for e in inserts)
    assert inserts[-1].error_code == "23505"
    sel = next(e for e in q if e.text.startswith("SELECT id, name FROM fx"))
    assert sel.rows_returned == 5
    parse_err = next(e for e in q if "no_such_table" in e.text)
    assert (parse_err.command, parse_err.status, parse_err.error_code) == (
        "Parse",
        "error",
        "42P01",
    )
    div = next(e for e in q if e.text == "SELECT 1 / $1")
    assert (div.status, div.error_code) == ("error", "22012")
    cursor = next(e for e in q if e.text == "SELECT * FROM fx")
    assert cursor.rows_returned == 20  # 5 Executes (row limit 4) are one statement
    copy_in = next(e for e in q if e.text.startswith('COPY "fx" FROM STDIN'))
    assert copy_in.rows_affected == 40
    copy_out = next(e for e in q if e.text.startswith("COPY (SELECT"))
    assert copy_out.rows_returned == 40
    multi = [e for e in q if e.batch is not None]
    assert [(e.batch, e.batch_size) for e in multi] == [(0, 3), (1, 3), (2, 3)]
    for e in multi:
        e.keep_literals = True
        e.prepare()
    assert [e.text for e in multi] == [
        "SELECT 1",
        "UPDATE fx SET name = 'y' WHERE id = 5",
        "SELECT 'a;b'",
    ]
    txn = [(e.text, e.transaction, e.transaction_end) for e in q if e.transaction]
    assert txn[0] == ("BEGIN;", 1, False) and txn[-1] == ("ROLLBACK;", 2, True)
    assert "ROLLBACK;" in texts and "COMMIT;" in texts
    (n,) = r.of("postgres.notification")
    assert (n.channel, n.payload_size, n.payload) == ("fx_chan", 5, None)
    (s,) = r.of("postgres.session")
    assert (s.status, s.auth, s.database, s.user) == ("ok", "trust", "test", "postgres")
    (ident,) = r.of("core.identity")
    assert ident.source == "postgres.startup"
    assert ident.attrs["database"] == "test"


def test_psycopg_statements() -> None:
    r = replay(fixture("psycopg.bin"))
    q = r.of("postgres.query")
    pipe = [
        e
        for e in q
        if e.text.startswith(("UPDATE px SET v = 'p'", "INSERT INTO px VALUES ($1, $2)"))
    ]
    # in the failing pipeline: UPDATE ok, INSERT duplicate fails, the DELETE after it never ran
    assert [e.status for e in pipe][-2:] == ["ok", "error"]
    deletes = [e for e in q if e.text == "DELETE FROM px WHERE id = $1"]
    assert [e.status for e in deletes] == ["ok"]  # only the second pipeline's DELETE ran
    prepared = [e for e in q if e.text == "SELECT * FROM px WHERE id = $1"]
    assert len(prepared) == 2 and all(e.rows_returned == 1 for e in prepared)
    empty = next(e for e in q if e.text.startswith("-- only a comment"))
    assert empty.status == "ok" and empty.rows_returned is None
    fetches = [e.rows_returned for e in q if e.text.startswith("FETCH")]
    assert fetches == [5, 35]
    (ident,) = r.of("core.identity")
    assert ident.attrs["application_name"] == "fixture"


@pytest.mark.parametrize(
    ("name", "auth", "status"),
    [
        ("auth_scram.bin", "scram-sha-256", "ok"),
        ("auth_md5.bin", "md5", "ok"),
        ("auth_pw.bin", "password", "ok"),
        ("auth_fail.bin", "scram-sha-256", "error"),
    ],
)
def test_auth_methods_and_no_secrets(name: str, auth: str, status: str) -> None:
    chunks = fixture(name)
    r = replay(chunks)
    (s,) = r.of("postgres.session")
    assert (s.auth, s.status) == (auth, status)
    if status == "error":
        assert s.error_code == "28P01"
    blob = b"".join(r.dumped())
    assert PASSWORD.encode() not in blob and b"wrong-password" not in blob
    for t, body in messages(stream(chunks, True)[_startup_len(stream(chunks, True)) :]):
        if t == b"p":  # password, md5 hash, SASL initial response and final message
            secret = body.split(b"\x00")[-2] if body.endswith(b"\x00") else body[-32:]
            assert secret[-24:] not in blob
    for t, body in messages(stream(chunks, False)):
        if t == b"R" and struct.unpack(">I", body[:4])[0] in (5, 11, 12):
            assert body[4:][-16:] not in blob  # md5 salt, SCRAM server-first / final


def _startup_len(data: bytes) -> int:
    (ln,) = struct.unpack_from(">I", data, 0)
    return int(ln)


def test_cancel_request_never_stores_the_secret_key() -> None:
    main = replay(fixture("asyncpg_cancel.bin"))
    (sleep,) = main.of("postgres.query")[:1]
    assert (sleep.status, sleep.error_code) == ("error", "57014")
    (key_msg,) = [b for t, b in messages(stream(fixture("asyncpg_cancel.bin"), False)) if t == b"K"]
    pid, key = struct.unpack(">II", key_msg)
    cancel_stream = stream(fixture("asyncpg_cancel-1.bin"), True)
    assert struct.unpack(">IIII", cancel_stream) == (16, 80877102, pid, key)
    # one shared map, as in one proxy: the cancel names the connection it cancels
    from proxies.postgres.decoder import PostgresShared

    shared = PostgresShared()
    events: list[object] = []
    d1 = PostgresDecoder(1, events.append, ssl_policy="forward", shared=shared)
    for c2s, chunk in fixture("asyncpg_cancel.bin"):
        d1.feed_client(chunk) if c2s else d1.feed_server(chunk)
    d2 = PostgresDecoder(2, events.append, ssl_policy="forward", shared=shared)
    d2.feed_client(cancel_stream)
    (cancel,) = [e for e in events if getattr(e, "kind", "") == "postgres.cancel"]
    assert (cancel.backend_pid, cancel.target_conn) == (pid, 1)  # type: ignore[attr-defined]
    from sniff.events import dumps

    blob = b"".join(dumps(e) for e in events)  # type: ignore[arg-type]
    assert str(key).encode() not in blob and struct.pack(">I", key).hex().encode() not in blob


def test_ops_summary_is_stable() -> None:
    ops = _ops("psycopg.bin")
    assert ("Query", "COPY", "ok") in ops and ("Query", "SELEC", "error") in ops
