"""MySQL/MariaDB: decoding, statement spans, optional sqlcommenter tag and TLS termination."""

from __future__ import annotations

import os
import ssl
from typing import Any

from sniff.config import ConfigError, Option, ProxyConfig
from sniff.relay import EventSink, Listener, RelayListener

OPTIONS = {
    "capture_sql_literals": Option(
        bool,
        False,
        "keep statement text and bound parameters with their literal values; by default "
        "literals are replaced by ? before anything is stored or exported",
    ),
    "sqlcommenter": Option(
        bool,
        False,
        "append /*traceparent='...'*/ to each COM_QUERY statement so the database's own "
        "logs carry the trace id (changes the statement text the server sees)",
    ),
    "max_statement_bytes": Option(
        int,
        65536,
        "bytes of each statement's text kept for analysis and db.query.text; longer "
        "statements are relayed whole but recorded truncated",
    ),
    "tls": Option(
        dict,
        None,
        "terminate TLS in sniff: { cert = PEM, key = PEM, upstream = 'auto'|'require'|'off', "
        "ca = PEM to verify the server, server_hostname = name }; without it sniff removes "
        "CLIENT_SSL from the server greeting so clients talk plaintext",
    ),
}

_TLS_KEYS = {"cert", "key", "ca", "upstream", "server_hostname"}
_UPSTREAM = ("auto", "require", "off")


def validate(cfg: ProxyConfig, key: str) -> None:
    n = cfg.options["max_statement_bytes"]
    if n < 256:
        raise ConfigError(f"{key}.max_statement_bytes: must be at least 256, got {n}")
    tls = cfg.options.get("tls")
    if tls is None:
        return
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise ConfigError(
            f"{key}.tls.{sorted(unknown)[0]}: unknown key; known keys: {', '.join(sorted(_TLS_KEYS))}"
        )
    for k in ("cert",):
        if not tls.get(k):
            raise ConfigError(
                f'{key}.tls.cert: missing; set tls = {{ cert = "server.pem", key = "server.key" }} '
                "(the certificate sniff presents to MySQL clients)"
            )
    for k in ("cert", "key", "ca"):
        v = tls.get(k)
        if v is None:
            continue
        if not isinstance(v, str):
            raise ConfigError(f"{key}.tls.{k}: expected a file path, got {v!r}")
        if not os.path.isfile(v):
            raise ConfigError(f"{key}.tls.{k}: {v!r} does not exist; give the path of a PEM file")
    up = tls.get("upstream", "auto")
    if up not in _UPSTREAM:
        raise ConfigError(
            f"{key}.tls.upstream: {up!r} is not one of {', '.join(map(repr, _UPSTREAM))}"
        )
    try:
        server_context(tls)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"{key}.tls: cannot load cert {tls['cert']!r} / key {tls.get('key')!r}: {e}; "
            "give a PEM certificate and its unencrypted private key"
        ) from None
    if tls.get("ca"):
        try:
            upstream_context(tls)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"{key}.tls.ca: cannot load {tls['ca']!r}: {e}") from None


def server_context(tls: dict[str, Any]) -> ssl.SSLContext:
    """The context sniff uses as the TLS server towards MySQL clients."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls["cert"], tls.get("key") or None)
    return ctx


def upstream_context(tls: dict[str, Any]) -> ssl.SSLContext:
    """The context towards the server: verified only when a ``ca`` is configured."""
    if tls.get("ca"):
        ctx = ssl.create_default_context(cafile=tls["ca"])
        ctx.check_hostname = bool(tls.get("server_hostname"))
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


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
