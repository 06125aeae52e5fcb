"""What an HTTP exchange keeps: recorded headers, request ids, redaction, routes.

Strategy. Each HTTP proxy registers a :class:`Policy` under its name when its
listener is created; :func:`prepare_exchange` (run by the capture writer's
thread through :meth:`HttpExchange.prepare`) parses the raw heads the hot path
kept, applies the policy of the event's proxy, and *always* drops the raw heads,
even when parsing fails, so nothing unredacted reaches the capture.

Redaction:

- secret headers (Authorization, Proxy-Authorization, Cookie, Set-Cookie,
  X-Auth-Token, X-Subject-Token, X-Service-Token and the like, plus the
  ``redact_headers`` option) are recorded only as ``[REDACTED]`` (style
  ``mask``, the default) or ``[REDACTED hmac:<12 hex>]`` (style ``hmac``: an
  HMAC-SHA256 under a random key made at start and never stored, so equal
  secrets compare equal within one run but cannot be guessed from a capture);
- query parameters named in :data:`DEFAULT_REDACT_QUERY` or ``redact_query``
  keep their name and lose their value the same way;
- bodies are never recorded, only their sizes.

Only a subset of headers is recorded (:data:`DEFAULT_RECORD_REQUEST`,
:data:`DEFAULT_RECORD_RESPONSE`, the id headers, any secret header present (so
its presence shows), and ``record_headers``; ``["*"]`` records all).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import orjson

from correlate import shared_ids
from proxies.http.events import NO_REQUEST, NO_RESPONSE
from proxies.http.routes import RouteTable

if TYPE_CHECKING:
    from proxies.http.events import HttpExchange, HttpRequest

log = logging.getLogger("sniff.http")

REDACTED = "[REDACTED]"

DEFAULT_REDACT_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-auth-token",
        "x-subject-token",
        "x-service-token",
        "x-storage-token",
        "x-auth-key",
        "x-api-key",
        "x-amz-security-token",
        "x-vault-token",
    }
)
DEFAULT_REDACT_QUERY = frozenset(
    {
        "access_token",
        "token",
        "api_key",
        "apikey",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "sig",
        "signature",
        "temp_url_sig",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
    }
)
DEFAULT_REQUEST_ID_HEADERS = (
    "x-request-id",
    "x-openstack-request-id",
    "x-compute-request-id",
    "x-correlation-id",
    "request-id",
    "openstack-request-id",
)
DEFAULT_RECORD_REQUEST = frozenset(
    {
        "host",
        "user-agent",
        "content-type",
        "content-length",
        "transfer-encoding",
        "accept",
        "expect",
        "upgrade",
        "connection",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-real-ip",
        "traceparent",
        "tracestate",
        "openstack-api-version",
        "x-openstack-nova-api-version",
    }
)
DEFAULT_RECORD_RESPONSE = frozenset(
    {
        "content-type",
        "content-length",
        "transfer-encoding",
        "location",
        "connection",
        "upgrade",
        "retry-after",
        "www-authenticate",
        "openstack-api-version",
        "x-openstack-nova-api-version",
    }
)


@dataclass
class Policy:
    redact_headers: frozenset[str] = DEFAULT_REDACT_HEADERS
    redact_query: frozenset[str] = DEFAULT_REDACT_QUERY
    request_id_headers: tuple[str, ...] = DEFAULT_REQUEST_ID_HEADERS
    record_request: frozenset[str] | None = DEFAULT_RECORD_REQUEST  # None: all
    record_response: frozenset[str] | None = DEFAULT_RECORD_RESPONSE
    style: str = "mask"  # mask | hmac
    routes: RouteTable = field(default_factory=RouteTable)
    key: str = "default"  # identifies the policy in caches (a digest of spec())
    options: dict[str, Any] = field(default_factory=dict)  # what build() was given

    @classmethod
    def build(
        cls,
        redact_headers: Iterable[str] = (),
        redact_query: Iterable[str] = (),
        request_id_headers: Iterable[str] = (),
        record_headers: Iterable[str] = (),
        style: str = "mask",
        routes: Iterable[str] = (),
        infer_routes: bool = True,
    ) -> Policy:
        options: dict[str, Any] = {
            "redact_headers": sorted({h.lower() for h in redact_headers}),
            "redact_query": sorted({q.lower() for q in redact_query}),
            "request_id_headers": [h.lower() for h in request_id_headers],
            "record_headers": sorted({h.lower() for h in record_headers}),
            "style": style,
            "routes": list(routes),
            "infer_routes": bool(infer_routes),
        }
        key = hashlib.sha256(orjson.dumps(options, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        ids = DEFAULT_REQUEST_ID_HEADERS + tuple(
            h for h in options["request_id_headers"] if h not in DEFAULT_REQUEST_ID_HEADERS
        )
        rec = set(options["record_headers"])
        everything = "*" in rec
        return cls(
            redact_headers=DEFAULT_REDACT_HEADERS | set(options["redact_headers"]),
            redact_query=DEFAULT_REDACT_QUERY | set(options["redact_query"]),
            request_id_headers=ids,
            record_request=None if everything else DEFAULT_RECORD_REQUEST | rec,
            record_response=None if everything else DEFAULT_RECORD_RESPONSE | rec,
            style=style,
            routes=RouteTable(options["routes"], options["infer_routes"]),
            key=key,
            options=options,
        )

    def spec(self) -> dict[str, Any]:
        """What the events carry to the capture process (JSON-able; small)."""
        return {"key": self.key, **self.options}


DEFAULT_POLICY = Policy()
_POLICIES: dict[str, Policy] = {}  # proxy name -> policy, for events that carry none
_FROM_SPEC: dict[str, Policy] = {}  # spec key -> policy (the capture process's side)
_LOCK = threading.Lock()
_HMAC_KEY = os.urandom(32)


def register(proxy: str, policy: Policy) -> None:
    with _LOCK:
        _POLICIES[proxy] = policy


def policy_for(proxy: str) -> Policy:
    return _POLICIES.get(proxy, DEFAULT_POLICY)


def resolve(spec: dict[str, Any] | None, proxy: str | None) -> Policy:
    """The policy an event carries (built once per distinct spec), else the one
    registered for its proxy in this process, else the defaults."""
    if spec:
        key = str(spec.get("key", ""))
        p = _FROM_SPEC.get(key)
        if p is None:
            opts = {k: v for k, v in spec.items() if k != "key"}
            p = Policy.build(**opts)
            with _LOCK:
                _FROM_SPEC[key] = p
        return p
    return policy_for(proxy) if proxy else DEFAULT_POLICY


def redact_value(value: str, style: str) -> str:
    if style == "hmac":
        digest = hmac.new(_HMAC_KEY, value.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return f"{REDACTED[:-1]} hmac:{digest.hexdigest()[:12]}]"
    return REDACTED


def redact_query(query: str, names: frozenset[str], style: str) -> str:
    """Replace the values of secret parameters; everything else stays as sent."""
    if not query:
        return query
    parts = query.split("&")
    changed = False
    for i, part in enumerate(parts):
        name, eq, value = part.partition("=")
        if eq and value and unquote_plus(name).strip().lower() in names:
            parts[i] = f"{name}={redact_value(value, style)}"
            changed = True
    return "&".join(parts) if changed else query


def _text(head: bytes | str) -> str:
    return head if isinstance(head, str) else head.decode("latin-1")


def parse_head(head: bytes | str) -> tuple[str, list[tuple[str, str]]]:
    """(start line, [(lowercase name, value)]) of a raw HTTP/1 head (no final CRLF
    CRLF), given as bytes or as its latin-1 text."""
    lines = _text(head).split("\r\n")
    out: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            out.append((name.strip().lower(), value.strip()))
    return lines[0], out


def _record(
    headers: list[tuple[str, str]],
    keep: frozenset[str] | None,
    ids: tuple[str, ...],
    secrets: frozenset[str],
    style: str,
) -> tuple[dict[str, str], dict[str, str]]:
    recorded: dict[str, str] = {}
    found_ids: dict[str, str] = {}
    for name, value in headers:
        if name in secrets:
            value = redact_value(value, style)
        elif name in ids:
            found_ids[name] = f"{found_ids[name]}, {value}" if name in found_ids else value
        elif keep is not None and name not in keep:
            continue
        recorded[name] = f"{recorded[name]}, {value}" if name in recorded else value
    return recorded, found_ids


def _first_forwarded(headers: dict[str, str]) -> str | None:
    xff = headers.get("x-forwarded-for")
    if xff:
        first = xff.split(",")[0].strip()
        return first or None
    fwd = headers.get("forwarded")
    if fwd:
        for part in fwd.split(",")[0].split(";"):
            k, _, v = part.strip().partition("=")
            if k.lower() == "for" and v:
                v = v.strip('"')
                if v.startswith("["):
                    return v[1:].partition("]")[0]
                return v.rsplit(":", 1)[0] if v.count(":") == 1 else v
    return None


def split_target(target: str) -> tuple[str, str | None, str | None]:
    """(path, query or None, authority from an absolute-form target or None)."""
    authority = None
    if not target.startswith("/") and "://" in target[:16]:
        rest = target.split("://", 1)[1]
        authority, slash, rest = rest.partition("/")
        target = slash + rest if slash else "/"
    path, q, query = target.partition("?")
    path = path.partition("#")[0]
    return path, (query.partition("#")[0] if q else None), authority


_CACHE_MAX = 4096
# (policy key, raw head) -> derived fields: workloads repeat heads (polling, health
# checks, benchmarks), and parsing is the main per-exchange cost of prepare()
_REQ_CACHE: dict[tuple[str, str], tuple[Any, ...]] = {}
_RESP_CACHE: dict[tuple[str, str], tuple[Any, ...]] = {}


def _shared(
    headers: list[tuple[str, str]], found: dict[str, str], url: str | None
) -> dict[str, str] | None:
    ids: dict[str, str] = {}
    shared_ids.from_headers(headers, ids)  # the [correlate] id headers
    for k, v in found.items():  # this proxy's request_id_headers
        ids[f"header.{k}"] = v
    if url:
        shared_ids.from_text(url, ids, "url")
    return ids or None


def _request_fields(p: Policy, head: str) -> tuple[Any, ...]:
    """events.REQUEST_FIELDS, in order, from a request head."""
    start, headers = parse_head(head)
    parts = start.split(" ")
    target = parts[1] if len(parts) >= 2 else ""
    path, query, authority = split_target(target)
    rquery = redact_query(query, p.redact_query, p.style) if query is not None else None
    rec, found = _record(headers, p.record_request, p.request_id_headers, p.redact_headers, p.style)
    host = rec.get("host") or authority
    fwd = _first_forwarded(rec) if ("x-forwarded-for" in rec or "forwarded" in rec) else None
    route, source = p.routes.route(path) if path else (None, None)
    url = f"{path}?{rquery}" if rquery else path
    secret_free = [(k, v) for k, v in headers if k not in p.redact_headers]
    return (
        path,
        rquery,
        rec,
        found or None,
        host,
        rec.get("user-agent"),
        fwd,
        route,
        source,
        _shared(secret_free, found, url),
    )


def _response_fields(p: Policy, head: str) -> tuple[Any, ...]:
    """events.RESPONSE_FIELDS, in order, from a response head."""
    _, headers = parse_head(head)
    rec, found = _record(
        headers, p.record_response, p.request_id_headers, p.redact_headers, p.style
    )
    secret_free = [(k, v) for k, v in headers if k not in p.redact_headers]
    return rec, found or None, _shared(secret_free, found, None)


def _cached(
    cache: dict[tuple[str, str], tuple[Any, ...]], fn: Any, p: Policy, head: bytes | str
) -> tuple[Any, ...]:
    text = _text(head)
    key = (p.key, text)
    hit = cache.get(key)
    if hit is None:
        hit = fn(p, text)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = hit
    return hit


def head_fields(
    p: Policy, proxy: str, req_head: bytes | str | None, resp_head: bytes | str | None
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(events.REQUEST_FIELDS, events.RESPONSE_FIELDS) values from raw heads. Never
    raises: a head that cannot be parsed contributes nothing. Cached results are
    shared between events (dicts included): events are read-only once prepared."""
    req: tuple[Any, ...] = NO_REQUEST
    resp: tuple[Any, ...] = NO_RESPONSE
    try:
        if req_head is not None:
            req = _cached(_REQ_CACHE, _request_fields, p, req_head)
        if resp_head is not None:
            resp = _cached(_RESP_CACHE, _response_fields, p, resp_head)
    except Exception:
        log.exception("%s: could not derive fields from an exchange's heads", proxy)
    return req, resp


def prepare_exchange(ev: HttpExchange) -> None:
    """Fill the derived fields of ``ev`` from its raw heads, then drop the heads
    (always, even when they cannot be parsed) and the policy it carried."""
    try:
        p = resolve(ev.policy, ev.proxy)
        req, resp = head_fields(p, ev.proxy, ev.req_head, ev.resp_head)
        (
            ev.path,
            ev.query,
            ev.request_headers,
            ev.request_ids,
            ev.host,
            ev.user_agent,
            ev.forwarded_for,
            ev.route,
            ev.route_source,
            ev.shared_ids,
        ) = req
        ev.response_headers, ev.response_ids, ev.response_shared_ids = resp
    finally:
        ev.req_head = None
        ev.resp_head = None
        ev.policy = None


def prepare_request(ev: HttpRequest) -> None:
    """The early notice of a slow request: path, route and shared ids only."""
    try:
        if ev.req_head is not None:
            req, _ = head_fields(resolve(ev.policy, ev.proxy), ev.proxy, ev.req_head, None)
            ev.path, ev.route, ev.shared_ids = req[0], req[7], req[9]
    finally:
        ev.req_head = None
        ev.policy = None
