"""Protocol plugins, imported lazily by name.

Each protocol package under ``proxies/`` exposes, in its ``__init__``:

- ``OPTIONS: dict[str, Option]``: its proxy options (validated by sniff.config);
- ``validate(cfg, key) -> None``: optional cross-option checks, raising ConfigError;
- ``create_listener(cfg, sink) -> Listener``: what ``sniff run`` starts for a
  ``[[proxy]]`` of this protocol (usually a :class:`sniff.relay.RelayListener`
  with the protocol's connection handler).

Lazy imports keep ``sniff stats`` fast and let a protocol's heavy dependencies
(mitmproxy for HTTP/2) load only when a proxy uses them.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sniff.config import Option, ProxyConfig

_MODULES = {
    "amqp": "proxies.amqp",
    "mysql": "proxies.mysql",
    "postgres": "proxies.postgres",
    "http": "proxies.http",
    "https": "proxies.http",
    "tcp": "proxies.tcp",
}


def module(protocol: str) -> ModuleType:
    return importlib.import_module(_MODULES[protocol])


def options(protocol: str) -> dict[str, Option]:
    opts: dict[str, Option] = getattr(module(protocol), "OPTIONS", {})
    return opts


def validate(cfg: ProxyConfig, key: str) -> None:
    fn: Any = getattr(module(cfg.protocol), "validate", None)
    if fn is not None:
        fn(cfg, key)
