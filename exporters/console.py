"""Traces as trees in the terminal (``sniff traces``), with rich.

A trace is shown when any of its spans matches the filters; each line gives the
component (service.name), the span name, its duration, its kind and the few
attributes that answer "what was this": destination and size for messages,
operation, table and rows for statements, method, route and status for HTTP.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from correlate.model import Span
from exporters import semconv as sc

_KIND_STYLE = {
    "SERVER": "bold green",
    "CLIENT": "cyan",
    "PRODUCER": "magenta",
    "CONSUMER": "yellow",
    "INTERNAL": "white",
}


def fmt_duration(ns: int) -> str:
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.3f} s"


def _details(s: Span) -> str:
    a = s.attrs
    bits: list[str] = []
    if sc.MESSAGING_SYSTEM in a:
        if a.get(sc.MESSAGING_DESTINATION_SUBSCRIPTION_NAME):
            bits.append(f"queue={a[sc.MESSAGING_DESTINATION_SUBSCRIPTION_NAME]}")
        bits.append(f"{a.get(sc.MESSAGING_BODY_SIZE, 0)} B")
        if a.get(sc.MESSAGING_CONVERSATION_ID):
            bits.append(f"corr={a[sc.MESSAGING_CONVERSATION_ID]}")
        if a.get("sniff.amqp.settlement") and a["sniff.amqp.settlement"] != "ack":
            bits.append(str(a["sniff.amqp.settlement"]))
    if sc.DB_OPERATION_NAME in a:
        if a.get(sc.DB_COLLECTION_NAME):
            bits.append(f"table={a[sc.DB_COLLECTION_NAME]}")
        if a.get(sc.DB_RESPONSE_RETURNED_ROWS) is not None:
            bits.append(f"rows={a[sc.DB_RESPONSE_RETURNED_ROWS]}")
    if sc.HTTP_REQUEST_METHOD in a and a.get(sc.HTTP_RESPONSE_STATUS_CODE) is not None:
        bits.append(f"status={a[sc.HTTP_RESPONSE_STATUS_CODE]}")
    method = a.get(sc.SNIFF_CORRELATION_METHOD)
    if method and method not in ("propagated", "paired", "none"):
        conf = a.get(sc.SNIFF_CORRELATION_CONFIDENCE)
        bits.append(f"via {method}" + (f" ({conf:.2f})" if isinstance(conf, float) else ""))
    if s.links and s.parent_id is None:
        bits.append(f"{len(s.links)} link(s)")
    if s.status == "ERROR":
        bits.append(f"[red]ERROR {escape(s.status_message)}[/red]")
    return "  ".join(bits)


def _label(s: Span) -> str:
    style = _KIND_STYLE.get(s.kind, "white")
    return (
        f"[bold]{escape(s.service)}[/bold]  [{style}]{escape(s.name)}[/{style}]  "
        f"{fmt_duration(s.duration_ns)}  [dim]{s.kind.lower()}[/dim]  {_details(s)}"
    )


def group_traces(spans: Iterable[Span]) -> dict[str, list[Span]]:
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)
    return by_trace


def build_tree(trace_id: str, spans: list[Span]) -> Tree:
    spans = sorted(spans, key=lambda x: (x.start, x.end))
    ids = {s.span_id for s in spans}
    children: dict[str, list[Span]] = defaultdict(list)
    roots = []
    for s in spans:
        if s.parent_id and s.parent_id in ids and s.parent_id != s.span_id:
            children[s.parent_id].append(s)
        else:
            roots.append(s)
    start = spans[0].start
    end = max(s.end for s in spans)
    services = sorted({s.service for s in spans})
    when = datetime.fromtimestamp(start / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]
    tree = Tree(
        f"[bold]trace {trace_id}[/bold]  {when} UTC  {fmt_duration(end - start)}  "
        f"{len(spans)} spans  [dim]{', '.join(services)}[/dim]"
    )

    def add(node: Tree, s: Span, depth: int) -> None:
        child = node.add(_label(s))
        if depth > 64:
            return
        for c in children.get(s.span_id, []):
            add(child, c, depth + 1)

    for r in roots:
        label_parent = tree
        if r.parent_id and r.parent_id not in ids:
            label_parent = tree.add(f"[dim](parent {r.parent_id} not captured)[/dim]")
        add(label_parent, r, 0)
    return tree


def matches(spans: list[Span], service: str | None, operation: str | None) -> bool:
    svc = service.lower() if service else None
    op = operation.lower() if operation else None
    for s in spans:
        if svc and svc not in s.service.lower():
            continue
        if (
            op
            and op not in s.name.lower()
            and op not in str(s.attrs.get(sc.DB_OPERATION_NAME, "")).lower()
        ):
            continue
        return True
    return False


def print_traces(
    spans: Iterable[Span],
    console: Console | None = None,
    service: str | None = None,
    operation: str | None = None,
    limit: int | None = None,
) -> int:
    console = console or Console()
    traces = group_traces(spans)
    ordered = sorted(traces.items(), key=lambda kv: min(s.start for s in kv[1]))
    shown = 0
    for trace_id, tspans in ordered:
        if not matches(tspans, service, operation):
            continue
        console.print(build_tree(trace_id, tspans))
        shown += 1
        if limit is not None and shown >= limit:
            break
    return shown
