"""The options both SQL proxies take, their validation, and the TLS contexts of ``tls``.

MySQL and PostgreSQL share ``capture_sql_literals``, ``sqlcommenter``,
``max_statement_bytes`` and a ``tls`` table with the same keys and meanings; only
the help texts (what each protocol tags, what happens without ``tls``) and the
ALPN protocol differ.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import Any

from sniff.config import ConfigError, Option, ProxyConfig

TLS_KEYS = {"cert", "key", "ca", "upstream", "server_hostname"}
UPSTREAM_MODES = ("auto", "require", "off")


def sql_options(literals: str, tagged: str, without_tls: str) -> dict[str, Option]:
    """The option table: ``literals`` says what else keeps its literal values,
    ``tagged`` which statements sqlcommenter edits and where the id shows up,
    ``without_tls`` what sniff does with a client's TLS when ``tls`` is not set."""
    return {
        "capture_sql_literals": Option(
            bool,
            False,
            f"keep {literals} with their literal values; by default literals are replaced "
            "by ? before anything is stored or exported",
        ),
        "sqlcommenter": Option(
            bool,
            False,
            f"append /*traceparent='...'*/ to {tagged} carry the trace id "
            "(changes the statement text the server sees)",
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
            f"ca = PEM to verify the server, server_hostname = name }}; without it {without_tls}",
        ),
    }


def validate(
    cfg: ProxyConfig,
    key: str,
    clients: str,
    contexts: tuple[Callable[[dict[str, Any]], Any], Callable[[dict[str, Any]], Any]],
) -> None:
    """Check the shared options; ``clients`` names who sees the certificate, and the
    ``(server_context, upstream_context)`` builders load the ``tls`` files up front."""
    n = cfg.options["max_statement_bytes"]
    if n < 256:
        raise ConfigError(f"{key}.max_statement_bytes: must be at least 256, got {n}")
    tls = cfg.options.get("tls")
    if tls is None:
        return
    unknown = set(tls) - TLS_KEYS
    if unknown:
        raise ConfigError(
            f"{key}.tls.{sorted(unknown)[0]}: unknown key; known keys: {', '.join(sorted(TLS_KEYS))}"
        )
    if not tls.get("cert"):
        raise ConfigError(
            f'{key}.tls.cert: missing; set tls = {{ cert = "server.pem", key = "server.key" }} '
            f"(the certificate sniff presents to {clients})"
        )
    for k in ("cert", "key", "ca", "server_hostname"):
        v = tls.get(k)
        if v is not None and not isinstance(v, str):
            what = "a host name" if k == "server_hostname" else "a file path"
            raise ConfigError(f"{key}.tls.{k}: expected {what}, got {v!r}")
    for k in ("cert", "key", "ca"):
        v = tls.get(k)
        if v is not None and not os.path.isfile(v):
            raise ConfigError(f"{key}.tls.{k}: {v!r} does not exist; give the path of a PEM file")
    up = tls.get("upstream", "auto")
    if up not in UPSTREAM_MODES:
        raise ConfigError(
            f"{key}.tls.upstream: {up!r} is not one of {', '.join(map(repr, UPSTREAM_MODES))}"
        )
    server_ctx, upstream_ctx = contexts
    try:
        server_ctx(tls)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"{key}.tls: cannot load cert {tls['cert']!r} / key {tls.get('key')!r}: {e}; "
            "give a PEM certificate and its unencrypted private key"
        ) from None
    if tls.get("ca"):
        try:
            upstream_ctx(tls)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"{key}.tls.ca: cannot load {tls['ca']!r}: {e}") from None


def server_context(tls: dict[str, Any], alpn: str | None = None) -> ssl.SSLContext:
    """What sniff presents to clients when it terminates their TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls["cert"], tls.get("key") or None)
    if alpn:
        ctx.set_alpn_protocols([alpn])
    return ctx


def upstream_context(tls: dict[str, Any], alpn: str | None = None) -> ssl.SSLContext:
    """What sniff uses towards the server: encryption only, or with ``ca`` the server's
    chain verified (and its name too with ``server_hostname``)."""
    if tls.get("ca"):
        ctx = ssl.create_default_context(cafile=tls["ca"])
        ctx.check_hostname = bool(tls.get("server_hostname"))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols([alpn])
    return ctx
