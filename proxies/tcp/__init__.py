"""``protocol = "tcp"``: a plain relay that records connections (who talked to
whom, when, how many bytes) without decoding. Useful for protocols sniff does
not decode yet, and as the relay's own test subject."""

from __future__ import annotations

from sniff.config import Option, ProxyConfig
from sniff.relay import EventSink, Handler, Listener, RelayListener

OPTIONS: dict[str, Option] = {}


def create_listener(cfg: ProxyConfig, sink: EventSink) -> Listener:
    return RelayListener(cfg, sink, Handler)
