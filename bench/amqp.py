"""AMQP benchmark: direct vs through sniff vs a plain no-decode asyncio relay, in one run.

    .venv/bin/python bench/amqp.py [--quick] [--rounds N] [--only pub,pubh,aio,con,rpc]

Scenarios, each against RabbitMQ on 127.0.0.1:5672 through all three paths:

- publish, 4 pika processes (no confirms), 256-byte bodies: messages/s from
  the first publish until every publisher's connection has closed (Close-Ok
  comes after the broker has taken every earlier frame);
- the same with messages that already carry a headers table (one entry), as
  kombu's and most instrumented clients' do: sniff then adds an entry to an
  existing table instead of giving the message its first one, which is what
  costs RabbitMQ (3.10 here) about 7-10 us of CPU per message;
- publish with aio-pika and publisher confirms (200 in flight): messages/s;
- consume with pika (prefetch 500, one ack per message) from a queue filled
  directly: messages/s;
- RPC round trip on one connection: a client publishes a request and waits for
  the reply that an echo server (another process, same path) publishes to its
  reply_to; median and p99 over sequential calls. The three paths are measured
  in one process, call by call in a rotating order (direct, plain relay, sniff;
  then plain relay, sniff, direct; ...), so that the machine's drifts, which move
  a median by as much as a relay adds, weigh on all three alike; of the rounds,
  the one whose sniff-added median is the middle one is reported.

For the publish scenario it also prints the CPU each process spent per message
(plain relay; sniff's relay and capture processes; the broker), read from
/proc: steadier than the throughput ratio on a shared machine.

Before each scenario the driver waits until sniff's processes, the plain relay
and the broker are idle, so no scenario is measured while the capture process
(or the broker) still works off the previous one's burst.

sniff runs as ``sniff run`` with decoding, traceparent injection and capture on.
Prints the numbers and the ratios the issue sets bars on: sniff / plain relay
publish throughput (bar 0.9x, plus the ratio to direct) and sniff's added median
round-trip latency / the plain relay's (bar 1.25x).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.capture_check import children, cpu_seconds, settle  # noqa: E402
from bench.plain_relay import start_plain_relay  # noqa: E402
from tests.helpers import free_port, wait_port  # noqa: E402

BROKER = 5672


# --- paths -------------------------------------------------------------------------------


class SniffProc:
    def __init__(self, tmp: str) -> None:
        self.port = free_port()
        self.capture = os.path.join(tmp, "bench-amqp.db")
        self.p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sniff",
                "run",
                "--proxy",
                f"amqp:127.0.0.1:{self.port}=127.0.0.1:{BROKER}",
                "--capture",
                self.capture,
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_port(self.port)

    def stop(self) -> str:
        self.p.send_signal(signal.SIGTERM)
        _, err = self.p.communicate(timeout=60)
        return err


# --- workloads (each runs in child processes so the bench driver measures nothing of its own) --


def _pika_publisher(
    port: int, queue: str, n: int, body: bytes, start: Any, done: Any, headers: Any = None
) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port, heartbeat=0))
    ch = conn.channel()
    props = pika.BasicProperties(headers=headers) if headers else None
    start.wait()
    for _ in range(n):
        ch.basic_publish("", queue, body, props)
    conn.close()  # waits for Close-Ok: the broker has every earlier frame
    done.put(time.perf_counter())


def _declare(queue: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", BROKER, heartbeat=0))
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=False)
    ch.queue_purge(queue)
    conn.close()


def _delete(queue: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", BROKER, heartbeat=0))
    conn.channel().queue_delete(queue)
    conn.close()


def bench_publish_pika(
    port: int, procs: int, per_proc: int, size: int, headers: Any = None
) -> float:
    queue = f"bench-pub-{uuid.uuid4().hex[:6]}"
    _declare(queue)
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    done: Any = ctx.Queue()
    workers = [
        ctx.Process(
            target=_pika_publisher, args=(port, queue, per_proc, b"x" * size, start, done, headers)
        )
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    time.sleep(1.0)  # let every publisher connect
    t0 = time.perf_counter()
    start.set()
    ends = [done.get(timeout=300) for _ in workers]
    for w in workers:
        w.join()
    _delete(queue)
    return float(procs * per_proc / (max(ends) - t0))


def _aio_confirms(port: int, n: int, size: int, window: int, out: Any) -> None:
    import aio_pika

    async def main() -> float:
        conn = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{port}/")
        ch = await conn.channel(publisher_confirms=True)
        q = await ch.declare_queue(f"bench-aio-{uuid.uuid4().hex[:6]}", auto_delete=False)
        body = b"y" * size
        sem = asyncio.Semaphore(window)

        async def one() -> None:
            async with sem:
                await ch.default_exchange.publish(aio_pika.Message(body), routing_key=q.name)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        dt = time.perf_counter() - t0
        await q.delete(if_unused=False, if_empty=False)
        await conn.close()
        return n / dt

    out.put(asyncio.run(main()))


def bench_publish_aio(port: int, n: int, size: int) -> float:
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    p = ctx.Process(target=_aio_confirms, args=(port, n, size, 200, out))
    p.start()
    rate = float(out.get(timeout=300))
    p.join()
    return rate


def _fill(queue: str, n: int, size: int) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", BROKER, heartbeat=0))
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=False)
    ch.queue_purge(queue)
    body = b"z" * size
    for _ in range(n):
        ch.basic_publish("", queue, body)
    conn.close()


def _pika_consumer(port: int, queue: str, n: int, out: Any) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port, heartbeat=0))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=500)
    t0 = time.perf_counter()
    for got, (method, _props, _body) in enumerate(ch.consume(queue), 1):
        ch.basic_ack(method.delivery_tag)
        if got == n:
            break
    dt = time.perf_counter() - t0
    ch.cancel()
    conn.close()
    out.put(n / dt)


def bench_consume(port: int, n: int, size: int) -> float:
    queue = f"bench-con-{uuid.uuid4().hex[:6]}"
    _fill(queue, n, size)
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    p = ctx.Process(target=_pika_consumer, args=(port, queue, n, out))
    p.start()
    rate = float(out.get(timeout=300))
    p.join()
    _delete(queue)
    return rate


def _echo_server(port: int, queue: str, ready: Any) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port, heartbeat=0))
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=True)

    def on(c: Any, m: Any, p: Any, b: bytes) -> None:
        c.basic_publish("", p.reply_to, b, pika.BasicProperties(correlation_id=p.correlation_id))
        c.basic_ack(m.delivery_tag)

    ch.basic_consume(queue, on)
    ready.set()
    with contextlib.suppress(Exception):
        ch.start_consuming()


def _rpc_client(paths: dict[str, tuple[int, str]], n: int, out: Any) -> None:
    """Sequential RPC calls, one path after another in a rotating order: each path's
    samples are taken over the same span of time, so drifts of the machine (which move
    a median by as much as a relay adds) weigh on all three alike."""
    import pika

    chans = {}
    state: dict[str, Any] = {}
    for name, (port, queue) in paths.items():
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port, heartbeat=0))
        ch = conn.channel()
        reply = ch.queue_declare("", exclusive=True).method.queue

        def on(c: Any, m: Any, p: Any, b: bytes) -> None:
            state["got"] = p.correlation_id

        ch.basic_consume(reply, on, auto_ack=True)
        chans[name] = (conn, ch, queue, reply)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for i in range(n):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            conn, ch, queue, reply = chans[name]
            corr = f"{name}-{i}"
            t0 = time.perf_counter()
            ch.basic_publish(
                "", queue, b"ping", pika.BasicProperties(reply_to=reply, correlation_id=corr)
            )
            while state.get("got") != corr:
                conn.process_data_events(time_limit=None)
            samples[name].append(time.perf_counter() - t0)
    for conn, *_ in chans.values():
        conn.close()
    out.put({name: xs[n // 10 :] for name, xs in samples.items()})  # drop warm-up


def bench_rpc(ports: dict[str, int], n: int) -> dict[str, list[float]]:
    """RPC round trips through every path, interleaved call by call (see _rpc_client);
    an echo server per path, each connected through its path."""
    ctx = mp.get_context("spawn")
    paths = {name: (port, f"bench-rpc-{uuid.uuid4().hex[:6]}") for name, port in ports.items()}
    servers = []
    for port, queue in paths.values():
        ready = ctx.Event()
        server = ctx.Process(target=_echo_server, args=(port, queue, ready))
        server.start()
        ready.wait(30)
        servers.append(server)
    out: Any = ctx.Queue()
    client = ctx.Process(target=_rpc_client, args=(paths, n, out))
    client.start()
    samples: dict[str, list[float]] = out.get(timeout=600)
    client.join()
    for server in servers:
        server.terminate()
        server.join()
    return samples


# --- driver ------------------------------------------------------------------------------


def _broker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="smaller counts (a smoke run, noisy numbers)"
    )
    ap.add_argument(
        "--rounds", type=int, default=2, help="repeat each measurement; the best round counts"
    )
    ap.add_argument(
        "--only",
        default="pub,pubh,aio,con,rpc",
        help="comma-separated scenarios to run: pub, pubh, aio, con, rpc (default: all)",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not only or only - {"pub", "pubh", "aio", "con", "rpc"}:
        ap.error(f"--only: expected some of pub, pubh, aio, con, rpc; got {args.only!r}")
    scale = 0.2 if args.quick else 1.0
    per_proc = int(25_000 * scale)
    aio_n = int(20_000 * scale)
    con_n = int(50_000 * scale)
    rpc_n = int(2_000 * scale)
    tmp = tempfile.mkdtemp(prefix="sniff-bench-")
    sniff = SniffProc(tmp)
    plain_port = free_port()
    plain = start_plain_relay(plain_port, "127.0.0.1", BROKER)
    wait_port(plain_port)
    paths = {"direct": BROKER, "plain relay": plain_port, "sniff": sniff.port}
    results: dict[str, dict[str, Any]] = {k: {} for k in paths}
    quiet = [sniff.p.pid, *children(sniff.p.pid), plain.pid, *_broker_pids()]
    # CPU per published message, per process: steadier than throughput on a shared machine
    cpu_of = {
        "plain relay": [plain.pid],
        "sniff relay": [sniff.p.pid],
        "sniff capture": children(sniff.p.pid),
        "broker": _broker_pids(),
    }
    cpu: dict[tuple[str, str], list[float]] = {}
    rounds_rpc: dict[str, list[tuple[float, float]]] = {}
    waited = 0.0
    try:
        for round_ in range(args.rounds):
            for name, port in paths.items() if only - {"rpc"} else ():
                r = results[name]
                print(f"round {round_ + 1}: {name} ...", flush=True)
                if "pub" in only:
                    waited += settle(quiet)
                    before = {k: cpu_seconds(v) for k, v in cpu_of.items()}
                    rate = bench_publish_pika(port, 4, per_proc, 256)
                    r["pub"] = max(r.get("pub", 0.0), rate)
                    n_msgs = 4 * per_proc
                    for k, v in cpu_of.items():  # CPU per message of this path's processes
                        if k == "broker" or k.startswith(name):
                            used = (cpu_seconds(v) - before[k]) / n_msgs
                            cpu.setdefault((name, k), []).append(used)
                if "pubh" in only:  # messages that already carry a headers table
                    waited += settle(quiet)
                    rate = bench_publish_pika(port, 4, per_proc, 256, {"x-app": "nova-api"})
                    r["pubh"] = max(r.get("pubh", 0.0), rate)
                if "aio" in only:
                    waited += settle(quiet)
                    r["aio"] = max(r.get("aio", 0.0), bench_publish_aio(port, aio_n, 256))
                if "con" in only:
                    waited += settle(quiet)
                    r["con"] = max(r.get("con", 0.0), bench_consume(port, con_n, 256))
            if "rpc" in only:
                print(f"round {round_ + 1}: RPC, all paths interleaved ...", flush=True)
                waited += settle(quiet)
                before = {k: cpu_seconds(v) for k, v in cpu_of.items()}
                got_rpc = bench_rpc(paths, rpc_n)
                for k, v in cpu_of.items():  # each relay carried rpc_n of the calls
                    if k != "broker":
                        cpu.setdefault(("rpc", k), []).append((cpu_seconds(v) - before[k]) / rpc_n)
                for name, xs in got_rpc.items():
                    rounds_rpc.setdefault(name, []).append((statistics.median(xs), pct(xs, 0.99)))
        # RPC: the round whose sniff-added median is the median of the rounds'
        if rounds_rpc:
            added = sorted(
                range(args.rounds),
                key=lambda i: rounds_rpc["sniff"][i][0] - rounds_rpc["direct"][i][0],
            )
            mid = added[len(added) // 2]
            for name, got in rounds_rpc.items():
                results[name]["rpc_med"], results[name]["rpc_p99"] = got[mid]
    finally:
        err = sniff.stop()
        plain.stop()
    from sniff.store import CaptureReader

    cap = CaptureReader(sniff.capture)
    events, dropped = cap.count(), cap.meta().get("dropped_events", "?")
    d, p, s = results["direct"], results["plain relay"], results["sniff"]
    print()
    print(
        f"AMQP benchmark ({'quick' if args.quick else 'full'}; best of {args.rounds} rounds (RPC: the median round); "
        f"RabbitMQ on 127.0.0.1:{BROKER}; {os.cpu_count()} CPUs)"
    )
    print(
        f"{'':34}{'direct':>12}{'plain relay':>14}{'sniff':>12}{'sniff/plain':>13}{'sniff/direct':>14}"
    )
    for key, label in (
        ("pub", "publish, 4 pika procs (msg/s)"),
        ("pubh", "  the same, messages with headers"),
        ("aio", "publish, aio-pika confirms (msg/s)"),
        ("con", "consume, pika (msg/s)"),
    ):
        if key in only:
            print(
                f"{label:34}{d[key]:>12,.0f}{p[key]:>14,.0f}{s[key]:>12,.0f}"
                f"{s[key] / p[key]:>12.2f}x{s[key] / d[key]:>13.2f}x"
            )
    if "rpc" in only:
        for key, label in (("rpc_med", "median"), ("rpc_p99", "p99")):
            print(
                f"{'RPC round trip ' + label + ' (us)':34}{d[key] * 1e6:>12.0f}"
                f"{p[key] * 1e6:>14.0f}{s[key] * 1e6:>12.0f}"
            )
        added_p = p["rpc_med"] - d["rpc_med"]
        added_s = s["rpc_med"] - d["rpc_med"]
        ratio = added_s / added_p if added_p > 0 else float("nan")
        print(
            f"added median latency: plain relay {added_p * 1e6:.0f} us, "
            f"sniff {added_s * 1e6:.0f} us -> sniff/plain {ratio:.2f}x (bar <= 1.25x)"
        )
        print(
            "CPU per RPC round trip (us, median of rounds; /proc utime+stime): "
            + ", ".join(
                f"{k} {statistics.median(v) * 1e6:.0f}"
                for (pth, k), v in sorted(cpu.items())
                if pth == "rpc"
            )
        )
    if "pub" in only:
        print(
            f"publish throughput sniff/plain relay: {s['pub'] / p['pub']:.2f}x (bar >= 0.9x); "
            f"sniff/direct: {s['pub'] / d['pub']:.2f}x"
        )
        print("CPU per published message (us, median of rounds; /proc utime+stime):")
        for path in paths:
            parts = [
                f"{k} {statistics.median(v) * 1e6:.1f}"
                for (pth, k), v in sorted(cpu.items())
                if pth == path
            ]
            print(f"  {path:12} " + ", ".join(parts))
    print(f"sniff captured {events:,} events, {dropped} dropped")
    print(f"waited {waited:.1f} s in all for the machine to go quiet between scenarios")
    if err.strip():
        print("sniff stderr:", err.strip()[-2000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
