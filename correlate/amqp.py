"""AMQP events -> PRODUCER and CONSUMER spans.

A publish is a PRODUCER span from its method frame to its last body frame, or
to the broker's confirm in confirm mode (a nack or a Basic.Return makes it an
error). A delivery (Basic.Deliver) or fetch (Basic.Get-Ok) is a CONSUMER span
from receipt to settlement (ack/nack/reject, ``multiple`` honoured, matched by
connection, channel and delivery tag); with no-ack it ends on receipt. A
consumer span is a child of the span named by the message's traceparent (the
one sniff injected at publish, or the application's) and also carries a span
link to it, as the OpenTelemetry messaging conventions ask, so it lands in the
producer's trace.

RPC: a reply published to the default exchange with the routing key and
correlation_id of a request's ``reply_to``/``correlation_id`` becomes a child of
that request's consumer span (decided live by the decoder when both went
through one proxy, or here offline), and its wire trace is aliased to the
request's trace so the caller's consumer span follows.

Names and kinds follow opentelemetry-instrumentation-aio-pika/pika
(``"<destination> send"`` PRODUCER, ``"<destination> receive"`` CONSUMER);
attributes follow the current messaging conventions (exporters.semconv).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from correlate import shared_ids
from correlate.model import Link, Span, SpanEvent
from exporters import semconv as sc
from proxies.amqp.events import (
    AmqpConfirm,
    AmqpDeliver,
    AmqpGetOk,
    AmqpMethod,
    AmqpPublish,
    AmqpReturn,
    AmqpSettle,
)
from sniff.events import Event
from sniff.ids import parse_traceparent

if TYPE_CHECKING:
    from correlate.engine import Correlator
    from correlate.identity import ConnInfo

MANDATORY_GRACE_NS = 2 * 10**9  # how long an unconfirmed mandatory publish waits for a Return
_CHANNEL_CLOSE = ("Channel.Close", "Channel.CloseOk")
_PROP_ATTRS = tuple(
    (k, f"messaging.rabbitmq.message.{k}") for k in ("reply_to", "type", "app_id", "content_type")
)


def destination(exchange: str, routing_key: str) -> str:
    ex = exchange or "amq.default"
    return f"{ex}:{routing_key}" if routing_key else ex


class AmqpSpans:
    def __init__(self, engine: Correlator) -> None:
        self.e = engine
        # (conn, channel) -> delivery tag -> consumer span awaiting settlement
        self.unsettled: dict[tuple[int, int], OrderedDict[int, Span]] = {}
        # (conn, channel) -> confirm seq -> producer span awaiting the broker's confirm
        self.unconfirmed: dict[tuple[int, int], OrderedDict[int, Span]] = {}
        # producer spans that may still be returned, by the span id the message carries
        self.returnable: dict[str, Span] = {}
        self.mandatory_wait: OrderedDict[str, int] = OrderedDict()  # wire span id -> deadline
        # (reply_to, correlation_id) -> (trace id, consumer span id, ts) for offline RPC pairing
        self.rpc: OrderedDict[tuple[str, str], tuple[str, str, int]] = OrderedDict()
        # calls awaiting a reply, (reply_to, correlation_id) -> ts: their replies are
        # responses to the caller, not new units of work for it
        self.awaiting: OrderedDict[tuple[str, str], int] = OrderedDict()
        # no-ack deliveries are in flight until the consumer's reply or its next
        # delivery on that channel: (conn, channel) -> span id; (reply_to, corr) -> span id
        self.noack_open: dict[tuple[int, int], str] = {}
        self.noack_reply: dict[tuple[str, str], str] = {}
        self._base: dict[tuple[int, bool], dict[str, Any]] = {}
        self._dispatch: dict[type, Any] = {
            AmqpPublish: self._publish,
            AmqpDeliver: self._incoming,
            AmqpGetOk: self._incoming,
            AmqpSettle: self._settle,
            AmqpConfirm: self._confirm,
            AmqpReturn: self._returned,
        }

    # --- dispatch ------------------------------------------------------------------------

    def handler_for(self, cls: type) -> Any:
        """The method for events of ``cls`` (the engine calls it directly)."""
        return self._dispatch.get(cls) or self.feed

    def feed(self, ev: Event) -> None:
        fn = self._dispatch.get(ev.__class__)
        if fn is not None:
            fn(ev)
        elif isinstance(ev, AmqpMethod) and ev.method in _CHANNEL_CLOSE:
            code = ev.args.get("reply_code")
            text = ev.args.get("reply_text")
            why = f"channel closed ({code} {text})" if code and code != 200 else "channel closed"
            self._end_pending(lambda k: k == (ev.conn, ev.channel), ev.ts, why)

    # --- producers -----------------------------------------------------------------------

    def _conn_attrs(self, info: ConnInfo | None, conn: int) -> dict[str, Any]:
        """The connection's attributes, built once per connection (and identity change)."""
        key = (conn, info is not None and "amqp.client_properties" in info.identity)
        base = self._base.get(key)
        if base is not None:
            return base
        a: dict[str, Any] = {sc.MESSAGING_SYSTEM: "rabbitmq", sc.SNIFF_CONN: conn}
        if info is not None:
            a[sc.SERVER_ADDRESS] = info.server_addr
            a[sc.SERVER_PORT] = info.server_port
            a[sc.NETWORK_PEER_ADDRESS] = info.server_addr
            a[sc.NETWORK_PEER_PORT] = info.server_port
            a[sc.CLIENT_ADDRESS] = info.client_addr
            a[sc.CLIENT_PORT] = info.client_port
            a[sc.PEER_SERVICE] = info.proxy
            cp = info.identity.get("amqp.client_properties")
            if cp and cp.get("connection_name"):
                a[sc.MESSAGING_CLIENT_ID] = cp["connection_name"]
        if len(self._base) > 50_000:
            self._base.clear()
        self._base[key] = a
        return a

    def _common(self, info: ConnInfo | None, ev: Any) -> dict[str, Any]:
        a = self._conn_attrs(info, ev.conn).copy()
        a[sc.MESSAGING_DESTINATION_NAME] = destination(ev.exchange, ev.routing_key)
        a[sc.MESSAGING_RABBITMQ_ROUTING_KEY] = ev.routing_key
        a[sc.MESSAGING_BODY_SIZE] = ev.body_size
        props = ev.properties
        if props:
            if props.get("message_id"):
                a[sc.MESSAGING_MESSAGE_ID] = props["message_id"]
            if props.get("correlation_id"):
                a[sc.MESSAGING_CONVERSATION_ID] = props["correlation_id"]
            for k, name in _PROP_ATTRS:
                v = props.get(k)
                if v:
                    a[name] = v
        return a

    def _publish(self, ev: AmqpPublish) -> None:
        info = self.e.conn(ev.conn)
        service, resource = self.e.service(info)
        attrs = self._common(info, ev)
        attrs[sc.MESSAGING_OPERATION_TYPE] = "send"
        attrs[sc.MESSAGING_OPERATION_NAME] = "publish"
        attrs[sc.SNIFF_INJECTED] = ev.injected
        if ev.inject_note:
            attrs[sc.SNIFF_INJECT_NOTE] = ev.inject_note
        if ev.tx:
            attrs["sniff.amqp.tx"] = True
        parent = ev.parent_span_id
        method = "none"
        if ev.rpc_reply_to:
            method = "paired"
        elif parent is not None:
            method = "propagated"
        else:
            corr = ev.properties.get("correlation_id")
            if ev.exchange == "" and corr:
                req = self.rpc.pop((ev.routing_key, corr), None)
                if req is not None:
                    parent = req[1]
                    self.e.alias(ev.trace_id, req[0])
                    method = "paired"
        if parent is not None:
            attrs[sc.SNIFF_CORRELATION_METHOD] = method
            attrs[sc.SNIFF_CORRELATION_CONFIDENCE] = 1.0
        span = Span(
            ev.trace_id,
            ev.span_id,
            parent,
            f"{destination(ev.exchange, ev.routing_key)} send",
            "PRODUCER",
            ev.ts,
            ev.ts_end,
            service,
            attrs,
            resource,
            conn=ev.conn,
        )
        # without confirms or mandatory routing nothing more will happen to the span
        final = ev.confirm_seq is None and not ev.mandatory
        self.e.causal.call(
            span,
            ev.conn,
            ev.ts,
            shared_ids.values(ev.body_ids),
            decided=parent is not None,
            finished=final,
        )
        props = ev.properties
        corr = props.get("correlation_id")
        if corr:
            if props.get("reply_to"):
                self.awaiting[(props["reply_to"], corr)] = ev.ts
            if ev.exchange == "":
                done = self.noack_reply.pop((ev.routing_key, corr), None)
                if done is not None:
                    self.e.causal.unit_end(done, ev.ts)
        wire = parse_traceparent(ev.traceparent)
        wire_span = wire[1] if wire else ev.span_id
        if ev.confirm_seq is not None:
            key = (ev.conn, ev.channel)
            pending = self.unconfirmed.get(key)
            if pending is None:
                pending = self.unconfirmed[key] = OrderedDict()
            pending[ev.confirm_seq] = span
            if ev.mandatory:
                self.returnable[wire_span] = span
        elif ev.mandatory:
            self.returnable[wire_span] = span
            self.mandatory_wait[wire_span] = ev.ts_end + MANDATORY_GRACE_NS

    def _confirm(self, ev: AmqpConfirm) -> None:
        pending = self.unconfirmed.get((ev.conn, ev.channel))
        if not pending:
            return
        for seq in _take(pending, ev.delivery_tag, ev.multiple):
            span = pending.pop(seq)
            span.end = max(span.end, ev.ts)
            span.events.append(SpanEvent(ev.ts, "confirmed" if ev.ack else "nacked by broker"))
            if not ev.ack:
                span.status = "ERROR"
                span.status_message = "the broker nacked the publish"
                span.attrs[sc.ERROR_TYPE] = "nack"
            self._release_returnable(span)
            self.e.emit(span)

    def _returned(self, ev: AmqpReturn) -> None:
        wire = parse_traceparent(ev.traceparent)
        if wire is None:
            return
        span = self.returnable.get(wire[1])
        if span is None:
            return
        span.status = "ERROR"
        span.status_message = f"returned by the broker: {ev.reply_code} {ev.reply_text}"
        span.attrs[sc.ERROR_TYPE] = str(ev.reply_text or ev.reply_code)
        span.events.append(SpanEvent(ev.ts, "returned", {"reply_code": ev.reply_code}))
        if wire[1] in self.mandatory_wait:  # not in confirm mode: the return settles it
            del self.mandatory_wait[wire[1]]
            del self.returnable[wire[1]]
            span.end = max(span.end, ev.ts)
            self.e.emit(span)

    def _release_returnable(self, span: Span) -> None:
        if self.returnable:
            for k, v in list(self.returnable.items()):
                if v is span:
                    del self.returnable[k]
                    self.mandatory_wait.pop(k, None)
                    break

    # --- consumers -----------------------------------------------------------------------

    def _incoming(self, ev: AmqpDeliver | AmqpGetOk) -> None:
        info = self.e.conn(ev.conn)
        service, resource = self.e.service(info)
        attrs = self._common(info, ev)
        is_get = isinstance(ev, AmqpGetOk)
        attrs[sc.MESSAGING_OPERATION_TYPE] = "receive" if is_get else "process"
        attrs[sc.MESSAGING_OPERATION_NAME] = "get" if is_get else "deliver"
        attrs[sc.MESSAGING_RABBITMQ_DELIVERY_TAG] = ev.delivery_tag
        if ev.queue:
            attrs[sc.MESSAGING_DESTINATION_SUBSCRIPTION_NAME] = ev.queue
        if ev.redelivered:
            attrs["sniff.amqp.redelivered"] = True
        if ev.no_ack:
            attrs["sniff.amqp.no_ack"] = True
        wire = parse_traceparent(ev.traceparent)
        parent = None
        links = []
        if wire is not None:
            parent = wire[1]
            links.append(Link(wire[0], wire[1], {"messaging.operation.type": "send"}))
            attrs[sc.SNIFF_CORRELATION_METHOD] = "propagated"
            attrs[sc.SNIFF_CORRELATION_CONFIDENCE] = 1.0
        span = Span(
            ev.trace_id,
            ev.span_id,
            parent,
            f"{destination(ev.exchange, ev.routing_key)} receive",
            "CONSUMER",
            ev.ts,
            ev.ts_end,
            service,
            attrs,
            resource,
            links=links,
            conn=ev.conn,
        )
        reply_to = ev.properties.get("reply_to")
        corr = ev.properties.get("correlation_id")
        if reply_to and corr:
            self.rpc[(reply_to, corr)] = (ev.trace_id, ev.span_id, ev.ts)
        key = (ev.conn, ev.channel)
        if corr and self._is_response(ev.routing_key, corr):
            span.attrs["sniff.amqp.rpc_response"] = True  # the caller's reply, not new work
        else:
            self.e.causal.unit_start(ev.conn, "client", span, ev.ts, shared_ids.values(ev.body_ids))
            if ev.no_ack:
                prev = self.noack_open.pop(key, None)
                if prev is not None:
                    self.e.causal.unit_end(prev, ev.ts)
                self.noack_open[key] = ev.span_id
                if reply_to and corr:
                    self.noack_reply[(reply_to, corr)] = ev.span_id
        if ev.no_ack:
            self.e.emit(span)
        else:
            unsettled = self.unsettled.get(key)
            if unsettled is None:
                unsettled = self.unsettled[key] = OrderedDict()
            unsettled[ev.delivery_tag] = span

    def _is_response(self, routing_key: str, corr: str) -> bool:
        if self.awaiting.pop((routing_key, corr), None) is not None:
            return True
        if routing_key.startswith("amq.rabbitmq.reply-to."):  # direct reply-to
            return self.awaiting.pop(("amq.rabbitmq.reply-to", corr), None) is not None
        return False

    def _settle(self, ev: AmqpSettle) -> None:
        pending = self.unsettled.get((ev.conn, ev.channel))
        if not pending:
            return
        for tag in _take(pending, ev.delivery_tag, ev.multiple):
            span = pending.pop(tag)
            span.end = max(span.end, ev.ts)
            self.e.causal.unit_end(span.span_id, ev.ts)
            span.attrs["sniff.amqp.settlement"] = ev.op
            if ev.requeue is not None:
                span.attrs["sniff.amqp.requeue"] = ev.requeue
            if ev.op != "ack":
                span.status = "ERROR"
                span.status_message = f"{ev.op}{' with requeue' if ev.requeue else ''}"
                span.attrs[sc.ERROR_TYPE] = ev.op
            self.e.emit(span)

    # --- endings -------------------------------------------------------------------------

    def _end_pending(self, match: Any, ts: int, why: str, incomplete: bool = False) -> None:
        for key in [k for k in self.noack_open if match(k)]:
            self.e.causal.unit_end(self.noack_open.pop(key), ts)
        for table, what in ((self.unsettled, "settled"), (self.unconfirmed, "confirmed")):
            for key in [k for k in table if match(k)]:
                for span in table.pop(key).values():
                    span.end = max(span.end, ts)
                    self.e.causal.unit_end(span.span_id, ts)
                    span.status = "ERROR"
                    span.status_message = f"{why} before the message was {what}"
                    if incomplete:
                        span.attrs[sc.SNIFF_INCOMPLETE] = True
                    self._release_returnable(span)
                    self.e.emit(span)

    def conn_closed(self, info: ConnInfo, ts: int, reason: str) -> None:
        self._end_pending(lambda k: k[0] == info.conn, ts, f"connection closed ({reason})")
        for wire_span, span in list(self.returnable.items()):
            if span.conn == info.conn:
                del self.returnable[wire_span]
                self.mandatory_wait.pop(wire_span, None)
                self.e.emit(span)

    def expire(self, now: int) -> None:
        while self.mandatory_wait:
            wire_span, deadline = next(iter(self.mandatory_wait.items()))
            if deadline > now:
                break
            del self.mandatory_wait[wire_span]
            span = self.returnable.pop(wire_span, None)
            if span is not None:
                self.e.emit(span)
        limit = now - self.e.ttl_ns
        for table in (self.unsettled, self.unconfirmed):
            for key in list(table):
                od = table[key]
                while od:
                    k, span = next(iter(od.items()))
                    if span.start >= limit:
                        break
                    del od[k]
                    span.attrs[sc.SNIFF_INCOMPLETE] = True
                    span.status_message = "no settlement seen within the correlator's TTL"
                    self.e.expired()
                    self.e.emit(span)
                if not od:
                    del table[key]
        while self.rpc:
            rpc_key, v = next(iter(self.rpc.items()))
            if v[2] >= limit:
                break
            del self.rpc[rpc_key]
        while self.awaiting:
            call_key, t = next(iter(self.awaiting.items()))
            if t >= limit:
                break
            del self.awaiting[call_key]
        if len(self.noack_reply) > 100_000:
            self.noack_reply.clear()

    def flush(self, now: int) -> None:
        self._end_pending(lambda k: True, now, "capture ended", incomplete=True)
        for span in self.returnable.values():
            self.e.emit(span)
        self.returnable.clear()
        self.mandatory_wait.clear()


def _take(pending: OrderedDict[int, Span], tag: int, multiple: bool) -> list[int]:
    """The tags a settlement or confirm covers: one, or all up to ``tag`` (0 = all)."""
    if not multiple:
        return [tag] if tag in pending else []
    if tag == 0:
        return list(pending)
    out = []
    for k in pending:
        if k > tag:
            break
        out.append(k)
    return out
