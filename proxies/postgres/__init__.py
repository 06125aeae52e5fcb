"""PostgreSQL (protocol 3): statement spans, SSLRequest handling, optional TLS termination
and sqlcommenter tagging. See ``decoder.py`` (sans-IO protocol), ``tls.py`` (sans-IO TLS)
and ``handler.py`` (relay glue).

The options mirror the MySQL proxy's: ``capture_sql_literals``, ``sqlcommenter``,
``max_statement_bytes`` and a ``tls`` table with the same keys and meanings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxies.sql.options import sql_options
from proxies.sql.options import validate as sql_validate
from sniff.config import ProxyConfig
from sniff.relay import EventSink, Listener, RelayListener

if TYPE_CHECKING:
    from proxies.postgres.handler import PgSettings

OPTIONS = sql_options(
    literals="statement text, bound parameters and NOTIFY payloads",
    tagged="Query and Parse statements so the server's own logs (log_statement, pg_stat_activity)",
    without_tls="sniff answers SSLRequest with 'N' itself, so clients that allow it talk plaintext",
)


def validate(cfg: ProxyConfig, key: str) -> None:
    from proxies.postgres.tls import server_context, upstream_context

    sql_validate(cfg, key, "PostgreSQL clients", (server_context, upstream_context))


def settings(cfg: ProxyConfig) -> PgSettings:
    from proxies.postgres.handler import PgSettings
    from proxies.postgres.tls import server_context, upstream_context

    o = cfg.options
    s = PgSettings(
        keep_literals=bool(o["capture_sql_literals"]),
        sqlcommenter=bool(o["sqlcommenter"]),
        max_statement_bytes=int(o["max_statement_bytes"]),
    )
    tls = o.get("tls")
    if tls:
        s.server_ctx = server_context(tls)
        up = tls.get("upstream", "auto")
        s.upstream = {"auto": "prefer", "require": "require", "off": "off"}[up]
        if s.upstream != "off":
            s.upstream_ctx = upstream_context(tls)
            s.upstream_hostname = tls.get("server_hostname") or cfg.upstream.host
    return s


def create_listener(cfg: ProxyConfig, sink: EventSink) -> Listener:
    from proxies.postgres.handler import PostgresCaptureHandler, PostgresHandler, ProxyState
    from proxies.sql.capture import capture_mode

    if capture_mode(cfg, sink):
        return RelayListener(cfg, sink, PostgresCaptureHandler)
    s = settings(cfg)
    state = ProxyState()
    return RelayListener(cfg, sink, lambda ctx: PostgresHandler(ctx, s, state))


def make_decoder(cfg: ProxyConfig, conn: int, emit: Any, emit_fields: Any, clock: Any) -> Any:
    """The capture-process decoder for one connection (see sniff.decode_host): the in-line
    decoder's options, the proxy's shared state (backend pids for CancelRequest, warn-once
    flags), the chunk clock."""
    from proxies.sql.capture import IdleDecoder, capture_mode, per_proxy

    if not capture_mode(cfg):  # tls or sqlcommenter: this proxy decodes in-line
        return IdleDecoder()
    from proxies.postgres.handler import ProxyState, raw_decoder

    s = per_proxy(cfg, "postgres.settings", lambda: settings(cfg))
    state = per_proxy(cfg, "postgres.state", ProxyState)
    return raw_decoder(conn, emit, s, state, cfg.name, clock)
