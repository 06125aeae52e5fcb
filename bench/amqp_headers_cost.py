"""What a headers table costs RabbitMQ, without sniff: the broker's CPU per published message
when 4 pika processes publish through the plain relay (bench/plain_relay.py) bare messages,
messages with a content type only, and messages whose client itself adds the `traceparent`
header sniff would add. Rounds interleave the three kinds.

    .venv/bin/python bench/amqp_headers_cost.py [--rounds 3] [--per-proc 20000]

It shows where bench/amqp.py's publish gap comes from: the broker, not sniff's relay.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.amqp import _broker_pids, _declare, _delete  # noqa: E402
from bench.capture_check import cpu_seconds, settle  # noqa: E402
from bench.plain_relay import start_plain_relay  # noqa: E402
from tests.helpers import free_port, wait_port  # noqa: E402

TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
KINDS = ("bare", "content type", "traceparent header")


def _publisher(port: int, queue: str, n: int, kind: str, start: Any, done: Any) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port, heartbeat=0))
    ch = conn.channel()
    props = {
        "bare": None,
        "content type": pika.BasicProperties(content_type="text/plain"),
        "traceparent header": pika.BasicProperties(headers={"traceparent": TRACEPARENT}),
    }[kind]
    body = b"x" * 256
    start.wait()
    for _ in range(n):
        ch.basic_publish("", queue, body, props)
    conn.close()
    done.put(time.perf_counter())


def run(port: int, kind: str, per_proc: int, procs: int = 4) -> tuple[float, float]:
    """(messages/s, broker CPU us per message)"""
    queue = f"bench-hdr-{uuid.uuid4().hex[:6]}"
    _declare(queue)
    ctx = mp.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_publisher, args=(port, queue, per_proc, kind, start, done))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    time.sleep(1.5)
    broker = _broker_pids()
    before = cpu_seconds(broker)
    t0 = time.perf_counter()
    start.set()
    ends = [done.get(timeout=300) for _ in workers]
    for w in workers:
        w.join()
    rate = procs * per_proc / (max(ends) - t0)
    time.sleep(0.5)
    used = (cpu_seconds(broker) - before) / (procs * per_proc) * 1e6
    _delete(queue)
    return rate, used


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-proc", type=int, default=20_000)
    args = ap.parse_args()
    port = free_port()
    relay = start_plain_relay(port, "127.0.0.1", 5672)
    wait_port(port)
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
    try:
        for r in range(args.rounds):
            for kind in KINDS:
                settle([*_broker_pids(), relay.pid])
                rate, used = run(port, kind, args.per_proc)
                got[kind].append((rate, used))
                print(
                    f"round {r + 1}: {kind:20} {rate:8,.0f} msg/s, broker {used:5.1f} us/msg",
                    flush=True,
                )
    finally:
        relay.stop()
    print("\nbroker CPU per message through the plain relay (us; median of rounds, range):")
    for kind, xs in got.items():
        cpu = [u for _, u in xs]
        print(f"  {kind:20} {statistics.median(cpu):5.1f}  ({min(cpu):.1f}-{max(cpu):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
