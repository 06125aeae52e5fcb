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

import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from correlate import shared_ids
from correlate.model import Link, Span, SpanEvent
from exporters import semconv as sc
from exporters.semconv import (
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    SNIFF_CORRELATION_CONFIDENCE,
    SNIFF_CORRELATION_METHOD,
    SNIFF_INJECTED,
)
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
_GET_OK = AmqpGetOk.kind
# the fields each handler reads, in its order
_PUBLISH_FIELDS = (
    "ts",
    "conn",
    "channel",
    "exchange",
    "routing_key",
    "mandatory",
    "properties",
    "body_size",
    "ts_end",
    "trace_id",
    "span_id",
    "parent_span_id",
    "traceparent",
    "injected",
    "inject_note",
    "confirm_seq",
    "tx",
    "rpc_reply_to",
    "body_ids",
)
_INCOMING_FIELDS = (
    "kind",
    "ts",
    "conn",
    "channel",
    "delivery_tag",
    "redelivered",
    "exchange",
    "routing_key",
    "queue",
    "no_ack",
    "properties",
    "body_size",
    "ts_end",
    "traceparent",
    "trace_id",
    "span_id",
    "body_ids",
)
_CONFIRM_FIELDS = ("ts", "conn", "channel", "delivery_tag", "multiple", "ack")
_SETTLE_FIELDS = ("ts", "conn", "channel", "delivery_tag", "multiple", "op", "requeue")


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
        # the handlers of the frequent kinds read the fields they need through a getter
        # (one C call, then locals): attrgetter for events, itemgetter for stored rows
        self._by_values: dict[type, tuple[tuple[str, ...], Callable[..., None]]] = {
            AmqpPublish: (_PUBLISH_FIELDS, self._publish),
            AmqpDeliver: (_INCOMING_FIELDS, self._incoming),
            AmqpGetOk: (_INCOMING_FIELDS, self._incoming),
            AmqpSettle: (_SETTLE_FIELDS, self._settle),
            AmqpConfirm: (_CONFIRM_FIELDS, self._confirm),
        }
        self._dispatch: dict[type, Any] = {
            cls: partial(fn, operator.attrgetter(*fields))
            for cls, (fields, fn) in self._by_values.items()
        }
        self._dispatch[AmqpReturn] = self._returned

    # --- dispatch ------------------------------------------------------------------------

    def handler_for(self, cls: type) -> Any:
        """The method for events of ``cls`` (the engine calls it directly)."""
        return self._dispatch.get(cls) or self.feed

    def row_handler_for(
        self, cls: type, names: list[str], ctor: Callable[..., Event]
    ) -> Callable[[list[Any]], None] | None:
        """The method for stored rows of ``cls`` laid out as ``names`` (see the engine's
        ``_feed_rows``): the same handler, reading the row's values."""
        spec = self._by_values.get(cls)
        if spec is None:
            return None
        fields, fn = spec
        return partial(fn, operator.itemgetter(*(_at(names, f) for f in fields)))

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

    def _common(
        self,
        info: ConnInfo | None,
        conn: int,
        routing_key: str,
        body_size: int,
        props: dict[str, Any],
        dest: str,
    ) -> dict[str, Any]:
        a = self._conn_attrs(info, conn).copy()
        a[sc.MESSAGING_DESTINATION_NAME] = dest
        a[sc.MESSAGING_RABBITMQ_ROUTING_KEY] = routing_key
        a[sc.MESSAGING_BODY_SIZE] = body_size
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

    def _publish(self, get: Callable[[Any], tuple[Any, ...]], src: Any) -> None:
        (
            ts,
            conn,
            channel,
            exchange,
            routing_key,
            mandatory,
            props,
            body_size,
            ts_end,
            trace_id,
            span_id,
            parent,
            traceparent,
            injected,
            inject_note,
            confirm_seq,
            tx,
            rpc_reply_to,
            body_ids,
        ) = get(src)
        e = self.e
        info, service, resource = e.client_of(conn)
        dest = destination(exchange, routing_key)
        attrs = self._common(info, conn, routing_key, body_size, props, dest)
        attrs[MESSAGING_OPERATION_TYPE] = "send"
        attrs[MESSAGING_OPERATION_NAME] = "publish"
        attrs[SNIFF_INJECTED] = injected
        if inject_note:
            attrs[sc.SNIFF_INJECT_NOTE] = inject_note
        if tx:
            attrs["sniff.amqp.tx"] = True
        method = "none"
        if rpc_reply_to:
            method = "paired"
        elif parent is not None:
            method = "propagated"
        else:
            corr = props.get("correlation_id")
            if exchange == "" and corr:
                req = self.rpc.pop((routing_key, corr), None)
                if req is not None:
                    parent = req[1]
                    e.alias(trace_id, req[0])
                    method = "paired"
        if parent is not None:
            attrs[SNIFF_CORRELATION_METHOD] = method
            attrs[SNIFF_CORRELATION_CONFIDENCE] = 1.0
        span = Span(  # all positional (keywords cost a third more)
            trace_id,
            span_id,
            parent,
            f"{dest} send",
            "PRODUCER",
            ts,
            ts_end,
            service,
            attrs,
            resource,
            "UNSET",
            "",
            [],
            [],
            conn,
        )
        # without confirms or mandatory routing nothing more will happen to the span
        final = confirm_seq is None and not mandatory
        # call(span, conn, ts, ids, decided, group, finished), positionally
        e.causal.call(span, conn, ts, shared_ids.values(body_ids), parent is not None, None, final)
        corr = props.get("correlation_id")
        if corr:
            if props.get("reply_to"):
                self.awaiting[(props["reply_to"], corr)] = ts
            if exchange == "":
                done = self.noack_reply.pop((routing_key, corr), None)
                if done is not None:
                    e.causal.unit_end(done, ts)
        if confirm_seq is not None:
            key = (conn, channel)
            pending = self.unconfirmed.get(key)
            if pending is None:
                pending = self.unconfirmed[key] = OrderedDict()
            pending[confirm_seq] = span
            if mandatory:
                self.returnable[_wire_span(traceparent, span_id)] = span
        elif mandatory:
            wire_span = _wire_span(traceparent, span_id)
            self.returnable[wire_span] = span
            self.mandatory_wait[wire_span] = ts_end + MANDATORY_GRACE_NS

    def _confirm(self, get: Callable[[Any], tuple[Any, ...]], src: Any) -> None:
        ts, conn, channel, delivery_tag, multiple, ack = get(src)
        pending = self.unconfirmed.get((conn, channel))
        if not pending:
            return
        if multiple:
            seqs: Iterable[int] = _take(pending, delivery_tag, multiple)
        elif delivery_tag in pending:
            seqs = (delivery_tag,)
        else:
            return
        finished = self.e.causal.finished  # what e.emit does, a call less
        for seq in seqs:
            span = pending.pop(seq)
            if ts > span.end:
                span.end = ts
            span.events.append(SpanEvent(ts, "confirmed" if ack else "nacked by broker", {}))
            if not ack:
                span.status = "ERROR"
                span.status_message = "the broker nacked the publish"
                span.attrs[sc.ERROR_TYPE] = "nack"
            if self.returnable:
                self._release_returnable(span)
            finished(span)

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

    def _incoming(self, get: Callable[[Any], tuple[Any, ...]], src: Any) -> None:
        (
            kind,
            ts,
            conn,
            channel,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
            queue,
            no_ack,
            props,
            body_size,
            ts_end,
            traceparent,
            trace_id,
            span_id,
            body_ids,
        ) = get(src)
        e = self.e
        info, service, resource = e.client_of(conn)
        dest = destination(exchange, routing_key)
        attrs = self._common(info, conn, routing_key, body_size, props, dest)
        is_get = kind == _GET_OK
        attrs[MESSAGING_OPERATION_TYPE] = "receive" if is_get else "process"
        attrs[sc.MESSAGING_OPERATION_NAME] = "get" if is_get else "deliver"
        attrs[sc.MESSAGING_RABBITMQ_DELIVERY_TAG] = delivery_tag
        if queue:
            attrs[sc.MESSAGING_DESTINATION_SUBSCRIPTION_NAME] = queue
        if redelivered:
            attrs["sniff.amqp.redelivered"] = True
        if no_ack:
            attrs["sniff.amqp.no_ack"] = True
        wire = parse_traceparent(traceparent)
        parent = None
        links = []
        if wire is not None:
            parent = wire[1]
            links.append(Link(wire[0], parent, {"messaging.operation.type": "send"}))
            attrs[SNIFF_CORRELATION_METHOD] = "propagated"
            attrs[SNIFF_CORRELATION_CONFIDENCE] = 1.0
        span = Span(  # all positional (keywords cost a third more)
            trace_id,
            span_id,
            parent,
            f"{dest} receive",
            "CONSUMER",
            ts,
            ts_end,
            service,
            attrs,
            resource,
            "UNSET",
            "",
            links,
            [],
            conn,
        )
        reply_to = props.get("reply_to")
        corr = props.get("correlation_id")
        if reply_to and corr:
            self.rpc[(reply_to, corr)] = (trace_id, span_id, ts)
        key = (conn, channel)
        if corr and self._is_response(routing_key, corr):
            attrs["sniff.amqp.rpc_response"] = True  # the caller's reply, not new work
        else:
            e.causal.unit_start(conn, "client", span, ts, shared_ids.values(body_ids))
            if no_ack:
                prev = self.noack_open.pop(key, None)
                if prev is not None:
                    e.causal.unit_end(prev, ts)
                self.noack_open[key] = span_id
                if reply_to and corr:
                    self.noack_reply[(reply_to, corr)] = span_id
        if no_ack:
            e.emit(span)
        else:
            unsettled = self.unsettled.get(key)
            if unsettled is None:
                unsettled = self.unsettled[key] = OrderedDict()
            unsettled[delivery_tag] = span

    def _is_response(self, routing_key: str, corr: str) -> bool:
        if self.awaiting.pop((routing_key, corr), None) is not None:
            return True
        if routing_key.startswith("amq.rabbitmq.reply-to."):  # direct reply-to
            return self.awaiting.pop(("amq.rabbitmq.reply-to", corr), None) is not None
        return False

    def _settle(self, get: Callable[[Any], tuple[Any, ...]], src: Any) -> None:
        ts, conn, channel, delivery_tag, multiple, op, requeue = get(src)
        pending = self.unsettled.get((conn, channel))
        if not pending:
            return
        if multiple:
            tags: Iterable[int] = _take(pending, delivery_tag, multiple)
        elif delivery_tag in pending:
            tags = (delivery_tag,)
        else:
            return
        causal = self.e.causal
        for tag in tags:
            span = pending.pop(tag)
            if ts > span.end:
                span.end = ts
            causal.unit_end(span.span_id, ts)
            attrs = span.attrs
            attrs["sniff.amqp.settlement"] = op
            if requeue is not None:
                attrs["sniff.amqp.requeue"] = requeue
            if op != "ack":
                span.status = "ERROR"
                span.status_message = f"{op}{' with requeue' if requeue else ''}"
                attrs[sc.ERROR_TYPE] = op
            causal.finished(span)  # what e.emit does, a call less

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


def _wire_span(traceparent: str | None, span_id: str) -> str:
    """The span id the message carries (the returnable table's key)."""
    wire = parse_traceparent(traceparent)
    return wire[1] if wire else span_id


def _at(names: list[str], field: str) -> int:
    """Where ``field`` is in a stored row laid out as ``names`` (``kind`` is row[0])."""
    return 0 if field == "kind" else names.index(field) + 1


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
