"""``sniff report``: what one logical operation costs, component by component.

The analysis the OpenStack path-tracing studies did by hand: traces are grouped
by the operation of their root span (``POST /v2.1/servers``, or a root message's
destination); for each operation, each component's work per trace is counted:
SQL statements by operation and table, HTTP requests received, AMQP messages
published and consumed (with sizes), and the read/write ratio; the root's
latency distribution is given. ``--diff`` compares two captures (two versions of
a system) operation by operation.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from correlate.model import Span
from exporters import semconv as sc

_WRITES = {"INSERT", "UPDATE", "DELETE", "REPLACE", "MERGE", "UPSERT", "COPY"}
_READS = {"SELECT", "SHOW", "DESCRIBE", "EXPLAIN", "WITH"}


@dataclass
class ComponentWork:
    sql: Counter[tuple[str, str]] = field(default_factory=Counter)  # (operation, table)
    http_in: Counter[str] = field(default_factory=Counter)  # route
    published: int = 0
    published_bytes: int = 0
    consumed: int = 0
    consumed_bytes: int = 0
    sql_errors: int = 0

    @property
    def reads(self) -> int:
        return sum(n for (op, _), n in self.sql.items() if op in _READS)

    @property
    def writes(self) -> int:
        return sum(n for (op, _), n in self.sql.items() if op in _WRITES)


@dataclass
class OperationReport:
    name: str
    traces: int = 0
    durations_ns: list[int] = field(default_factory=list)
    components: dict[str, ComponentWork] = field(default_factory=lambda: defaultdict(ComponentWork))
    errors: int = 0


def operation_of(root: Span) -> str:
    a = root.attrs
    method = a.get(sc.HTTP_REQUEST_METHOD)
    if method:
        return f"{method} {a.get(sc.HTTP_ROUTE) or a.get(sc.URL_PATH) or ''}".strip()
    if root.kind in ("CLIENT", "PRODUCER"):
        # a call that no unit of work caused: connection setup, periodic tasks, a client
        return f"(no cause) {root.service}: {root.name}"
    return root.name


def _root(spans: list[Span]) -> Span:
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_id or s.parent_id not in ids]
    return min(roots or spans, key=lambda s: s.start)


def build(spans: Iterable[Span]) -> dict[str, OperationReport]:
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)
    ops: dict[str, OperationReport] = {}
    for tspans in by_trace.values():
        root = _root(tspans)
        name = operation_of(root)
        rep = ops.get(name)
        if rep is None:
            rep = ops[name] = OperationReport(name)
        rep.traces += 1
        rep.durations_ns.append(max(s.end for s in tspans) - root.start)
        if any(s.status == "ERROR" for s in tspans):
            rep.errors += 1
        for s in tspans:
            work = rep.components[s.service]
            a = s.attrs
            if sc.DB_OPERATION_NAME in a or sc.DB_SYSTEM_NAME in a:
                op = str(a.get(sc.DB_OPERATION_NAME) or "?")
                table = str(a.get(sc.DB_COLLECTION_NAME) or "-")
                work.sql[(op, table)] += 1
                if s.status == "ERROR":
                    work.sql_errors += 1
            elif s.kind == "SERVER" and sc.HTTP_REQUEST_METHOD in a:
                route = a.get(sc.HTTP_ROUTE) or a.get(sc.URL_PATH) or "?"
                work.http_in[f"{a[sc.HTTP_REQUEST_METHOD]} {route}"] += 1
            elif s.kind == "PRODUCER":
                work.published += 1
                work.published_bytes += int(a.get(sc.MESSAGING_BODY_SIZE) or 0)
            elif s.kind == "CONSUMER":
                work.consumed += 1
                work.consumed_bytes += int(a.get(sc.MESSAGING_BODY_SIZE) or 0)
    return ops


def _pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e6 if s else 0.0


def render(
    ops: dict[str, OperationReport], console: Console, min_traces: int = 1, top: int = 10
) -> None:
    shown = sorted((r for r in ops.values() if r.traces >= min_traces), key=lambda r: -r.traces)[
        :top
    ]
    for rep in shown:
        n = rep.traces
        console.print(
            f"[bold]{rep.name}[/bold]: {n} traces, latency p50 {_pct(rep.durations_ns, 0.5):.1f} ms, "
            f"p95 {_pct(rep.durations_ns, 0.95):.1f} ms, p99 {_pct(rep.durations_ns, 0.99):.1f} ms"
            + (f", [red]{rep.errors} with errors[/red]" if rep.errors else "")
        )
        t = Table(title="per trace, by component", title_justify="left")
        for col in (
            "component",
            "HTTP received",
            "SQL statements",
            "reads:writes",
            "published",
            "consumed",
        ):
            t.add_column(
                col,
                justify="left"
                if col in ("component", "SQL statements", "HTTP received")
                else "right",
            )
        for comp, w in sorted(rep.components.items()):
            sql = ", ".join(f"{op} {table} {c / n:.1f}" for (op, table), c in sorted(w.sql.items()))
            http = ", ".join(f"{r} {c / n:.1f}" for r, c in sorted(w.http_in.items()))
            rw = f"{w.reads / n:.1f}:{w.writes / n:.1f}" if w.sql else ""
            pub = (
                f"{w.published / n:.1f} ({w.published_bytes / max(1, w.published):,.0f} B avg)"
                if w.published
                else ""
            )
            con = (
                f"{w.consumed / n:.1f} ({w.consumed_bytes / max(1, w.consumed):,.0f} B avg)"
                if w.consumed
                else ""
            )
            t.add_row(comp, http, sql, rw, pub, con)
        console.print(t)


def diff(a: dict[str, OperationReport], b: dict[str, OperationReport], console: Console) -> None:
    """Operation by operation: how each component's work per trace changed from A to B."""
    t = Table(title="changes per trace, A -> B", title_justify="left")
    for col in ("operation", "component", "what", "A", "B", "change"):
        t.add_column(col, justify="right" if col in ("A", "B", "change") else "left")
    for name in sorted(set(a) | set(b)):
        ra, rb = a.get(name), b.get(name)
        if ra is None or rb is None:
            t.add_row(
                name,
                "",
                "traces",
                str(ra.traces if ra else 0),
                str(rb.traces if rb else 0),
                "new" if ra is None else "gone",
            )
            continue
        pa, pb = _pct(ra.durations_ns, 0.5), _pct(rb.durations_ns, 0.5)
        if abs(pb - pa) > max(0.05 * pa, 0.1):
            t.add_row(name, "", "latency p50 ms", f"{pa:.1f}", f"{pb:.1f}", f"{pb - pa:+.1f}")
        for comp in sorted(set(ra.components) | set(rb.components)):
            wa, wb = (
                ra.components.get(comp, ComponentWork()),
                rb.components.get(comp, ComponentWork()),
            )
            rows: list[tuple[str, float, float]] = []
            for key in sorted(set(wa.sql) | set(wb.sql)):
                rows.append(
                    (
                        f"{key[0]} {key[1]}",
                        wa.sql.get(key, 0) / ra.traces,
                        wb.sql.get(key, 0) / rb.traces,
                    )
                )
            for key2 in sorted(set(wa.http_in) | set(wb.http_in)):
                rows.append(
                    (
                        f"HTTP {key2}",
                        wa.http_in.get(key2, 0) / ra.traces,
                        wb.http_in.get(key2, 0) / rb.traces,
                    )
                )
            rows.append(("published", wa.published / ra.traces, wb.published / rb.traces))
            rows.append(("consumed", wa.consumed / ra.traces, wb.consumed / rb.traces))
            for what, va, vb in rows:
                if abs(va - vb) >= 0.05:
                    t.add_row(name, comp, what, f"{va:.1f}", f"{vb:.1f}", f"{vb - va:+.1f}")
    console.print(t)


def as_dict(ops: dict[str, OperationReport]) -> dict[str, Any]:
    return {
        name: {
            "traces": r.traces,
            "latency_ms": {
                "p50": _pct(r.durations_ns, 0.5),
                "p95": _pct(r.durations_ns, 0.95),
                "p99": _pct(r.durations_ns, 0.99),
            },
            "errors": r.errors,
            "components": {
                comp: {
                    "sql": {f"{op} {table}": c / r.traces for (op, table), c in w.sql.items()},
                    "http_received": {k: c / r.traces for k, c in w.http_in.items()},
                    "published": w.published / r.traces,
                    "consumed": w.consumed / r.traces,
                    "reads": w.reads / r.traces,
                    "writes": w.writes / r.traces,
                }
                for comp, w in r.components.items()
            },
        }
        for name, r in ops.items()
    }
