"""Statement analysis: operation, tables, summary, normalisation, the shape cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxies.sql import analysis as A
from proxies.sql.events import MysqlQuery, PostgresQuery
from proxies.sql.sqlcommenter import tag_sql


@pytest.mark.parametrize(
    "sql,op,tables,summary",
    [
        ("SELECT * FROM instances WHERE id = 5", "SELECT", ("instances",), "SELECT instances"),
        (
            "SELECT i.id, c.network_info FROM instances AS i LEFT OUTER JOIN instance_info_caches AS c "
            "ON c.instance_uuid = i.uuid WHERE i.deleted = 0",
            "SELECT",
            ("instances", "instance_info_caches"),
            "SELECT instances instance_info_caches",
        ),
        (
            "INSERT INTO shipping_details (order_id, address) SELECT order_id, address FROM orders "
            "WHERE order_id = 7",
            "INSERT",
            ("shipping_details", "orders"),
            "INSERT shipping_details SELECT orders",
        ),
        (
            "UPDATE quota_usages SET in_use = in_use + 1 WHERE id = 3",
            "UPDATE",
            ("quota_usages",),
            "UPDATE quota_usages",
        ),
        ("DELETE FROM ports WHERE id IN ('a', 'b')", "DELETE", ("ports",), "DELETE ports"),
        ("REPLACE INTO kv (k, v) VALUES ('a', 1), ('b', 2)", "REPLACE", ("kv",), "REPLACE kv"),
        (
            "WITH c AS (SELECT * FROM a) UPDATE b SET x = 1",
            "UPDATE",
            ("a", "b"),
            "UPDATE b SELECT a",
        ),
        (
            "SELECT * FROM t WHERE id = (SELECT max(id) FROM u)",
            "SELECT",
            ("t", "u"),
            "SELECT t SELECT u",
        ),
        ("SELECT 1", "SELECT", (), "SELECT"),
        ("SELECT 1 FROM dual", "SELECT", (), "SELECT"),
        ("  /* app */ (SELECT a FROM x) UNION (SELECT b FROM y)", "SELECT", ("x", "y"), None),
        ("START TRANSACTION", "BEGIN", (), "BEGIN"),
        ("BEGIN", "BEGIN", (), "BEGIN"),
        ("COMMIT", "COMMIT", (), "COMMIT"),
        ("ROLLBACK TO SAVEPOINT sa_1", "ROLLBACK", (), "ROLLBACK"),
        ("SAVEPOINT sa_savepoint_1", "SAVEPOINT", (), "SAVEPOINT"),
        ("RELEASE SAVEPOINT sa_savepoint_1", "RELEASE", (), "RELEASE"),
        ("SET autocommit=0", "SET", (), "SET"),
        ("SHOW VARIABLES LIKE 'sql_mode'", "SHOW", (), "SHOW"),
        ("XA START 'x'", "XA", (), "XA"),
        ("/*!40101 SET NAMES utf8 */", "SET", (), "SET"),
        ("LOCK TABLES t1 WRITE, `t2` AS x READ", "LOCK", ("t1", "t2"), "LOCK t1 t2"),
        ("LOAD DATA LOCAL INFILE '/x.csv' INTO TABLE fx_inf", "LOAD", ("fx_inf",), "LOAD fx_inf"),
        ("CALL update_quotas(1, 'x')", "CALL", (), "CALL update_quotas"),
        ("CREATE TABLE IF NOT EXISTS foo (a INT)", "CREATE", ("foo",), "CREATE foo"),
        ("DROP TABLE foo", "DROP", ("foo",), "DROP foo"),
        ("TRUNCATE TABLE foo", "TRUNCATE", ("foo",), "TRUNCATE foo"),
        ("SELECT * FROM nova_api.cell_mappings", "SELECT", ("nova_api.cell_mappings",), None),
        ("SELEC 1", "SELEC", (), "SELEC"),
        ("", "", (), ""),
    ],
)
def test_operation_tables_summary(
    sql: str, op: str, tables: tuple[str, ...], summary: str | None
) -> None:
    info = A.analyze(sql, "mysql")
    assert info.operation == op
    assert info.tables == tables
    if summary is not None:
        assert info.summary == summary


@pytest.mark.parametrize(
    "sql,dialect,expected",
    [
        (
            "SELECT * FROM t WHERE a = 'x''y' AND b = \"q\\\"z\" AND c = 12.5e3",
            "mysql",
            "SELECT * FROM t WHERE a = ? AND b = ? AND c = ?",
        ),
        (
            "SELECT t1.c2, anon_1.x FROM t1 WHERE id IN (1, 2, 3) LIMIT 10",
            "mysql",
            "SELECT t1.c2, anon_1.x FROM t1 WHERE id IN (?, ?, ?) LIMIT ?",
        ),
        ("SELECT 0x1F, -3, x'ab'", "mysql", "SELECT ?, -?, x?"),
        (
            "SELECT 'it''s' /* keep 'me' 1 */ -- and 2\n, 3",
            "mysql",
            "SELECT ? /* keep 'me' 1 */ -- and 2\n, ?",
        ),
        (
            "SELECT $1, $$body 'x'$$, $tag$ a $tag$, E'a\\'b', \"Col\" FROM t WHERE x = 'C:\\'",
            "postgres",
            'SELECT $1, ?, ?, ?, "Col" FROM t WHERE x = ?',
        ),
        ("SELECT \"Col\", 'a' FROM t", None, 'SELECT "Col", ? FROM t'),
    ],
)
def test_normalize(sql: str, dialect: str | None, expected: str) -> None:
    assert A.normalize(sql, dialect) == expected


def test_shape_collapses_lists_and_rows() -> None:
    a = A.shape(A.normalize("SELECT * FROM t WHERE id IN (1, 2, 3)", "mysql"))
    b = A.shape(A.normalize("SELECT * FROM t WHERE id IN (7)", "mysql"))
    assert a == b == "SELECT * FROM t WHERE id IN (?)"
    r1 = A.shape(A.normalize("INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')", "mysql"))
    r2 = A.shape(A.normalize("INSERT INTO t VALUES (9, 'z')", "mysql"))
    assert r1 == r2


def test_cache_parses_each_shape_once() -> None:
    A.clear_cache()
    for i in range(200):
        ids = ", ".join(f"'{i}-{j}'" for j in range(i % 9 + 1))
        A.analyze(f"SELECT * FROM ports WHERE device_id IN ({ids}) AND x = {i}", "mysql")
    assert A.stats["parses"] == 1
    assert A.stats["shape_hits"] == 199


def test_unparseable_statements_still_get_an_operation() -> None:
    info = A.analyze("SELECT FROM WHERE ((( garbage", "mysql")
    assert info.operation == "SELECT" and not info.parsed
    info = A.analyze("HANDLER foo READ FIRST", "mysql")
    assert info.operation == "HANDLER"


def test_split_statements() -> None:
    assert A.split_statements("SELECT 'a;b'; SELECT 2 -- c;d\n; /* ; */ SELECT 3;", "mysql") == (
        "SELECT 'a;b'",
        "SELECT 2 -- c;d",
        "/* ; */ SELECT 3",
    )
    assert A.split_statements("SELECT $$a;b$$; SELECT 2", "postgres") == (
        "SELECT $$a;b$$",
        "SELECT 2",
    )


def test_find_traceparent() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert A.find_traceparent(tag_sql("SELECT 1", tp)) == tp
    assert A.find_traceparent("SELECT 1 /*traceparent='00-0000'*/") is None
    assert A.find_traceparent("SELECT 'traceparent'") is None


def _q(text: str, **kw: object) -> MysqlQuery:
    return MysqlQuery(
        1,
        2,
        "mariadb",
        "nova",
        "COM_QUERY",
        text,
        False,
        2,
        "ok",
        None,
        None,
        None,
        None,
        "a" * 16,
        **kw,
    )  # type: ignore[arg-type]


def test_prepare_normalises_and_finds_ids() -> None:
    u = "3f2a1b4c-1111-2222-3333-444455556666"
    e = _q(f"UPDATE instances SET host = 'compute-1' WHERE uuid = '{u}'")
    e.prepare()
    assert e.text == "UPDATE instances SET host = ? WHERE uuid = ?"
    assert e.operation == "UPDATE" and e.tables == ["instances"] and e.summary == "UPDATE instances"
    assert u in (e.ids or {}).values()
    e.prepare()  # idempotent
    assert e.text == "UPDATE instances SET host = ? WHERE uuid = ?"


def test_prepare_scans_parameters_then_drops_them() -> None:
    u = "3f2a1b4c-1111-2222-3333-444455556666"
    e = _q("SELECT * FROM ports WHERE id = ?", id_scan=b"\x00\x01\xfd\x00$" + u.encode())
    e.prepare()
    assert u in (e.ids or {}).values() and e.id_scan is None


def test_prepare_cuts_its_statement_out_of_a_batch() -> None:
    text = "INSERT INTO a VALUES (1); SELECT 'x;y' FROM b; UPDATE c SET v = 2"
    evs = [_q(text, batch=i, batch_size=3) for i in range(3)]
    for e in evs:
        e.prepare()
    assert [e.operation for e in evs] == ["INSERT", "SELECT", "UPDATE"]
    assert [e.tables for e in evs] == [["a"], ["b"], ["c"]]
    assert evs[1].text == "SELECT ? FROM b"
    # a CALL returning two result sets plus its OK: four results for two statements
    evs = [_q("CALL p(1); SELECT 2", batch=i, batch_size=4) for i in range(4)]
    for e in evs:
        e.prepare()
    assert [e.operation for e in evs] == ["CALL", "CALL", "CALL", "SELECT"]


def test_keep_literals_keeps_the_text() -> None:
    e = _q("SELECT * FROM t WHERE a = 'secret'")
    e.keep_literals = True
    e.prepare()
    assert e.text == "SELECT * FROM t WHERE a = 'secret'" and e.operation == "SELECT"


def test_postgres_events_use_postgres_rules() -> None:
    e = PostgresQuery(
        1,
        2,
        "postgresql",
        "db",
        "Query",
        'SELECT "Id" FROM "Users" WHERE n = \'x\'',
        False,
        2,
        "ok",
        None,
        None,
        1,
        None,
        "b" * 16,
    )
    e.prepare()
    assert e.text == 'SELECT "Id" FROM "Users" WHERE n = ?' and e.tables == ["Users"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["mysql", "postgres", None]))
def test_never_raises(text: str, dialect: str | None) -> None:
    info, norm = A.analyze_normalize(text, dialect)
    assert isinstance(info.operation, str) and isinstance(norm, str)
    A.split_statements(text, dialect)
    A.find_traceparent(text)
