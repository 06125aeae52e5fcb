"""Shared identifiers: values that appear in a unit of work and in the calls it causes.

Extracted off the hot path (in events' ``prepare()``, on the capture writer's
thread) from:

- HTTP headers: ``X-Request-ID``, ``X-Openstack-Request-Id``,
  ``X-Compute-Request-Id``, ``X-Correlation-ID`` and configured names;
- AMQP messages: ``correlation_id``, headers with those names, and the JSON body,
  including oslo.messaging's envelope (``{"oslo.message": "<json>"}``):
  ``_context_request_id``, ``_context_global_request_id``, ``_msg_id``,
  ``_unique_id``, ``_reply_q`` and configured keys;
- any text (URL paths and queries, SQL statements, bodies): UUIDs (OpenStack's
  resource ids travel from URL to SQL to messages) and configured regexes.

Ids are plain values (the same request id is ``X-Openstack-Request-Id`` in HTTP
and ``_context_request_id`` in a message). A value prefixed ``~`` is *weak*: it
narrows a choice among candidates but never decides alone (``_reply_q`` names a
caller process's reply queue, shared by all its calls).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from typing import Any

import orjson

DEFAULT_HEADERS = (
    "x-request-id",
    "x-openstack-request-id",
    "x-compute-request-id",
    "x-correlation-id",
)
DEFAULT_JSON_KEYS = (
    "_context_request_id",
    "_context_global_request_id",
    "_msg_id",
    "_unique_id",
    "request_id",
    "global_request_id",
)
WEAK_JSON_KEYS = ("_reply_q",)
UUID_RE = re.compile(
    rb"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
)


def _names_rx(names: tuple[str, ...]) -> re.Pattern[bytes]:
    return re.compile(b"|".join(re.escape(n.encode()) for n in names), re.IGNORECASE)


class Settings:
    """What to extract; configured once per process from ``[correlate]``."""

    def __init__(self) -> None:
        self.headers: tuple[str, ...] = DEFAULT_HEADERS
        # one case-insensitive search for any of the names in a raw headers table,
        # to decide whether it is worth decoding
        self.headers_rx: re.Pattern[bytes] = _names_rx(DEFAULT_HEADERS)
        self.json_keys: tuple[str, ...] = DEFAULT_JSON_KEYS
        self.weak_json_keys: tuple[str, ...] = WEAK_JSON_KEYS
        self.regexes: tuple[re.Pattern[bytes], ...] = ()
        self.uuids = True


settings = Settings()

OPTIONS = {
    "id_headers": "extra header names whose values are shared ids (HTTP and AMQP headers)",
    "id_json_keys": "extra JSON keys (at any depth of a JSON body) whose values are shared ids",
    "id_regexes": "regexes applied to URLs, SQL text and bodies; group 1 (or the match) is an id",
    "uuid_ids": "treat UUIDs in URLs, SQL text and bodies as shared ids (default true)",
}


def configure(options: dict[str, Any]) -> None:
    """Apply ``[correlate]`` options; raises ValueError naming the key on bad input."""
    s = Settings()
    for key in ("id_headers", "id_json_keys", "id_regexes"):
        v = options.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"correlate.{key}: expected a list of strings, got {v!r}")
    s.headers = DEFAULT_HEADERS + tuple(h.lower() for h in options.get("id_headers", []))
    s.headers_rx = _names_rx(s.headers)
    s.json_keys = DEFAULT_JSON_KEYS + tuple(options.get("id_json_keys", []))
    regexes = []
    for r in options.get("id_regexes", []):
        try:
            regexes.append(re.compile(r.encode()))
        except re.error as e:
            raise ValueError(f"correlate.id_regexes: {r!r} is not a valid regex: {e}") from None
    s.regexes = tuple(regexes)
    uuids = options.get("uuid_ids", True)
    if not isinstance(uuids, bool):
        raise ValueError(f"correlate.uuid_ids: expected true or false, got {uuids!r}")
    s.uuids = uuids
    global settings
    settings = s


def from_text(text: bytes | str, out: dict[str, str], prefix: str = "text") -> None:
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    s = settings
    if s.uuids and b"-" in data:  # every UUID has dashes; most texts have none to scan for
        for i, m in enumerate(UUID_RE.finditer(data)):
            out[f"{prefix}.uuid{i}"] = m.group(0).decode().lower()
    for n, rx in enumerate(s.regexes):
        for i, m in enumerate(rx.finditer(data)):
            g = m.group(1) if m.groups() else m.group(0)
            if g:
                out[f"{prefix}.re{n}.{i}"] = g.decode("utf-8", "replace")


def from_headers(headers: Iterable[tuple[str, Any]], out: dict[str, str]) -> None:
    wanted = settings.headers
    for k, v in headers:
        lk = str(k).lower()
        if lk in wanted and v not in (None, ""):
            val = v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)
            out[f"header.{lk}"] = val
            from_text(val, out, f"header.{lk}")  # "req-<uuid>": the uuid alone matches SQL text too


def _walk(obj: Any, out: dict[str, str], depth: int = 0) -> None:
    if depth > 6:
        return
    s = settings
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "oslo.message" and isinstance(v, str):
                with contextlib.suppress(orjson.JSONDecodeError):
                    _walk(orjson.loads(v), out, depth + 1)
                continue
            if isinstance(v, str | int) and not isinstance(v, bool):
                if k in s.json_keys:
                    out[f"json.{k}"] = str(v)
                elif k in s.weak_json_keys:
                    out[f"json.{k}"] = "~" + str(v)
            elif isinstance(v, dict | list):
                _walk(v, out, depth + 1)
    elif isinstance(obj, list):
        for v in obj[:50]:
            _walk(v, out, depth + 1)


def from_body(body: bytes, out: dict[str, str]) -> None:
    """Ids in a (possibly truncated) body: JSON keys when it parses, text rules always."""
    if not body:
        return
    stripped = body.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            _walk(orjson.loads(stripped), out)
        except orjson.JSONDecodeError:
            for key in (
                settings.json_keys + settings.weak_json_keys
            ):  # truncated JSON: scan for keys
                for m in re.finditer(
                    rb'"' + re.escape(key.encode()) + rb'"\s*:\s*"([^"]{1,200})"', body
                ):
                    val = m.group(1).decode("utf-8", "replace")
                    out[f"json.{key}"] = ("~" + val) if key in settings.weak_json_keys else val
    from_text(body, out, "body")


_EMPTY: frozenset[str] = frozenset()


def values(ids: dict[str, str] | None) -> frozenset[str]:
    """The id values to match on (keys only say where each was found)."""
    return frozenset(ids.values()) if ids else _EMPTY
