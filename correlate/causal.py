"""Cross-component causality: which inbound unit of work caused each outbound call.

Vocabulary. A component's *units of work* are what it is asked to do: an HTTP
request it serves (a SERVER span whose server end is the component), an AMQP
delivery it consumes (a CONSUMER span). Its *calls* are what it asks of others:
SQL statements, AMQP publishes, HTTP requests to another proxied service (the
SERVER span at that service, whose client end is the component). Builders
report units (start, end) and calls as they see them; this stage gives each
call a parent unit, using in order:

1. propagated context: the call already carries a parent taken from a
   ``traceparent`` (an instrumented application, or sniff's own tag);
2. pairing: decided by the protocol builder (RPC replies, request/response);
3. shared identifiers: ids present in both the unit and the call (request ids,
   oslo.messaging ``_context_request_id``/``_msg_id``/``_unique_id``, configured
   headers, JSON keys or regexes), among the component's units in flight or
   recently ended;
4. timing, in the spirit of vPath: a call made while exactly one unit of its
   component is in flight belongs to that unit. With several in flight and no
   other evidence, nothing is guessed: the call gets span links to every
   candidate, ``sniff.correlation.confidence = 1/n``, and no parent.

A SQL transaction is decided as one: its statements' ids are pooled and the
candidate units must be in flight for every statement of it.

Ordering. Notifications are processed in timestamp order, ``lag_ns`` behind the
newest event, so that facts learnt a little later (the process behind a
connection, resolved off the proxy's event loop) are known when deciding.
Finished spans are held until every notification about them has been
processed, then released with the canonical trace id: when a call joins a unit,
its own trace id (the one on the wire, which its consumers and servers
inherited) is aliased to the unit's, so the whole downstream path moves into
the root's trace.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from correlate.model import Link, Span
from exporters import semconv as sc

DEFAULT_LAG_NS = 2 * 10**9
# span kinds whose trace id other spans may have inherited from the wire
_PROPAGATES = frozenset(("PRODUCER", "SERVER"))
DEFAULT_RECENT_NS = 60 * 10**9


class Unit:
    """A unit of work. A plain class, not a dataclass: compiled (setup.py), its
    constructor is then native (a dataclass's stays the generated Python)."""

    __slots__ = ("comp", "end", "ids", "native", "span_id", "start", "trace_id")

    def __init__(
        self,
        span_id: str,
        trace_id: str,
        comp: str,
        start: int,
        end: int | None = None,
        ids: set[str] | None = None,
        native: set[str] | None = None,
    ) -> None:
        self.span_id = span_id
        self.trace_id = trace_id
        self.comp = comp
        self.start = start
        self.end = end
        self.ids: set[str] = set() if ids is None else ids  # native and learnt
        self.native: set[str] = set() if native is None else native  # what it carried


class Call(NamedTuple):
    """An outbound call; queued as it is (its first three fields are those of every
    queued notification: one object per call, not a notification holding a call)."""

    ts: int
    seq: int  # the queue's tie-breaker
    kind: int  # _CALL
    span: Span
    conn: int
    ids: frozenset[str]
    decided: bool  # parent already known (propagated or paired): only register nothing
    group: Any = None
    finished: bool = False  # the builder is done with the span: release it once decided


# Call((ts, seq, ...)) without the Python-level __new__ of a NamedTuple (one per call)
_new_call: Callable[[tuple[Any, ...]], Call] = partial(tuple.__new__, Call)
_NO_IDS: frozenset[str] = frozenset()


class _Comp:
    """A component's units: open ones, recently ended ones (by end), and an id index."""

    __slots__ = ("ended", "ids", "open")

    def __init__(self) -> None:
        self.open: dict[str, Unit] = {}
        self.ended: dict[str, Unit] = {}  # in the order they ended
        self.ids: dict[str, set[str]] = {}


@dataclass(slots=True)
class _Group:
    calls: list[Call] = field(default_factory=list)
    comp: str | None = None
    candidates: set[str] | None = None


_UNIT, _END, _CALL, _GROUP_END, _UNIT_IDS = range(5)


class Causal:
    def __init__(
        self,
        component_of: Callable[[int, str], str | None],
        trace_of: Callable[[str], str],
        alias: Callable[[str, str], None],
        release: Callable[[Span], None],
        lag_ns: int = DEFAULT_LAG_NS,
        recent_ns: int = DEFAULT_RECENT_NS,
        ttl_ns: int = 10 * 60 * 10**9,
        timing_allowed: Callable[[int], bool] | None = None,
    ) -> None:
        # None: timing may attribute any call (no call is made to ask)
        self._timing_allowed = timing_allowed
        self._component_of = component_of  # (conn, "client"|"server") -> key
        self._trace = trace_of
        self._alias = alias
        self._release = release
        self.lag_ns = lag_ns
        self.recent_ns = recent_ns
        self.ttl_ns = ttl_ns
        # Notifications to process, in (ts, seq) order. Builders report nearly all of
        # them in time order: those go to a FIFO (append and popleft, O(1)); the few
        # reported late go to a heap. Processing takes whichever head comes first,
        # which is exactly the order one heap would give (measured: the heap alone
        # cost ~1 us per notification at capture rates).
        # (a queued notification is (ts, seq, kind, payload), or a Call: (ts, seq, _CALL, ...))
        self._fifo: deque[Any] = deque()
        self._fifo_last = -1  # ts of the FIFO's newest entry
        self._heap: list[Any] = []
        self._seq = itertools.count()
        self._pending: dict[str, int] = {}  # span id -> notifications not yet processed
        self._held: dict[str, Span] = {}  # finished spans waiting for their notifications
        # spans ready to go, released once event time is lag past the moment they were
        # finished (so that identities resolved a little later name them): in the order
        # they were finished, which is event-time order
        self._ready: deque[tuple[int, Span]] = deque()
        self.now = 0
        self.units: dict[str, Unit] = {}  # span id -> unit
        self._by_comp: dict[str, _Comp] = {}
        # (end ts, span id) of ended units, for forgetting them: appended in the order the
        # ends are processed, which is time order but for late reports (those go to the
        # heap); which of the two holds an entry does not matter, only that every entry
        # older than the window is dropped (dropping is order-independent)
        self._ended_fifo: deque[tuple[int, str]] = deque()
        self._ended_last = -1
        self._ended: list[tuple[int, str]] = []
        self._opened: list[tuple[int, str]] = []  # (start ts, span id) heap, for the TTL
        self._groups: dict[Any, _Group] = {}
        self.stats: dict[str, int] = {
            "propagated": 0,
            "paired": 0,
            "shared_id": 0,
            "timing": 0,
            "ambiguous": 0,
            "none": 0,
            "units_expired": 0,
        }

    # --- notifications (from builders, in any order within the lag) -------------------------
    # Each is queued as (ts, seq, kind, payload), a unit start as (ts, seq, _UNIT, conn, role,
    # span id, trace id, ids), a call as its Call: to the FIFO when in time order, else to
    # the heap (inlined in the frequent ones: a call per notification less). Queued for
    # lag_ns, they are out of the CPU's caches when processed: one object each, not two.

    def unit_start(
        self,
        conn: int,
        role: str,
        span: Span,
        ts: int,
        ids: set[str] | frozenset[str] | None = None,
    ) -> None:
        span_id = span.span_id
        pending = self._pending
        pending[span_id] = pending.get(span_id, 0) + 1
        # (flat: one object per notification)
        item = (ts, next(self._seq), _UNIT, conn, role, span_id, span.trace_id, set(ids or ()))
        if ts >= self._fifo_last:
            self._fifo_last = ts
            self._fifo.append(item)
        else:
            heapq.heappush(self._heap, item)

    def unit_ids(self, span_id: str, ts: int, ids: set[str] | frozenset[str]) -> None:
        """More ids learnt about a unit (e.g. a request id in the response headers)."""
        if ids:
            self._push(ts, _UNIT_IDS, (span_id, set(ids)), None)

    def unit_end(self, span_id: str, ts: int) -> None:
        item = (ts, next(self._seq), _END, span_id)
        if ts >= self._fifo_last:
            self._fifo_last = ts
            self._fifo.append(item)
        else:
            heapq.heappush(self._heap, item)

    def call(
        self,
        span: Span,
        conn: int,
        ts: int,
        ids: set[str] | frozenset[str] | None = None,
        decided: bool = False,
        group: Any = None,
        finished: bool = False,
    ) -> None:
        """An outbound call of ``conn``'s client. ``finished``: the builder will not
        touch the span again and the call is its only notification (a SQL statement,
        a publish without confirms), so it is released as soon as it is decided
        instead of going through :meth:`finished`."""
        if decided and group is None:
            # its parent is known (propagated or paired): processing it in time order
            # would only count it, so count it now and keep it out of the queue
            self._count_decided(span)
            if finished:
                self.finished(span)
            return
        if ids.__class__ is not frozenset:
            ids = frozenset(ids) if ids else _NO_IDS
        if not finished:
            # a finished call is its span's only notification: nothing to count as pending
            pending = self._pending
            pending[span.span_id] = pending.get(span.span_id, 0) + 1
        item = _new_call((ts, next(self._seq), _CALL, span, conn, ids, decided, group, finished))
        if ts >= self._fifo_last:
            self._fifo_last = ts
            self._fifo.append(item)
        else:
            heapq.heappush(self._heap, item)

    def group_end(self, group: Any, ts: int) -> None:
        self._push(ts, _GROUP_END, group, None)

    def finished(self, span: Span) -> None:
        """A builder finished ``span``: release it once its notifications are processed."""
        if self._pending.get(span.span_id):
            self._held[span.span_id] = span
        else:
            self._ready.append((self.now, span))

    def _push(self, ts: int, kind: int, payload: Any, span_id: str | None) -> None:
        if span_id is not None:
            self._pending[span_id] = self._pending.get(span_id, 0) + 1
        if ts >= self._fifo_last:
            self._fifo_last = ts
            self._fifo.append((ts, next(self._seq), kind, payload))
        else:
            heapq.heappush(self._heap, (ts, next(self._seq), kind, payload))

    def _pop(self) -> Any:
        fifo, heap = self._fifo, self._heap
        if fifo and (not heap or fifo[0] <= heap[0]):
            return fifo.popleft()
        return heapq.heappop(heap)

    # --- processing --------------------------------------------------------------------------

    def advance(self, now: int) -> None:
        if now > self.now:
            self.now = now
        limit = now - self.lag_ns
        fifo, heap, process = self._fifo, self._heap, self._process
        decide_one, release, done = self._decide_one, self._release, self._done
        while True:
            if fifo:
                if heap and heap[0] < fifo[0]:
                    if heap[0][0] > limit:
                        break
                    item = heapq.heappop(heap)
                else:
                    if fifo[0][0] > limit:
                        break
                    item = fifo.popleft()
            elif heap and heap[0][0] <= limit:
                item = heapq.heappop(heap)
            else:
                break
            if item[2] == _CALL and item.group is None:
                # the most frequent notification, as _process would take it (a call less;
                # a queued call without a group is never decided: see call())
                decide_one(item)
                if item.finished:
                    release(item.span)
                else:
                    done(item.span.span_id)
            else:
                process(item)
        ready = self._ready
        while ready and ready[0][0] <= limit:
            self._release(ready.popleft()[1])
        self._forget(limit)

    def drain(self) -> None:
        while self._fifo or self._heap:
            self._process(self._pop())
        for group in list(self._groups):
            self._decide_group(group)
        for span in list(self._held.values()):
            self._release(span)
        self._held.clear()
        self._pending.clear()
        while self._ready:
            self._release(self._ready.popleft()[1])

    def _done(self, span_id: str) -> None:
        n = self._pending.get(span_id, 0) - 1
        if n > 0:
            self._pending[span_id] = n
            return
        self._pending.pop(span_id, None)
        span = self._held.pop(span_id, None)
        if span is not None:
            # its notifications were processed lag_ns after they happened: it has waited
            self._release(span)

    def _process(self, item: Any) -> None:
        """One queued notification: a Call, or (ts, seq, kind, payload)."""
        kind = item[2]
        if kind == _CALL:  # the most frequent notification first
            call: Call = item
            if call.decided:
                self._count_decided(call.span)
                if call.finished:
                    self._release(call.span)
                else:
                    self._done(call.span.span_id)
            elif call.group is not None:
                g = self._groups.setdefault(call.group, _Group())
                g.calls.append(call)
                # what was in flight when this statement ran (notifications come in time order)
                comp = self._component_of(call.conn, "client")
                g.comp = comp
                flight = self._in_flight(comp, call.ts) if comp is not None else set()
                g.candidates = flight if g.candidates is None else g.candidates & flight
            else:
                self._decide_one(call)
                if call.finished:
                    self._release(call.span)
                else:
                    self._done(call.span.span_id)
            return
        if kind == _UNIT:
            ts, _, _, conn, role, span_id, trace_id, ids = item
            comp = self._component_of(conn, role)
            if comp is not None:
                u = Unit(span_id, trace_id, comp, ts, None, ids, set(ids))
                self.units[span_id] = u
                c = self._by_comp.get(comp)
                if c is None:
                    c = self._by_comp[comp] = _Comp()
                c.open[span_id] = u
                for i in ids:
                    c.ids.setdefault(i, set()).add(span_id)
                heapq.heappush(self._opened, (ts, span_id))
            self._done(span_id)
            return
        ts, payload = item[0], item[3]
        if kind == _END:
            ending = self.units.get(payload)
            if ending is not None and ending.end is None:
                ending.end = ts
                comp_units = self._by_comp[ending.comp]
                comp_units.open.pop(ending.span_id, None)
                comp_units.ended[ending.span_id] = ending
                if ts >= self._ended_last:
                    self._ended_last = ts
                    self._ended_fifo.append((ts, ending.span_id))
                else:
                    heapq.heappush(self._ended, (ts, ending.span_id))
        elif kind == _UNIT_IDS:
            known = self.units.get(payload[0])
            if known is not None:
                known.ids |= payload[1]
                known.native |= payload[1]
                index = self._by_comp[known.comp].ids
                for i in payload[1]:
                    index.setdefault(i, set()).add(known.span_id)
        elif kind == _GROUP_END:
            self._decide_group(payload)

    def _decide_group(self, group: Any) -> None:
        g = self._groups.pop(group, None)
        if g is None or not g.calls:
            return
        self._decide(g.calls, g.candidates)
        for c in g.calls:
            if c.finished:
                self._release(c.span)
            else:
                self._done(c.span.span_id)

    def _count_decided(self, span: Span) -> None:
        method = span.attrs.get(sc.SNIFF_CORRELATION_METHOD, "propagated")
        self.stats[method] = self.stats.get(method, 0) + 1

    # --- the decision ------------------------------------------------------------------------

    def _in_flight(self, comp: str, ts: int) -> set[str]:
        """Units of ``comp`` in flight at ``ts``. Notifications are processed in time
        order, so that is the open units (that started by ``ts``), plus, for a call
        reported late, units that ended at or after ``ts``."""
        c = self._by_comp.get(comp)
        out: set[str] = set()
        if c is None:
            return out
        if c.open:  # a unit or two: a loop costs less than a comprehension's frame
            for sid, u in c.open.items():
                if u.start <= ts:
                    out.add(sid)
        if not c.ended:
            return out
        for u in reversed(c.ended.values()):
            if u.end is not None and u.end < ts:
                break
            if u.start <= ts:
                out.add(u.span_id)
        return out

    def _id_matches(self, comp: str, ids: frozenset[str], ts: int) -> set[str]:
        c = self._by_comp.get(comp)
        if c is None or not ids:
            return set()
        oldest = ts - self.recent_ns
        out: set[str] = set()
        for i in ids:
            for sid in c.ids.get(i, ()):
                u = self.units.get(sid)
                if u is not None and u.start <= ts and (u.end is None or u.end >= oldest):
                    out.add(sid)
        return out

    def _decide(self, calls: list[Call], group_candidates: set[str] | None = None) -> None:
        first = calls[0]
        comp = self._component_of(first.conn, "client")
        own: set[str] | None
        if len(calls) == 1:  # the common case: one statement, one publish, one request
            ids: set[str] | frozenset[str] = first.ids
            own = None
        else:
            ids = set()
            for c in calls:
                ids |= c.ids
            own = {c.span.span_id for c in calls}
        if group_candidates is not None:
            candidates = set(group_candidates)
        else:
            candidates = self._in_flight(comp, first.ts) if comp is not None else set()
        # a call is never its own cause (an HTTP request a service makes to itself
        # through sniff is both its call and a unit of the same component)
        if own is None:
            candidates.discard(first.span.span_id)
        else:
            candidates -= own
        chosen: str | None = None
        method = "none"
        if comp is not None and ids:
            strong = frozenset(i for i in ids if not i.startswith("~"))
            matched = self._id_matches(comp, strong, first.ts)
            if own is None:
                matched.discard(first.span.span_id)
            else:
                matched -= own
            if len(matched) > 1:
                # an id the unit itself carried (its request, its message) is direct
                # evidence; one it learnt from an earlier call (a shared image uuid) is not
                native = {sid for sid in matched if not self.units[sid].native.isdisjoint(strong)}
                if native:
                    matched = native
            if len(matched) > 1:  # several units share the id: those in flight, then weak ids
                for narrower in (
                    candidates,
                    self._id_matches(comp, frozenset(set(ids) - strong), first.ts),
                ):
                    narrowed = matched & narrower
                    if narrowed:
                        matched = narrowed
            if len(matched) == 1:
                chosen, method = next(iter(matched)), "shared_id"
        if (
            chosen is None
            and len(candidates) == 1
            and (self._timing_allowed is None or self._timing_allowed(first.conn))
        ):
            chosen, method = next(iter(candidates)), "timing"
        if chosen is not None:
            unit = self.units[chosen]
            trace = self._trace(unit.trace_id)
            for c in calls:
                self._attach(c.span, unit.span_id, trace, method)
            self.stats[method] += len(calls)
            # what a unit's calls carried is now known to belong to it: an instance
            # uuid first seen in a request's INSERT ties its later UPDATE to it too
            if ids:
                self._learn(unit, {i for i in ids if not i.startswith("~")})
            return
        if candidates:
            n = len(candidates)
            for c in calls:
                span = c.span
                span.attrs[sc.SNIFF_CORRELATION_METHOD] = "timing"
                span.attrs[sc.SNIFF_CORRELATION_CONFIDENCE] = round(1.0 / n, 4)
                for sid in sorted(candidates):
                    u = self.units[sid]
                    span.links.append(
                        Link(u.trace_id, sid, {sc.SNIFF_CORRELATION_CONFIDENCE: round(1.0 / n, 4)})
                    )
            self.stats["ambiguous"] += len(calls)
            return
        for c in calls:
            c.span.attrs.setdefault(sc.SNIFF_CORRELATION_METHOD, "none")
            c.span.attrs.setdefault(sc.SNIFF_CORRELATION_CONFIDENCE, 0.0)
        self.stats["none"] += len(calls)

    def _decide_one(self, call: Call) -> None:
        """``_decide([call])`` (the common case: one statement, one publish, one request),
        computing the units in flight only when the decision needs them."""
        span = call.span
        own = span.span_id
        ts = call.ts
        ids = call.ids
        comp = self._component_of(call.conn, "client")
        candidates: set[str] | None = None
        chosen: str | None = None
        method = "none"
        strong = _NO_IDS
        if comp is not None and ids:
            strong = ids  # the ids without the weak ones ("~..."), usually all of them
            for i in ids:
                if i.startswith("~"):
                    strong = frozenset([i for i in ids if not i.startswith("~")])
                    break
            matched = self._id_matches(comp, strong, ts)
            matched.discard(own)
            if len(matched) > 1:
                # an id the unit itself carried (its request, its message) is direct
                # evidence; one it learnt from an earlier call (a shared image uuid) is not
                units = self.units
                native = {sid for sid in matched if not units[sid].native.isdisjoint(strong)}
                if native:
                    matched = native
            if len(matched) > 1:  # several units share the id: those in flight, then weak ids
                candidates = self._in_flight(comp, ts)
                candidates.discard(own)
                for narrower in (
                    candidates,
                    self._id_matches(comp, frozenset(set(ids) - strong), ts),
                ):
                    narrowed = matched & narrower
                    if narrowed:
                        matched = narrowed
            if len(matched) == 1:
                chosen, method = next(iter(matched)), "shared_id"
        if chosen is None:
            if candidates is None:
                candidates = self._in_flight(comp, ts) if comp is not None else set()
                candidates.discard(own)
            if len(candidates) == 1 and (
                self._timing_allowed is None or self._timing_allowed(call.conn)
            ):
                chosen, method = next(iter(candidates)), "timing"
        if chosen is not None:
            unit = self.units[chosen]
            trace = self._trace(unit.trace_id)
            self._attach(span, unit.span_id, trace, method)
            self.stats[method] += 1
            # what a unit's calls carried is now known to belong to it: an instance
            # uuid first seen in a request's INSERT ties its later UPDATE to it too
            if ids:
                self._learn(unit, strong)
            return
        attrs = span.attrs
        if candidates:
            n = len(candidates)
            attrs[sc.SNIFF_CORRELATION_METHOD] = "timing"
            attrs[sc.SNIFF_CORRELATION_CONFIDENCE] = round(1.0 / n, 4)
            units = self.units
            for sid in sorted(candidates):
                u = units[sid]
                span.links.append(
                    Link(u.trace_id, sid, {sc.SNIFF_CORRELATION_CONFIDENCE: round(1.0 / n, 4)})
                )
            self.stats["ambiguous"] += 1
            return
        attrs.setdefault(sc.SNIFF_CORRELATION_METHOD, "none")
        attrs.setdefault(sc.SNIFF_CORRELATION_CONFIDENCE, 0.0)
        self.stats["none"] += 1

    def _learn(self, unit: Unit, ids: set[str] | frozenset[str]) -> None:
        """What a unit's calls carried is now known to belong to it (strong ids only)."""
        learnt = ids - unit.ids
        if learnt:
            unit.ids |= learnt
            index = self._by_comp[unit.comp].ids
            for i in learnt:
                index.setdefault(i, set()).add(unit.span_id)

    def _attach(self, span: Span, parent: str, trace: str, method: str) -> None:
        if span.trace_id != trace:
            if span.kind in _PROPAGATES:
                # others inherited this span's wire trace (its consumers, its server's
                # calls): they follow it into the unit's trace
                self._alias(span.trace_id, trace)
            span.trace_id = trace
        span.parent_id = parent
        span.attrs[sc.SNIFF_CORRELATION_METHOD] = method
        span.attrs[sc.SNIFF_CORRELATION_CONFIDENCE] = 1.0

    # --- bounded memory ----------------------------------------------------------------------

    def _forget(self, limit: int) -> None:
        forget_before = limit - self.recent_ns
        fifo = self._ended_fifo
        while fifo and fifo[0][0] < forget_before:
            self._drop(fifo.popleft()[1])
        ended = self._ended
        while ended and ended[0][0] < forget_before:
            _, sid = heapq.heappop(ended)
            self._drop(sid)
        opened = self._opened
        stale = limit - self.ttl_ns
        while opened and opened[0][0] < stale:
            _, sid = heapq.heappop(opened)
            u = self.units.get(sid)
            if u is not None and u.end is None:  # never ended: a lost settlement or response
                self._drop(sid)
                self.stats["units_expired"] += 1

    def _drop(self, sid: str) -> None:
        u = self.units.pop(sid, None)
        if u is None:
            return
        c = self._by_comp.get(u.comp)
        if c is None:
            return
        c.open.pop(sid, None)
        c.ended.pop(sid, None)
        for i in u.ids:
            bucket = c.ids.get(i)
            if bucket is not None:
                bucket.discard(sid)
                if not bucket:
                    del c.ids[i]
        if not c.open and not c.ended:
            del self._by_comp[u.comp]
