"""MySQL/MariaDB: decoding, statement spans, optional sqlcommenter tag and TLS termination."""

from __future__ import annotations

from typing import Any

from proxies.sql.options import server_context, sql_options, upstream_context
from proxies.sql.options import validate as sql_validate
from sniff.config import ProxyConfig
from sniff.relay import EventSink, Listener, RelayListener

OPTIONS = sql_options(
    literals="statement text and bound parameters",
    tagged="each COM_QUERY statement so the database's own logs",
    without_tls="sniff removes CLIENT_SSL from the server greeting so clients talk plaintext",
)


def validate(cfg: ProxyConfig, key: str) -> None:
    sql_validate(cfg, key, "MySQL clients", (server_context, upstream_context))


def create_listener(cfg: ProxyConfig, sink: EventSink) -> Listener:
    from proxies.mysql.decoder import MysqlShared
    from proxies.mysql.handler import MysqlCaptureHandler, MysqlHandler, MysqlTlsHandler
    from proxies.sql.capture import capture_mode

    if capture_mode(cfg, sink):
        return RelayListener(cfg, sink, MysqlCaptureHandler)
    shared = MysqlShared(cfg.name)
    tls = cfg.options.get("tls")
    if tls:
        sctx = server_context(tls)
        uctx = upstream_context(tls)
        return RelayListener(cfg, sink, lambda ctx: MysqlTlsHandler(ctx, shared, sctx, uctx))
    return RelayListener(cfg, sink, lambda ctx: MysqlHandler(ctx, shared))


def make_decoder(cfg: ProxyConfig, conn: int, emit: Any, emit_fields: Any, clock: Any) -> Any:
    """The capture-process decoder for one connection (see sniff.decode_host): the in-line
    decoder's options, the proxy's shared state, the chunk clock; nothing to release."""
    from proxies.sql.capture import IdleDecoder, capture_mode, per_proxy

    if not capture_mode(cfg):  # tls or sqlcommenter: this proxy decodes in-line
        return IdleDecoder()
    from proxies.mysql.decoder import MysqlDecoder, MysqlShared
    from proxies.mysql.handler import MysqlRawDecoder

    o = cfg.options
    return MysqlRawDecoder(
        MysqlDecoder(
            conn,
            emit,
            keep_literals=bool(o.get("capture_sql_literals", False)),
            max_statement_bytes=int(o.get("max_statement_bytes", 65536)),
            shared=per_proxy(cfg, "mysql", lambda: MysqlShared(cfg.name)),
            clock=clock,
        )
    )
