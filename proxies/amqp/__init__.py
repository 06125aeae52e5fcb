"""AMQP 0-9-1 (RabbitMQ): decoding, traceparent tagging, PRODUCER/CONSUMER spans."""

from __future__ import annotations

from typing import Any

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
    from proxies.amqp.handler import AmqpCaptureHandler, AmqpHandler

    body_head = int(cfg.options["body_scan_bytes"])
    shared = AmqpShared()  # one proxy's connections: RPC requests awaiting replies
    if cfg.options.get("decode", "capture") == "capture" and hasattr(sink, "emit_raw"):
        return RelayListener(cfg, sink, lambda ctx: AmqpCaptureHandler(ctx, body_head, shared))
    keep = bool(cfg.options["capture_body"])
    return RelayListener(cfg, sink, lambda ctx: AmqpHandler(ctx, shared, body_head, keep))


def make_decoder(cfg: ProxyConfig, conn: int, emit: Any, emit_fields: Any, clock: Any) -> Any:
    """The capture-process decoder for one connection (see sniff.decode_host)."""
    from proxies.amqp.decoder import AmqpDecoder
    from proxies.amqp.handler import AmqpRawDecoder

    return AmqpRawDecoder(
        AmqpDecoder(
            conn, emit, inject=False, clock=clock, emit_fields=emit_fields,
            body_head=int(cfg.options["body_scan_bytes"]), keep_body=bool(cfg.options["capture_body"]),
        )
    )  # fmt: skip
