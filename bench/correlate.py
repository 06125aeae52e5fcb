"""Offline correlation speed and memory: a capture of >= 1,000,000 events.

    .venv/bin/python bench/correlate.py [--events 1000000] [--keep FILE] [--runs 3]

Generates a realistic capture (an OpenStack-like mix: per API request an HTTP
exchange, SQL statements, an RPC call with its reply, a cast consumed by a
worker that queries and settles; several processes, concurrent requests),
writes it through the real capture writer, then correlates it in a child
process exactly as ``sniff export``/``sniff traces`` do (streaming from SQLite),
printing events/s and the child's RSS at every quarter of the run, so a flat
memory profile is visible. It does that ``--runs`` times (3), each in a fresh
process, and judges the median. The issue's bar: >= 100,000 events/s.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MS = 1_000_000


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def _oslo_body(ids: dict[str, str]) -> bytes:
    """The head of an oslo.messaging body carrying the request id, as nova sends it:
    the capture keeps the ids found in it (``prepare()``), not the body."""
    import json

    inner = {"_context_request_id": ids["json._context_request_id"], "method": "select"}
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(inner)}).encode()


def generate(path: str, n_events: int, seed: int = 1) -> int:
    from proxies.amqp.events import AmqpConfirm, AmqpDeliver, AmqpPublish, AmqpSettle
    from proxies.sql.events import MysqlQuery
    from sniff.events import ConnClose, ConnIdentity, ConnOpen
    from sniff.ids import format_traceparent, new_span_id, new_trace_id
    from sniff.store import CaptureWriter

    try:
        from proxies.http.events import HttpExchange as _Http  # noqa: F401

        have_http = True
    except ImportError:
        have_http = False
    rnd = random.Random(seed)
    w = CaptureWriter(path, max_queue=10_000_000, interval=0.2)
    t = time.time_ns() - 3600 * 10**9
    conn_ids = iter(range(1_000_000, 10_000_000))
    written = 0

    def emit(ev: Any) -> None:
        nonlocal written
        w.emit(ev)
        written += 1

    # components: api (4 processes), scheduler (2), worker (2); each with AMQP + SQL connections
    comps: dict[str, list[dict[str, int]]] = {}
    for name, procs in (("api", 4), ("scheduler", 2), ("worker", 2)):
        comps[name] = []
        for i in range(procs):
            pid = 10_000 + len(comps) * 100 + i
            amqp, sql = next(conn_ids), next(conn_ids)
            for conn, proto, proxy, port in (
                (amqp, "amqp", "rabbitmq", 5672),
                (sql, "mysql", "mysql", 3306),
            ):
                emit(
                    ConnOpen(
                        t,
                        conn,
                        proxy,
                        proto,
                        "127.0.0.1",
                        30000 + conn % 20000,
                        "127.0.0.1",
                        port,
                        "127.0.0.1",
                        port + 1,
                    )
                )
                emit(
                    ConnIdentity(
                        t + 5 * MS, conn, "proc", {"pid": str(pid), "name": name, "host": "bench"}
                    )
                )
            comps[name].append({"amqp": amqp, "sql": sql, "pid": pid, "tag": 0, "seq": 0})
    statements = [
        ("SELECT instances.uuid, instances.host FROM instances WHERE instances.uuid = ?", 1),
        ("UPDATE instances SET vm_state=?, updated_at=? WHERE instances.uuid = ?", 0),
        ("INSERT INTO instance_actions (action, instance_uuid, request_id) VALUES (?, ?, ?)", 0),
        (
            "SELECT compute_nodes.id, compute_nodes.free_ram_mb FROM compute_nodes WHERE deleted = ?",
            12,
        ),
    ]

    def sql(c: dict[str, int], ts: int, text: str, rows: int) -> int:
        emit(
            MysqlQuery(
                ts,
                c["sql"],
                "mariadb",
                "nova",
                "COM_QUERY",
                text,
                True,
                ts + 300_000,
                "ok",
                None,
                None,
                rows,
                0 if rows else 1,
                new_span_id(),
                operation=text.split()[0],
                tables=["instances"],
                summary=f"{text.split()[0]} instances",
                parsed=True,
            )
        )
        return ts + 400_000

    def publish(c: dict[str, int], ts: int, rk: str, ids: dict[str, str]) -> tuple[int, str, str]:
        trace, span = new_trace_id(), new_span_id()
        c["seq"] += 1
        emit(
            AmqpPublish(
                ts,
                c["amqp"],
                1,
                "nova",
                rk,
                False,
                {"correlation_id": ids.get("c", "")},
                None,
                900,
                ts + 50_000,
                trace,
                span,
                None,
                format_traceparent(trace, span),
                True,
                None,
                c["seq"],
                False,
                None,
                _oslo_body(ids),
                None,
            )
        )
        emit(AmqpConfirm(ts + 200_000, c["amqp"], 1, c["seq"], False, True))
        return ts + 250_000, trace, span

    def consume(
        c: dict[str, int], ts: int, rk: str, trace: str, span: str, ids: dict[str, str]
    ) -> int:
        c["tag"] += 1
        emit(
            AmqpDeliver(
                ts,
                c["amqp"],
                1,
                "ctag",
                c["tag"],
                False,
                "nova",
                rk,
                rk,
                False,
                {},
                None,
                900,
                ts + 50_000,
                format_traceparent(trace, span),
                trace,
                new_span_id(),
                _oslo_body(ids),
                None,
            )
        )
        return ts + 60_000

    def settle(c: dict[str, int], ts: int) -> None:
        emit(AmqpSettle(ts, c["amqp"], 1, c["tag"], False, "ack", None))

    req = 0
    while written < n_events:
        req += 1
        t += rnd.randint(2, 6) * MS  # ~4 concurrent requests in flight at ~250 req/s
        ts = t
        api = rnd.choice(comps["api"])
        rid = f"req-{req:08d}"
        for text, rows in statements[:3]:
            ts = sql(api, ts, text, rows)
        ts, trace, span = publish(api, ts, "scheduler", {"json._context_request_id": rid, "c": rid})
        sch = rnd.choice(comps["scheduler"])
        ts2 = consume(sch, ts + MS, "scheduler", trace, span, {"json._context_request_id": rid})
        ts2 = sql(sch, ts2, *statements[3])
        ts2, _, _ = publish(sch, ts2, "reply", {"json._context_request_id": rid, "c": rid})
        settle(sch, ts2)
        ts, trace, span = publish(api, ts2 + MS, "compute", {"json._context_request_id": rid})
        wk = rnd.choice(comps["worker"])
        ts3 = consume(wk, ts + MS, "compute", trace, span, {"json._context_request_id": rid})
        for text, rows in (statements[0], statements[1], statements[1]):
            ts3 = sql(wk, ts3, text, rows)
        settle(wk, ts3)
    for name in comps:
        for c in comps[name]:
            for conn in (c["amqp"], c["sql"]):
                emit(ConnClose(t + 10**9, conn, "client closed", "client", 0, 0))
    w.close()
    _ = have_http
    return written


def _correlate(path: str, out: Any) -> None:
    from correlate.offline import iter_spans
    from sniff.store import CaptureReader

    r = CaptureReader(path)
    total = r.count()
    marks = [total * q // 4 for q in (1, 2, 3)]
    rss: list[tuple[int, int]] = [(0, _rss())]
    seen = 0
    spans = 0
    methods: dict[str, int] = {}
    t0 = time.perf_counter()
    from correlate import NATIVE
    from correlate.engine import Correlator

    out_native = NATIVE
    corr = Correlator()
    for batch in iter_spans(r, batch=20_000, correlator=corr):
        spans += len(batch)
        for s in batch:
            m = s.attrs.get("sniff.correlation.method")
            if m:
                methods[m] = methods.get(m, 0) + 1
        seen = corr.stats["events"]
        while marks and seen >= marks[0]:
            rss.append((marks.pop(0), _rss()))
    dt = time.perf_counter() - t0
    rss.append((total, _rss()))
    out.put(
        {
            "events": total,
            "seconds": dt,
            "spans": spans,
            "rss": rss,
            "methods": methods,
            "native": out_native,
        }
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--keep", help="keep the generated capture at this path")
    ap.add_argument(
        "--runs",
        type=int,
        default=3,
        help="correlation passes over the capture (the median counts: this machine's "
        "speed drifts by 10-20%% from minute to minute)",
    )
    args = ap.parse_args()
    path = args.keep or os.path.join(tempfile.mkdtemp(prefix="sniff-bench-corr-"), "big.db")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        n = generate(path, args.events)
        print(f"generated {n:,} events in {time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    ctx = mp.get_context("spawn")
    rates: list[float] = []
    res: dict[str, Any] = {}
    for i in range(args.runs):
        # each pass in a fresh process, as `sniff export` runs: nothing warm but the files
        out: Any = ctx.Queue()
        p = ctx.Process(target=_correlate, args=(path, out))
        p.start()
        res = out.get()
        p.join()
        rate = res["events"] / res["seconds"]
        rates.append(rate)
        print(
            f"pass {i + 1}: correlated {res['events']:,} events into {res['spans']:,} spans in "
            f"{res['seconds']:.1f} s: {rate:,.0f} events/s; RSS "
            + ", ".join(
                f"{ev / max(1, res['events']):.0%} {rss / 2**20:.0f} MiB" for ev, rss in res["rss"]
            ),
            flush=True,
        )
    med = statistics.median(rates)
    print(
        f"correlated {res['events']:,} events: median {med:,.0f} events/s over {len(rates)} "
        f"passes (min {min(rates):,.0f}, max {max(rates):,.0f}; bar >= 100,000: "
        + ("met" if med >= 100_000 else "NOT met")
        + "); the correlator "
        + (
            "compiled with mypyc"
            if res["native"]
            else "as Python (not compiled, or SNIFF_PURE_PYTHON=1)"
        )
    )
    print("attachment methods:", ", ".join(f"{k} {v:,}" for k, v in sorted(res["methods"].items())))
    if not args.keep:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(path + suffix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
