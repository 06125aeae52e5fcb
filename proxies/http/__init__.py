"""HTTP and HTTPS in front of service endpoints: SERVER spans, traceparent injection.

``protocol = "http"`` and ``protocol = "https"`` both land here. HTTP/1.x takes
the fast path: with ``decode = "capture"`` (the default) the relay only injects
(:mod:`proxies.http.injector`) and the capture process decodes copies of the
bytes (:func:`make_decoder`); with ``decode = "inline"`` the decoder
(:mod:`proxies.http.decoder`) runs on the relay. HTTP/2, TLS upstreams
and ``engine = "mitmproxy"`` go through an embedded mitmproxy
(:mod:`proxies.http.mitm`); :mod:`proxies.http.listener` routes each
connection. Options are declared here and checked by :func:`validate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sniff.config import ConfigError, Option, ProxyConfig
from sniff.relay import EventSink, Listener

OPTIONS = {
    "routes": Option(
        list,
        [],
        'route templates for http.route, e.g. ["/v2.1/servers/{id}/action"]; first match wins',
    ),
    "infer_routes": Option(
        bool, True, "without a matching template, collapse id-like path segments to {id}"
    ),
    "redact_headers": Option(
        list, [], "extra header names whose values are never stored (added to the built-in list)"
    ),
    "redact_query": Option(list, [], "extra query parameter names whose values are never stored"),
    "redact_style": Option(
        str,
        "mask",
        'how redacted values are stored: "mask" ([REDACTED]) or "hmac" (keyed hash prefix)',
        choices=("mask", "hmac"),
    ),
    "record_headers": Option(
        list, [], 'extra header names recorded on each exchange; ["*"] records all'
    ),
    "request_id_headers": Option(
        list, [], "extra request-id header names recorded for correlation"
    ),
    "user_agents": Option(
        dict, {}, 'User-Agent substring -> component name, e.g. {"nova-compute" = "nova-compute"}'
    ),
    "http2": Option(
        bool, True, "decode HTTP/2 (h2c prior knowledge; ALPN h2 on https) through mitmproxy"
    ),
    "engine": Option(
        str,
        "auto",
        '"auto": HTTP/1.x on the fast path; "mitmproxy": every connection through mitmproxy',
        choices=("auto", "mitmproxy"),
    ),
    "tls_cert": Option(str, "", "https: PEM certificate (chain) to present to clients"),
    "tls_key": Option(str, "", "https: PEM private key for tls_cert"),
    "upstream_tls": Option(bool, False, "speak TLS to the upstream (through mitmproxy)"),
    "upstream_verify": Option(bool, True, "verify the upstream's TLS certificate"),
    "upstream_ca": Option(str, "", "PEM CA bundle to verify the upstream with (default: system)"),
    "state_dir": Option(
        str,
        "sniff-state",
        "https without tls_cert: where sniff keeps the CA and certificates it generates",
    ),
    "max_head": Option(int, 64 * 1024, "largest request/response head decoded, in bytes"),
}


def _strings(cfg: ProxyConfig, key: str, name: str, lower: bool = False) -> list[str]:
    vals = cfg.options[name]
    for i, v in enumerate(vals):
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(
                f"{key}.{name}[{i}]: expected a non-empty string, got {v!r}; "
                f'write e.g. {name} = ["x-my-header"]'
            )
    return [v.strip().lower() if lower else v.strip() for v in vals]


def validate(cfg: ProxyConfig, key: str) -> None:
    from proxies.http.routes import check_template

    o = cfg.options
    for i, t in enumerate(_strings(cfg, key, "routes")):
        why = check_template(t)
        if why:
            raise ConfigError(
                f'{key}.routes[{i}]: {t!r} {why}; write templates like "/v2.1/servers/{{id}}"'
            )
    for name in ("redact_headers", "request_id_headers"):
        for i, h in enumerate(_strings(cfg, key, name, lower=True)):
            if any(c in h for c in " :\t\r\n"):
                raise ConfigError(
                    f"{key}.{name}[{i}]: {h!r} is not a header name (no spaces or ':'); "
                    'write e.g. "x-auth-token"'
                )
    _strings(cfg, key, "redact_query")
    _strings(cfg, key, "record_headers")
    for pattern, name in o["user_agents"].items():
        if not isinstance(name, str) or not name.strip() or not str(pattern).strip():
            raise ConfigError(
                f"{key}.user_agents.{pattern!r}: expected a non-empty component name; "
                'write e.g. user_agents = {"nova-compute" = "nova-compute"}'
            )
    if o["max_head"] < 1024:
        raise ConfigError(f"{key}.max_head: must be at least 1024 bytes, got {o['max_head']}")
    if not o["state_dir"].strip():
        raise ConfigError(f'{key}.state_dir: must not be empty; e.g. state_dir = "sniff-state"')
    if cfg.protocol == "http":
        for name in ("tls_cert", "tls_key"):
            if o[name]:
                raise ConfigError(
                    f'{key}.{name}: only for protocol = "https"; remove it or change the protocol'
                )
    else:
        if bool(o["tls_cert"]) != bool(o["tls_key"]):
            missing = "tls_key" if o["tls_cert"] else "tls_cert"
            raise ConfigError(
                f"{key}.{missing}: missing; set both tls_cert and tls_key, "
                "or neither to let sniff generate a certificate"
            )
        for name in ("tls_cert", "tls_key"):
            if o[name] and not Path(o[name]).is_file():
                raise ConfigError(f"{key}.{name}: {o[name]!r} is not a readable file")
    if o["upstream_ca"]:
        if not o["upstream_tls"]:
            raise ConfigError(
                f"{key}.upstream_ca: only used with upstream_tls = true; "
                "set upstream_tls = true or remove upstream_ca"
            )
        if not Path(o["upstream_ca"]).is_file():
            raise ConfigError(f"{key}.upstream_ca: {o['upstream_ca']!r} is not a readable file")


def _settings(cfg: ProxyConfig) -> dict[str, Any]:
    """What the HTTP/1 fast path needs of a proxy's options (both decode modes)."""
    from proxies.http import policy

    o = cfg.options
    pol = policy.Policy.build(
        redact_headers=o["redact_headers"],
        redact_query=o["redact_query"],
        request_id_headers=o["request_id_headers"],
        record_headers=o["record_headers"],
        style=o["redact_style"],
        routes=o["routes"],
        infer_routes=o["infer_routes"],
    )
    policy.register(cfg.name, pol)
    return {
        "scheme": "https" if cfg.protocol == "https" else "http",
        "user_agents": dict(o["user_agents"]),
        "max_head": int(o["max_head"]),
        # events carry it: prepare() may run in the capture process (sniff.capture_proc)
        "policy": pol.spec(),
    }


