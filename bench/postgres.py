"""PostgreSQL benchmark: direct vs through sniff vs a plain no-decode asyncio relay vs
HAProxy (TCP mode), in one run.

    .venv/bin/python bench/postgres.py [--duration 15] [--rounds 1] [--quick]
                                       [--decode capture|inline]

Throughput: pgbench (``-c 8 -j 2 -T DURATION -n``) on a scale-1 database it
initialises in ``sniff_bench`` (created if missing), for select-only (``-S``,
simple protocol), select-only with prepared statements (``-S -M prepared``:
Bind/Execute/Sync, the extended protocol) and tpcb-like (7 statements per
transaction). The paths are run interleaved, so slow drift on a shared machine
hits them alike; with ``--rounds`` > 1 the best round counts.

Latency: sequential ``SELECT 1`` on one asyncpg connection per path (a prepared
statement after the first call), median and p99 round trip, direct vs sniff vs
the plain relay, measured in interleaved blocks once sniff's capture writer has
drained what the pgbench runs queued.

sniff runs as ``sniff run`` with decoding and capture on (one ``postgres.query``
event per statement, sqlcommenter off: its default), ``decode = "capture"`` unless
``--decode inline``; at the end the capture is checked for dropped events and
connections whose decoding fell behind (statement events vs statements issued). HAProxy runs with a
generated config in a temp dir, ``nbthread 1`` (sniff and the plain relay are
one thread each). Prints tps and the ratios the issue sets bars on: sniff /
plain relay throughput (bar >= 0.95x), sniff / HAProxy (bar >= 1.0x), and
sniff's added median round trip / the plain relay's (bar <= 1.25x).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.capture_check import CpuLedger, children  # noqa: E402
from bench.plain_relay import start_plain_relay  # noqa: E402
from tests.helpers import free_port, to_toml, wait_port  # noqa: E402

SERVER = 5432
DB = "sniff_bench"
PGBENCH = shutil.which("pgbench") or "/usr/bin/pgbench"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
ENV = dict(os.environ, PGUSER="postgres", PGHOST="127.0.0.1")

SCENARIOS = {
    "select-only": ["-S"],
    "select-only prepared": ["-S", "-M", "prepared"],
    "tpcb-like": [],
}


class SniffProc:
    def __init__(self, tmp: str, decode: str = "capture") -> None:
        self.port = free_port()
        self.capture = os.path.join(tmp, "bench-postgres.db")
        cfg = os.path.join(tmp, "sniff.toml")
        Path(cfg).write_text(
            to_toml(
                {
                    "capture": self.capture,
                    "log_level": "warning",
                    "proxy": [
                        {
                            "protocol": "postgres",
                            "listen": f"127.0.0.1:{self.port}",
                            "upstream": f"127.0.0.1:{SERVER}",
                            "decode": decode,
                        }
                    ],
                }
            )
        )
        self.p = subprocess.Popen(
            [sys.executable, "-m", "sniff", "run", "-c", cfg],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_port(self.port)

    def stop(self) -> str:
        self.p.send_signal(signal.SIGTERM)
        _, err = self.p.communicate(timeout=120)
        return err


class HaproxyProc:
    def __init__(self, tmp: str) -> None:
        self.port = free_port()
        cfg = os.path.join(tmp, "haproxy.cfg")
        Path(cfg).write_text(
            "global\n  maxconn 1000\n  nbthread 1\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n"
            f"listen pg\n  bind 127.0.0.1:{self.port}\n  server pg 127.0.0.1:{SERVER}\n"
        )
        self.p = subprocess.Popen(
            [HAPROXY, "-db", "-f", cfg],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_port(self.port)

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def prepare_db(scale: int) -> None:
    """Create ``sniff_bench`` if missing and (re)initialise it at ``scale``."""
    exists = subprocess.run(
        ["psql", "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"],
        env=ENV, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if exists != "1":
        subprocess.run(["createdb", DB], env=ENV, check=True)
    subprocess.run(
        [PGBENCH, "-i", "-q", "-s", str(scale), "-p", str(SERVER), DB],
        env=ENV, check=True, capture_output=True,
    )  # fmt: skip


_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


_TX = re.compile(r"number of transactions actually processed: ([0-9]+)")
STATEMENTS_PER_TX = {"select-only": 1, "select-only prepared": 1, "tpcb-like": 7}


def pgbench(port: int, args: list[str], duration: int, clients: int, threads: int) -> float:
    return pgbench_tx(port, args, duration, clients, threads)[0]


def pgbench_tx(
    port: int, args: list[str], duration: int, clients: int, threads: int
) -> tuple[float, int]:
    """(tps, transactions processed)."""
    out = subprocess.run(
        [PGBENCH, "-n", "-p", str(port), "-c", str(clients), "-j", str(threads),
         "-T", str(duration), *args, DB],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    m = _TPS.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"pgbench on port {port} failed:\n{out.stdout}\n{out.stderr}")
    tx = _TX.search(out.stdout)
    return float(m.group(1)), int(tx.group(1)) if tx else 0


async def _latency(ports: dict[str, int], n: int, blocks: int = 20) -> dict[str, list[float]]:
    """Sequential SELECT 1 per path, in interleaved blocks so drift hits every path alike."""
    import asyncpg

    conns = {
        name: await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=DB)
        for name, port in ports.items()
    }
    for c in conns.values():
        for _ in range(300):
            await c.fetchval("SELECT 1")
    out: dict[str, list[float]] = {name: [] for name in ports}
    clock = time.perf_counter_ns
    per_block = max(1, n // blocks)
    for _ in range(blocks):
        for name, c in conns.items():
            samples = out[name]
            for _ in range(per_block):
                t0 = clock()
                await c.fetchval("SELECT 1")
                samples.append((clock() - t0) / 1e3)
    for c in conns.values():
        await c.close()
    return out


def latency(ports: dict[str, int], n: int) -> dict[str, tuple[float, float]]:
    res = {}
    for name, samples in asyncio.run(_latency(ports, n)).items():
        s = sorted(samples)
        res[name] = (statistics.median(s), s[min(len(s) - 1, int(0.99 * len(s)))])
    return res


def wait_capture_idle(path: str, timeout: float = 120.0) -> None:
    """Until sniff's capture stops growing: its writer thread has drained what pgbench queued
    (a backlog competing for the GIL would otherwise be measured as proxy latency)."""
    import sqlite3

    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            n = db.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0]
            db.close()
        except sqlite3.Error:
            n = -2
        if n == last:
            return
        last = n
        time.sleep(1.0)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=int, default=15, help="seconds per pgbench run")
    ap.add_argument("--rounds", type=int, default=1, help="repeat; the best round counts")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-n", type=int, default=5000, help="sequential SELECT 1 per path")
    ap.add_argument("--quick", action="store_true", help="5 s runs, select-only only (smoke)")
    ap.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="only these")
    ap.add_argument(
        "--decode",
        choices=("capture", "inline"),
        default="capture",
        help="sniff's decode option: in the capture process (default) or on the event loop",
    )
    args = ap.parse_args()
    duration = 5 if args.quick else args.duration
    scenarios = args.scenario or (["select-only"] if args.quick else list(SCENARIOS))
    print(f"initialising {DB} (pgbench -i -s 1) ...", flush=True)
    prepare_db(1)
    tmp = tempfile.mkdtemp(prefix="sniff-bench-pg-")
    sniff = SniffProc(tmp, args.decode)
    plain_port = free_port()
    plain = start_plain_relay(plain_port, "127.0.0.1", SERVER)
    wait_port(plain_port)
    haproxy = HaproxyProc(tmp)
    paths = {
        "direct": SERVER,
        "plain relay": plain_port,
        "haproxy": haproxy.port,
        "sniff": sniff.port,
    }
    sniff_groups = {"sniff relay": [sniff.p.pid], "sniff capture": children(sniff.p.pid)}
    groups = {"plain relay": {"plain relay": [plain.proc.pid]}, "sniff": sniff_groups}
    ledger = CpuLedger()
    tps: dict[str, dict[str, float]] = {s: {} for s in scenarios}
    lat: dict[str, tuple[float, float]] = {}
    err = ""
    issued = 0
    try:
        for rnd in range(args.rounds):
            for sc in scenarios:
                for name, port in paths.items():
                    print(f"round {rnd + 1}: {sc:<21} {name} ...", flush=True)
                    got: list[tuple[float, int]] = []

                    def run(
                        port: int = port, sc: str = sc, got: list[tuple[float, int]] = got
                    ) -> float:
                        got.append(
                            pgbench_tx(port, SCENARIOS[sc], duration, args.clients, args.threads)
                        )
                        return got[0][1]

                    ledger.measure(groups.get(name, {}), run)
                    t, tx = got[0]
                    tps[sc][name] = max(tps[sc].get(name, 0.0), t)
                    if name == "sniff":
                        issued += tx * STATEMENTS_PER_TX[sc]
                        ledger.after(sniff_groups)
            wait_capture_idle(sniff.capture)
            lat_paths = {k: paths[k] for k in ("direct", "plain relay", "sniff")}
            issued += 300 + max(1, args.latency_n // 20) * 20  # warm-up + round trips
            for name, (med, p99) in latency(lat_paths, args.latency_n).items():
                if name not in lat or med < lat[name][0]:
                    lat[name] = (med, p99)
    finally:
        err = sniff.stop()
        plain.stop()
        haproxy.stop()
    from bench.capture_check import summary

    capture_line = summary(sniff.capture, "postgres.query", issued)
    print()
    print(
        f"PostgreSQL benchmark: pgbench -c {args.clients} -j {args.threads} -T {duration}, scale 1, "
        f"best of {args.rounds}; server 127.0.0.1:{SERVER}; {os.cpu_count()} CPUs (shared, noisy); "
        f'sniff decode = "{args.decode}"'
    )
    head = f"{'tps':24}" + "".join(f"{n:>13}" for n in paths)
    print(head + f"{'sniff/plain':>13}{'sniff/haproxy':>15}{'sniff/direct':>14}")
    for sc in scenarios:
        r = tps[sc]
        row = f"{sc:24}" + "".join(f"{r[n]:>13,.0f}" for n in paths)
        print(
            row + f"{r['sniff'] / r['plain relay']:>12.3f}x{r['sniff'] / r['haproxy']:>14.3f}x"
            f"{r['sniff'] / r['direct']:>13.3f}x"
        )
    print()
    print(f"{'SELECT 1 round trip (us)':24}{'direct':>13}{'plain relay':>13}{'sniff':>13}")
    for i, label in ((0, "median"), (1, "p99")):
        print(
            f"{label:24}"
            + "".join(f"{lat[n][i]:>13.1f}" for n in ("direct", "plain relay", "sniff"))
        )
    added_p = lat["plain relay"][0] - lat["direct"][0]
    added_s = lat["sniff"][0] - lat["direct"][0]
    ratio = added_s / added_p if added_p > 0 else float("nan")
    print(
        f"added median latency: plain relay {added_p:.1f} us, sniff {added_s:.1f} us "
        f"-> sniff/plain {ratio:.2f}x (bar <= 1.25x)"
    )
    for sc in scenarios:
        r = tps[sc]
        print(
            f"{sc}: sniff/plain relay {r['sniff'] / r['plain relay']:.3f}x (bar >= 0.95x), "
            f"sniff/haproxy {r['sniff'] / r['haproxy']:.3f}x (bar >= 1.0x)"
        )
    print(capture_line)
    print("CPU per transaction, all scenarios (from /proc):")
    print("\n".join(ledger.lines("transaction")))
    load = os.getloadavg()
    print(f"(load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    if err.strip():
        print("sniff stderr:", err.strip()[-2000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
