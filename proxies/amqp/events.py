"""Events the AMQP 0-9-1 decoder emits.

One event per *message* (method + content header + body frames, emitted when
the last body byte is seen), one per settlement or confirm, and one
:class:`AmqpMethod` for every other method so that nothing on the wire is
invisible. Credentials (Start-Ok response, Secure-Ok, Update-Secret) are never
put in an event.
"""

from __future__ import annotations

from typing import Any, ClassVar

from correlate import shared_ids
from proxies.amqp.rewrite import decode_headers
from sniff.events import Event, event


class _Ids:
    """Shared-id extraction for message events, run by the capture writer's thread
    (``prepare``): ids from properties, headers and the first body bytes go to
    ``body_ids``; the body bytes themselves are dropped unless ``keep_body``."""

    __slots__ = ()
    needs_prepare: ClassVar[bool] = True

    def prepare(self: Any) -> None:
        ids: dict[str, str] = {}
        props = self.properties
        if props.get("correlation_id"):
            ids["prop.correlation_id"] = str(props["correlation_id"])
        raw = self.headers_raw
        if raw and shared_ids.settings.headers_rx.search(raw) is not None:
            shared_ids.from_headers(decode_headers(raw).items(), ids)
        shared_ids.from_body(self.body_head, ids)
        self.body_ids = ids or None
        if not self.keep_body:
            self.body_head = b""


@event("amqp.publish")
class AmqpPublish(_Ids, Event):
    """A Basic.Publish from a client, with its content (a PRODUCER span)."""

    channel: int
    exchange: str
    routing_key: str
    mandatory: bool
    properties: dict[str, Any]  # basic properties except headers
    headers_raw: bytes | None  # the headers field table as the client sent it
    body_size: int
    ts_end: int  # when the last body frame was seen
    trace_id: str  # of sniff's PRODUCER span
    span_id: str
    parent_span_id: str | None  # the application's span when it sent a traceparent
    traceparent: str | None  # what the broker received (ours, or the application's)
    injected: bool
    inject_note: str | None  # why no traceparent was added, when it was not
    confirm_seq: int | None  # publisher-confirm sequence number (confirm mode only)
    tx: bool  # inside tx.select
    rpc_reply_to: str | None  # span id of the delivery this reply answers (live RPC pairing)
    body_head: bytes = b""  # first bytes of the body, for shared-id extraction
    body_ids: dict[str, str] | None = None
    keep_body: bool = False  # keep body_head in the capture (option capture_body)


@event("amqp.deliver")
class AmqpDeliver(_Ids, Event):
    """A message the broker pushed to a consumer (Basic.Deliver): a CONSUMER span."""

    channel: int
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    queue: str | None  # from the Basic.Consume this delivery belongs to
    no_ack: bool
    properties: dict[str, Any]
    headers_raw: bytes | None
    body_size: int
    ts_end: int
    traceparent: str | None  # as received (normally the one sniff injected at publish)
    trace_id: str  # of sniff's CONSUMER span: the traceparent's, or a new one
    span_id: str  # sniff's CONSUMER span
    body_head: bytes = b""
    body_ids: dict[str, str] | None = None
    keep_body: bool = False


@event("amqp.get")
class AmqpGetOk(_Ids, Event):
    """A message fetched with Basic.Get (Basic.Get-Ok): a CONSUMER span (receive)."""

    channel: int
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    queue: str | None
    no_ack: bool
    message_count: int
    properties: dict[str, Any]
    headers_raw: bytes | None
    body_size: int
    ts_end: int
    traceparent: str | None
    trace_id: str
    span_id: str
    body_head: bytes = b""
    body_ids: dict[str, str] | None = None
    keep_body: bool = False


@event("amqp.return")
class AmqpReturn(Event):
    """The broker returned an unroutable mandatory message (Basic.Return)."""

    channel: int
    reply_code: int
    reply_text: str
    exchange: str
    routing_key: str
    properties: dict[str, Any]
    body_size: int
    ts_end: int
    traceparent: str | None


@event("amqp.settle")
class AmqpSettle(Event):
    """A consumer settled deliveries: Basic.Ack / Nack / Reject from the client."""

    channel: int
    delivery_tag: int
    multiple: bool
    op: str  # ack | nack | reject
    requeue: bool | None


@event("amqp.confirm")
class AmqpConfirm(Event):
    """A publisher confirm: Basic.Ack / Nack from the broker in confirm mode."""

    channel: int
    delivery_tag: int
    multiple: bool
    ack: bool


@event("amqp.method")
class AmqpMethod(Event):
    """Any other method frame, decoded by pamqp (credentials removed)."""

    channel: int
    direction: str  # c2s | s2c
    method: str  # e.g. "Queue.Declare"
    args: dict[str, Any]
