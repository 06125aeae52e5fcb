"""PostgreSQL (protocol 3): statement spans, SSLRequest handling, optional TLS termination
and sqlcommenter tagging. See ``decoder.py`` (sans-IO protocol), ``tls.py`` (sans-IO TLS)
and ``handler.py`` (relay glue).

The options mirror the MySQL proxy's: ``capture_sql_literals``, ``sqlcommenter``,
``max_statement_bytes`` and a ``tls`` table with the same keys and meanings.
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING, Any

from sniff.config import ConfigError, Option, ProxyConfig
from sniff.relay import EventSink, Listener, RelayListener

if TYPE_CHECKING:
    from proxies.postgres.handler import PgSettings

OPTIONS = {
    "capture_sql_literals": Option(
        bool,
        False,
        "keep statement text, bound parameters and NOTIFY payloads with their literal values; "
        "by default literals are replaced by ? before anything is stored or exported",
    ),
    "sqlcommenter": Option(
        bool,
        False,
        "append /*traceparent='...'*/ to Query and Parse statements so the server's own logs "
        "(log_statement, pg_stat_activity) carry the trace id (changes the text the server sees)",
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
        "ca = PEM to verify the server, server_hostname = name }; without it sniff answers "
        "SSLRequest with 'N' itself, so clients that allow it talk plaintext",
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
    if not tls.get("cert"):
        raise ConfigError(
            f'{key}.tls.cert: missing; set tls = {{ cert = "server.pem", key = "server.key" }} '
            "(the certificate sniff presents to PostgreSQL clients)"
        )
    for k in ("cert", "key", "ca", "server_hostname"):
        v = tls.get(k)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{key}.tls.{k}: expected a string, got {v!r}")
    for k in ("cert", "key", "ca"):
        v = tls.get(k)
        if v is not None and not os.path.isfile(v):
            raise ConfigError(f"{key}.tls.{k}: {v!r} does not exist; give the path of a PEM file")
    up = tls.get("upstream", "auto")
    if up not in _UPSTREAM:
        raise ConfigError(
            f"{key}.tls.upstream: {up!r} is not one of {', '.join(map(repr, _UPSTREAM))}"
        )
    from proxies.postgres.tls import server_context, upstream_context

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