def create_listener(cfg: ProxyConfig, sink: EventSink) -> Listener:
    from proxies.http.listener import HttpListener

    settings = _settings(cfg)
    # decode = "capture" (the default): the fast path injects and ships copies; the
    # capture process decodes them (make_decoder). Sinks that cannot ship: inline.
    settings["capture"] = cfg.options.get("decode", "capture") == "capture" and hasattr(
        sink, "emit_raw"
    )
    return HttpListener(cfg, sink, settings)


_DECODER_SETTINGS: dict[str, tuple[ProxyConfig, dict[str, Any]]] = {}


def make_decoder(cfg: ProxyConfig, conn: int, emit: Any, emit_fields: Any, clock: Any) -> Any:
    """The capture-process decoder for one fast-path connection (see sniff.decode_host
    and proxies.http.handler.HttpRawDecoder)."""
    from proxies.http.decoder import Http1Decoder
    from proxies.http.handler import HttpRawDecoder

    entry = _DECODER_SETTINGS.get(cfg.name)
    if entry is None or entry[0] is not cfg:
        entry = _DECODER_SETTINGS[cfg.name] = (cfg, _settings(cfg))
    settings = entry[1]

    def make() -> Http1Decoder:
        return Http1Decoder(
            conn, emit, proxy=cfg.name, scheme=settings["scheme"], inject=cfg.inject,
            rewrite=False, user_agents=settings["user_agents"], max_head=settings["max_head"],
            clock=clock, policy=settings["policy"], told=cfg.inject,
        )  # fmt: skip

    return HttpRawDecoder(make)
