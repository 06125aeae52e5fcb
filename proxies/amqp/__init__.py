"""AMQP 0-9-1 (RabbitMQ): decoding, traceparent tagging, PRODUCER/CONSUMER spans."""

from __future__ import annotations

from sniff.config import Option, ProxyConfig
from sniff.relay import EventSink, Listener, RelayListener

OPTIONS = {
    "body_scan_bytes": Option(
        int,
        4096,
        "bytes at the start of each message body kept for shared-id extraction "
        "(oslo.messaging _context_request_id, _msg_id...); 0 disables",
    ),
    "capture_body": Option(
        bool,
        False,
        "keep those first body bytes in the capture (default: only the ids found in them are kept)",
    ),
}


def validate(cfg: ProxyConfig, key: str) -> None:
    from sniff.config import ConfigError

    if cfg.options["body_scan_bytes"] < 0:
        raise ConfigError(
            f"{key}.body_scan_bytes: must be >= 0, got {cfg.options['body_scan_bytes']}"
        )


def create_listener(cfg: ProxyConfig, sink: EventSink) -> Listener:
    from proxies.amqp.decoder import AmqpShared
    from proxies.amqp.handler import AmqpHandler

    shared = AmqpShared()
    body_head = int(cfg.options["body_scan_bytes"])
    keep = bool(cfg.options["capture_body"])
    return RelayListener(cfg, sink, lambda ctx: AmqpHandler(ctx, shared, body_head, keep))
