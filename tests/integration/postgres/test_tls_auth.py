"""TLS termination and password authentication through sniff.

The shared server has ssl off and trust auth, so server-side TLS and password
authentication (SCRAM-SHA-256, md5, cleartext) use a private throwaway cluster
(see ``cluster.py``) with ssl on and a certificate made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from sniff.config import ConfigError, from_dict
from tests.conftest import require_server
from tests.integration.postgres.cluster import PASSWORD, PrivateCluster, make_cert
from tests.integration.postgres.test_postgres import capture_bytes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def cluster(certs: tuple[Path, Path]) -> Iterator[PrivateCluster]:
    why = PrivateCluster.unavailable()
    if why:
        pytest.skip(f"private PostgreSQL cluster unavailable: {why}")
    with PrivateCluster(*certs) as c:
        yield c


def _verify_ctx(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))  # verify-full: chain and 127.0.0.1


def test_tls_terminated_in_front_of_a_plaintext_server(
    sniff_run: Any, certs: tuple[Path, Path]
) -> None:
    require_server("postgres")
    cert, key = certs
    p = sniff_run(
        [
            {
                "protocol": "postgres",
                "upstream": "127.0.0.1:5432",
                "tls": {"cert": str(cert), "key": str(key)},
            }
        ]
    )
    port = p.port()

    async def work() -> list[Any]:
        out = []
        for direct in (False, True):
            c = await asyncpg.connect(
                host="127.0.0.1", port=port, user="postgres", database="test",
                ssl=_verify_ctx(cert), direct_tls=direct,
            )  # fmt: skip
            out.append(await c.fetchval("SELECT $1::text", f"asyncpg direct={direct}"))
            await c.close()
        return out

    assert asyncio.run(work()) == ["asyncpg direct=False", "asyncpg direct=True"]
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=test sslmode=verify-full sslrootcert={cert}"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 'psycopg'").fetchone() == ("psycopg",)
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(dsn + " sslnegotiation=direct") as conn:  # PostgreSQL 17+ libpq
        assert conn.execute("SELECT 'direct'").fetchone() == ("direct",)
    p.stop()
    ops = [e.operation for e in p.events("postgres.query")]
    assert ops.count("SELECT") == 4
    sessions = p.events("postgres.session")
    assert len(sessions) == 4
    assert all(s.client_tls and not s.upstream_tls and s.status == "ok" for s in sessions)
    assert "does not accept TLS; sniff talks to it in plaintext" in p.text()
    assert not p.events("core.protocol_error")


def test_tls_on_both_sides_with_scram_channel_binding(
    sniff_run: Any, certs: tuple[Path, Path], cluster: PrivateCluster
) -> None:
    """sniff presents the server's own certificate, so SCRAM-SHA-256-PLUS (channel binding
    to the certificate) still verifies end to end."""
    cert, key = certs
    p = sniff_run(
        [
            {
                "protocol": "postgres",
                "upstream": f"127.0.0.1:{cluster.port}",
                "tls": {"cert": str(cert), "key": str(key), "upstream": "require", "ca": str(cert)},
            }
        ]
    )
    port = p.port()
    base = f"host=127.0.0.1 port={port} dbname=postgres password={PASSWORD} sslmode=verify-full sslrootcert={cert}"
    with psycopg.connect(base + " user=scramuser channel_binding=require") as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)  # the server sees TLS from sniff
    for user in ("md5user", "pwuser"):
        with psycopg.connect(base + f" user={user}") as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)

    async def work() -> None:
        c = await asyncpg.connect(
            host="127.0.0.1", port=port, user="scramuser", password=PASSWORD,
            database="postgres", ssl=_verify_ctx(cert),
        )  # fmt: skip
        assert await c.fetchval("SELECT current_user") == "scramuser"
        await c.close()

    asyncio.run(work())
    p.stop()
    sessions = p.events("postgres.session")
    assert [s.auth for s in sessions] == ["scram-sha-256-plus", "md5", "password", "scram-sha-256"]
    assert all(s.client_tls and s.upstream_tls and s.status == "ok" for s in sessions)
    assert PASSWORD.encode() not in capture_bytes(p)


def test_password_auth_in_plaintext_never_stored(sniff_run: Any, cluster: PrivateCluster) -> None:
    p = sniff_run([{"protocol": "postgres", "upstream": f"127.0.0.1:{cluster.port}"}])
    port = p.port()

    async def work() -> None:
        for user in ("scramuser", "md5user", "pwuser"):
            c = await asyncpg.connect(
                host="127.0.0.1", port=port, user=user, password=PASSWORD, database="postgres"
            )
            assert await c.fetchval("SELECT current_user") == user
            await c.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(
                host="127.0.0.1",
                port=port,
                user="scramuser",
                password="not-it",
                database="postgres",
            )

    asyncio.run(work())
    for user in ("scramuser", "md5user", "pwuser"):
        dsn = f"host=127.0.0.1 port={port} dbname=postgres user={user} password={PASSWORD}"
        with psycopg.connect(dsn) as conn:  # sslmode=prefer: sniff answers 'N'
            assert conn.execute("SELECT current_user").fetchone() == (user,)
    p.stop()
    sessions = [(s.user, s.auth, s.status) for s in p.events("postgres.session")]
    assert sessions == [
        ("scramuser", "scram-sha-256", "ok"),
        ("md5user", "md5", "ok"),
        ("pwuser", "password", "ok"),
        ("scramuser", "scram-sha-256", "error"),
        ("scramuser", "scram-sha-256", "ok"),
        ("md5user", "md5", "ok"),
        ("pwuser", "password", "ok"),
    ]
    raw = capture_bytes(p)
    assert PASSWORD.encode() not in raw and b"not-it" not in raw
    import hashlib

    inner = hashlib.md5((PASSWORD + "md5user").encode()).hexdigest().encode()
    assert inner not in raw  # what pg_authid holds for md5user, and what the salted hash is made of


def test_tls_upstream_require_refused_by_server(sniff_run: Any, certs: tuple[Path, Path]) -> None:
    require_server("postgres")
    cert, key = certs
    tls = {"cert": str(cert), "key": str(key), "upstream": "require"}
    p = sniff_run([{"protocol": "postgres", "upstream": "127.0.0.1:5432", "tls": tls}])

    async def work() -> None:
        # the error waits for the client's StartupMessage (inside its TLS), so it can show it
        with pytest.raises(asyncpg.PostgresError, match=r"tls\.upstream"):
            await asyncpg.connect(host="127.0.0.1", port=p.port(), user="postgres", database="test")

    asyncio.run(work())
    with pytest.raises(psycopg.OperationalError, match=r'tls\.upstream = "require"'):
        psycopg.connect(f"host=127.0.0.1 port={p.port()} user=postgres dbname=test sslmode=prefer")
    p.stop()
    assert 'tls.upstream = "require"' in p.text()


def test_upstream_certificate_not_trusted(
    sniff_run: Any, cluster: PrivateCluster, tmp_path: Path
) -> None:
    other_cert, _ = make_cert(tmp_path, "other")
    p = sniff_run(
        [
            {
                "protocol": "postgres",
                "upstream": f"127.0.0.1:{cluster.port}",
                "tls": {
                    "cert": str(other_cert),
                    "key": str(other_cert.with_suffix(".key")),
                    "upstream": "require",
                    "ca": str(other_cert),
                },
            }
        ]
    )
    dsn = f"host=127.0.0.1 port={p.port()} dbname=postgres user=scramuser password={PASSWORD}"
    with pytest.raises(psycopg.OperationalError, match=r"sniff: TLS to the server .* failed"):
        psycopg.connect(dsn)
    p.stop()
    assert "TLS to the server" in p.text()


def test_channel_binding_with_a_different_certificate_fails(
    sniff_run: Any, cluster: PrivateCluster, tmp_path: Path
) -> None:
    """The documented limit: with a certificate other than the server's, a client that
    insists on channel binding cannot authenticate through a TLS-terminating sniff."""
    cert, key = make_cert(tmp_path, "proxy")
    p = sniff_run(
        [
            {
                "protocol": "postgres",
                "upstream": f"127.0.0.1:{cluster.port}",
                "tls": {"cert": str(cert), "key": str(key)},
            }
        ]
    )
    dsn = (
        f"host=127.0.0.1 port={p.port()} dbname=postgres user=scramuser password={PASSWORD}"
        " sslmode=require"
    )
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn + " channel_binding=require")
    with psycopg.connect(dsn + " channel_binding=disable") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    p.stop()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"tls": {"cert": "/nonexistent.crt", "key": "/nonexistent.key"}}, r"proxy\[0\]\.tls\.cert: .*does not exist"),
        ({"tls": {"key": "KEY"}}, r"proxy\[0\]\.tls\.cert: missing"),
        ({"tls": {"cert": "KEY", "key": "KEY"}}, r"proxy\[0\]\.tls: cannot load cert"),
        ({"tls": {"cert": "CERT", "key": "KEY", "upstream": "always"}}, r"proxy\[0\]\.tls\.upstream: 'always' is not one of"),
        ({"tls": {"cert": "CERT", "key": "KEY", "verify": True}}, r"proxy\[0\]\.tls\.verify: unknown key"),
        ({"tls": "CERT"}, r"proxy\[0\]\.tls: expected a table"),
        ({"max_statement_bytes": 10}, r"proxy\[0\]\.max_statement_bytes: must be at least 256"),
        ({"sqlcommenter": "yes"}, r"proxy\[0\]\.sqlcommenter: expected true or false"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(
    extra: dict[str, Any], match: str, certs: tuple[Path, Path]
) -> None:
    cert, key = certs

    def fill(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return v.replace("CERT", str(cert)).replace("KEY", str(key)) if isinstance(v, str) else v

    table = {"protocol": "postgres", "listen": "127.0.0.1:15432", "upstream": "127.0.0.1:5432"}
    table.update(fill(extra))
    with pytest.raises(ConfigError, match=match):
        from_dict({"proxy": [table]})


def test_config_defaults() -> None:
    cfg = from_dict(
        {
            "proxy": [
                {"protocol": "postgres", "listen": "127.0.0.1:15432", "upstream": "127.0.0.1:5432"}
            ]
        }
    )
    o = cfg.proxies[0].options
    assert (o["sqlcommenter"], o["capture_sql_literals"], o["max_statement_bytes"], o["tls"]) == (
        False,
        False,
        65536,
        None,
    )


def test_counts_match_pg_stat_statements(sniff_run: Any, cluster: PrivateCluster) -> None:
    """The server's own count of executed statements (pg_stat_statements, top level,
    completed executions) equals sniff's count of successful ones, per operation."""
    p = sniff_run([{"protocol": "postgres", "upstream": f"127.0.0.1:{cluster.port}"}])
    port = p.port()
    t = f"pgss_{secrets.token_hex(3)}"
    admin = psycopg.connect(  # the superuser, over the cluster's unix socket
        f"host={cluster.dir} port={cluster.port} dbname=postgres user=postgres", autocommit=True
    )
    admin.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
    admin.execute(f"GRANT ALL ON {t} TO md5user")
    admin.execute("SELECT pg_stat_statements_reset()")

    async def work() -> None:
        c = await asyncpg.connect(
            host="127.0.0.1", port=port, user="md5user", password=PASSWORD, database="postgres"
        )
        await c.executemany(f"INSERT INTO {t} VALUES ($1, $2)", [(i, "a") for i in range(40)])
        for i in range(25):
            await c.fetchrow(f"SELECT * FROM {t} WHERE id = $1", i)
        await c.execute(f"UPDATE {t} SET v = 'b' WHERE id < 10; DELETE FROM {t} WHERE id = 39")
        with contextlib.suppress(asyncpg.PostgresError):
            await c.execute(f"INSERT INTO {t} VALUES (1, 'dup')")
        async with c.transaction():
            async for _ in c.cursor(f"SELECT * FROM {t}", prefetch=6):
                pass
        await c.close()

    asyncio.run(work())
    dsn = f"host=127.0.0.1 port={port} dbname=postgres user=md5user password={PASSWORD}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.pipeline():
            for i in range(12):
                conn.execute(f"UPDATE {t} SET v = %s WHERE id = %s", ("p", i))
        with conn.cursor() as cur:
            cur.executemany(f"DELETE FROM {t} WHERE id = %s", [(i,) for i in range(30, 35)])
        for _ in range(3):
            conn.execute(f"SELECT count(*) FROM {t}", prepare=True).fetchone()
    p.stop()
    server = Counter[str]()
    for query, calls in admin.execute(
        "SELECT s.query, s.calls FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid"
        " WHERE r.rolname = 'md5user'"
    ):
        server[query.split(None, 1)[0].upper()] += calls
    admin.execute(f"DROP TABLE {t}")
    admin.close()
    ok = [e for e in p.events("postgres.query") if e.status == "ok"]
    dml = ("SELECT", "INSERT", "UPDATE", "DELETE")
    sniffed = Counter(e.operation for e in ok if e.operation in dml)
    assert sniffed == Counter({k: server[k] for k in dml if server[k]})
    assert sniffed["INSERT"] == 40 and sniffed["DELETE"] == 6
