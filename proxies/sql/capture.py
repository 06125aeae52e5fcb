"""``decode = "capture"`` for the SQL proxies: when it applies, and per-proxy decoder state.

Strategy. A SQL proxy decodes in the capture process (see :mod:`sniff.decode_host`)
unless something must read or change statements on the event loop: terminating
TLS (the capture process would only see ciphertext) and ``sqlcommenter`` (each
statement is edited in flight). Those configurations, ``decode = "inline"`` and a
sink that cannot ship bytes keep the in-line handlers. The decision is one pure
function of the configuration, used on both sides, so a proxy that relays in-line
gets no capture-side decoders.

The capture-side decoders of one proxy share state the way the in-line ones do
(warn-once flags, PostgreSQL's backend pid -> connection map for CancelRequest):
one object per proxy, kept for as long as the host's :class:`ProxyConfig` lives.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sniff.config import ProxyConfig

T = TypeVar("T")

# id(cfg) -> (weak reference to cfg, {key: state}); ProxyConfig is an unhashable dataclass
_STATE: dict[int, tuple[weakref.ref[ProxyConfig], dict[str, Any]]] = {}


def capture_mode(cfg: ProxyConfig, sink: object | None = None) -> bool:
    """True when this proxy decodes in the capture process: ``decode = "capture"`` (the
    default), no TLS termination, no sqlcommenter (``inject = false`` turns it off), and,
    when a sink is given, one that ships bytes (``emit_raw``)."""
    o = cfg.options
    if o.get("decode", "capture") != "capture" or o.get("tls"):
        return False
    if o.get("sqlcommenter") and cfg.inject:
        return False
    return sink is None or getattr(sink, "emit_raw", None) is not None


def per_proxy(cfg: ProxyConfig, key: str, make: Callable[[], T]) -> T:
    """The ``key`` state object of this proxy (``make()`` on first use)."""
    entry = _STATE.get(id(cfg))
    if entry is None or entry[0]() is not cfg:
        for k in [k for k, (ref, _) in _STATE.items() if ref() is None]:
            del _STATE[k]
        entry = _STATE[id(cfg)] = (weakref.ref(cfg), {})
    states = entry[1]
    if key not in states:
        states[key] = make()
    return states[key]  # type: ignore[no-any-return]


class IdleDecoder:
    """The capture-side decoder of a proxy that decodes in-line: nothing is shipped to it."""

    def feed(self, direction: int, data: bytes, meta: object) -> None:
        return None

    def closed(self, reason: str) -> None:
        return None
