"""MySQL/MariaDB: direct vs through sniff vs a plain relay vs HAProxy, in one run.

    .venv/bin/python bench/mysql.py [--queries 20000] [--rounds 5] [--latency 4000]
                                    [--mix openstack|point] [--no-haproxy]
                                    [--decode capture|inline]

Throughput. ``mariadb-slap`` at concurrency 8 runs a fixed number of queries
against each target, rounds interleaved (direct, plain relay, HAProxy, sniff,
then again) so that other load on the machine hits every target alike; the best
round of each target is reported, with the per-round spread. The query mix:

- ``openstack`` (default): what a control plane sends, on a table of 2,000
  instance-like rows: lookups by uuid, IN lists, a join with a LIMIT, a count,
  an UPDATE by id;
- ``point``: ``SELECT * FROM t WHERE id = 17`` and nothing else: the cheapest
  possible statements, where the proxy's per-statement cost is most visible.

Latency. Sequential ``SELECT 1`` round trips on one connection per target (a
raw-socket client, so that client overhead is small), 100 at a time per target in
rotation; median and p99 per target, and what each proxy *adds* to the direct
median.

sniff runs as ``sniff run`` with a default configuration (``decode = "capture"``:
the proxy relays and ships copies, the capture process decodes them; events to its
capture file, process identification on; the capture is checked at the end for
dropped events and connections whose decoding fell behind); the plain relay is
``bench/plain_relay.py`` (uvloop, no decoding); HAProxy runs in TCP mode. All
listen on 127.0.0.1 only. Targets (issue 3): sniff >= 0.95x the plain relay's
throughput and >= HAProxy's; sniff's added median latency <= 1.25x the plain
relay's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.capture_check import CpuLedger, children  # noqa: E402
from bench.plain_relay import start_plain_relay  # noqa: E402
from tests.helpers import free_port, wait_port  # noqa: E402

HOST = "127.0.0.1"
MIXES = {
    "openstack": [
        "SELECT id, uuid, host, vm_state, memory_mb, vcpus, created_at FROM instances "
        "WHERE uuid = 'u-00000017' AND deleted = 0",
        "SELECT id, uuid, host FROM instances WHERE host IN ('compute-1', 'compute-2', 'compute-3') "
        "AND deleted = 0 LIMIT 20",
        "SELECT i.id, i.uuid, a.action FROM instances i JOIN instance_actions a "
        "ON a.instance_uuid = i.uuid WHERE i.project_id = 'p-3' ORDER BY a.id DESC LIMIT 10",
        "SELECT count(*) FROM instances WHERE vm_state = 'active' AND deleted = 0",
        "UPDATE instances SET updated_at = NOW(), task_state = NULL WHERE id = 42",
    ],
    "point": ["SELECT * FROM instances WHERE id = 17"],
}


def sql(port: int, statements: list[str], database: str | None = None) -> None:
    import pymysql

    c = pymysql.connect(host=HOST, port=port, user="root", database=database, autocommit=True)
    with c.cursor() as cur:
        for s in statements:
            cur.execute(s)
    c.close()


def setup(schema: str) -> None:
    rows = ", ".join(
        f"({i}, 'u-{i:08d}', 'compute-{i % 20}', 'p-{i % 10}', "
        f"'{'active' if i % 3 else 'stopped'}', {512 * (1 + i % 8)}, {1 + i % 4}, NOW(), NULL, 0)"
        for i in range(1, 2001)
    )
    actions = ", ".join(f"('u-{i % 2000 + 1:08d}', 'create', 'req-{i}')" for i in range(4000))
    sql(
        3306,
        [
            f"CREATE DATABASE {schema}",
            f"CREATE TABLE {schema}.instances (id INT PRIMARY KEY, uuid CHAR(10), host VARCHAR(32), "
            "project_id VARCHAR(16), vm_state VARCHAR(16), memory_mb INT, vcpus INT, created_at DATETIME, "
            "updated_at DATETIME, task_state VARCHAR(16), deleted INT, KEY (uuid), KEY (host), "
            "KEY (project_id))",
            f"INSERT INTO {schema}.instances (id, uuid, host, project_id, vm_state, memory_mb, vcpus, "
            f"created_at, task_state, deleted) VALUES {rows}",
            f"CREATE TABLE {schema}.instance_actions (id INT AUTO_INCREMENT PRIMARY KEY, "
            "instance_uuid CHAR(10), action VARCHAR(16), request_id VARCHAR(32), KEY (instance_uuid))",
            f"INSERT INTO {schema}.instance_actions (instance_uuid, action, request_id) VALUES {actions}",
        ],
    )


# --- targets ------------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, port: int, stop: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.port = port
        self.stop = stop
        self.qps: list[float] = []
        self.lat: list[float] = []


def start_sniff(tmp: Path, decode: str = "capture") -> Target:
    port = free_port()
    cfg = tmp / "sniff.toml"
    cfg.write_text(
        f'capture = "{tmp / "capture.db"}"\n\n[[proxy]]\nname = "mariadb"\nprotocol = "mysql"\n'
        f'listen = "127.0.0.1:{port}"\nupstream = "127.0.0.1:3306"\ndecode = "{decode}"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sniff", "run", "-c", str(cfg)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("ready"):
            break
    else:
        raise RuntimeError("sniff did not start")
    wait_port(port)

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    t = Target("sniff", port, stop)
    t.pid = proc.pid  # type: ignore[attr-defined]
    return t


def start_haproxy(tmp: Path) -> Target | None:
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(exe):
        return None
    port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        "global\n  maxconn 2000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n"
        "  timeout client 120s\n  timeout server 120s\n"
        f"frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n"
        "backend b\n  server s 127.0.0.1:3306\n"
    )
    proc = subprocess.Popen(
        [exe, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_port(port)

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    return Target("haproxy", port, stop)


# --- measurements -------------------------------------------------------------------------


def slap(port: int, schema: str, queries: int, concurrency: int, mix: list[str]) -> float:
    out = subprocess.run(
        [
            "mariadb-slap",
            "-h",
            HOST,
            "-P",
            str(port),
            "-uroot",
            f"--concurrency={concurrency}",
            "--iterations=1",
            f"--number-of-queries={queries}",
            f"--create-schema={schema}",
            f"--query={';'.join(mix)}",
            "--delimiter=;",
            "--no-drop",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"mariadb-slap failed: {out.stderr}")
    m = re.search(r"Average number of seconds to run all queries: ([\d.]+)", out.stdout)
    assert m, out.stdout
    return queries / float(m.group(1))


def _login(port: int) -> tuple[socket.socket, Callable[[], bytes]]:
    s = socket.create_connection((HOST, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()

    def packet() -> bytes:
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:3], "little"):
            buf.extend(s.recv(65536))
        n = int.from_bytes(buf[:3], "little")
        p = bytes(buf[4 : 4 + n])
        del buf[: 4 + n]
        return p

    packet()  # greeting
    caps = 0x0200 | 0x8000 | 0x80000 | 0x2000
    body = struct.pack("<IIB23s", caps, 1 << 24, 45, b"") + b"root\x00\x00mysql_native_password\x00"
    s.sendall(len(body).to_bytes(3, "little") + b"\x01" + body)
    if packet()[:1] != b"\x00":
        raise RuntimeError("login failed")
    return s, packet


def latency_interleaved(targets: list[Target], n: int, batch: int = 100) -> None:
    """Round trips of SELECT 1, one connection per target, ``batch`` at a time per target
    in rotation, so that load from elsewhere on the machine hits every target alike."""
    conns = {t.name: _login(t.port) for t in targets}
    q = b"\x09\x00\x00\x00\x03SELECT 1"

    def one(s: socket.socket, packet: Callable[[], bytes]) -> float:
        t0 = time.perf_counter_ns()
        s.sendall(q)
        eofs = 0
        while eofs < 2:  # column count, column, EOF, row, EOF
            if packet()[:1] == b"\xfe":
                eofs += 1
        return (time.perf_counter_ns() - t0) / 1000

    for t in targets:  # warm-up
        for _ in range(200):
            one(*conns[t.name])
    done = 0
    while done < n:
        for t in targets:
            s, packet = conns[t.name]
            t.lat.extend(one(s, packet) for _ in range(batch))
        done += batch
    for s, _ in conns.values():
        s.close()


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=20_000, help="queries per mariadb-slap round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency", type=int, default=4000, help="SELECT 1 round trips per target")
    ap.add_argument("--mix", choices=sorted(MIXES), default="openstack")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument(
        "--decode",
        choices=("capture", "inline"),
        default="capture",
        help="sniff's decode option: in the capture process (default) or on the event loop",
    )
    args = ap.parse_args()

    schema = f"sniff_bench_{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="sniff-bench-"))
    print(f"setting up {schema} (2,000 instances, 4,000 actions)...")
    setup(schema)
    targets: list[Target] = [Target("direct", 3306)]
    started: list[Target] = []
    try:
        plain_port = free_port()
        relay = start_plain_relay(plain_port, HOST, 3306)
        targets.append(Target("plain relay", plain_port, relay.stop))
        if not args.no_haproxy:
            hp = start_haproxy(tmp)
            if hp is not None:
                targets.append(hp)
        targets.append(start_sniff(tmp, args.decode))
        started = targets[1:]
        mix = MIXES[args.mix]
        print(
            f"mariadb-slap: {args.queries:,} queries x {args.rounds} rounds, concurrency "
            f"{args.concurrency}, mix '{args.mix}' ({len(mix)} statements); "
            f'sniff decode = "{args.decode}"'
        )
        for t in targets:  # warm-up (connections, caches, sniff's analysis cache)
            slap(t.port, schema, 2000, args.concurrency, mix)
        sniff_t = targets[-1]
        sniff_pids = [sniff_t.pid, *children(sniff_t.pid)]  # type: ignore[attr-defined]
        groups = {
            "plain relay": {"plain relay": [relay.proc.pid]},
            "sniff": {"sniff relay": sniff_pids[:1], "sniff capture": sniff_pids[1:]},
        }
        ledger = CpuLedger()
        for r in range(args.rounds):
            for t in targets:

                def run(t: Target = t) -> float:
                    t.qps.append(slap(t.port, schema, args.queries, args.concurrency, mix))
                    return args.queries

                ledger.measure(groups.get(t.name, {}), run)
                if t is sniff_t:  # its deferred decoding must not land in the next run
                    ledger.after(groups["sniff"])
            print(f"  round {r + 1}: " + ", ".join(f"{t.name} {t.qps[-1]:,.0f}/s" for t in targets))
        print("CPU per statement, all rounds (from /proc):")
        print("\n".join(ledger.lines("statement")))
        print(f"latency: {args.latency:,} sequential SELECT 1 round trips per target (interleaved)")
        latency_interleaved(targets, args.latency)
    finally:
        for t in started:
            t.stop()
        try:
            sql(3306, [f"DROP DATABASE IF EXISTS {schema}"])
        except Exception as e:
            print(f"(could not drop {schema}: {e})")
        try:
            from bench.capture_check import summary

            # warm-up, rounds, latency warm-up and round trips (slap adds a few of its own)
            issued = 2000 + args.rounds * args.queries + 200 + args.latency
            capture_line = summary(str(tmp / "capture.db"), "mysql.query", issued)
        except Exception as e:
            capture_line = f"(could not read sniff's capture: {e})"
        shutil.rmtree(tmp, ignore_errors=True)

    by = {t.name: t for t in targets}
    print()
    print(
        f"{'target':<12} {'median q/s':>10} {'rounds q/s':>30}   {'median us':>9} {'p99 us':>8} "
        f"{'added us':>9}"
    )
    d_med = statistics.median(by["direct"].lat)
    for t in targets:
        med = statistics.median(t.lat)
        rounds = " ".join(f"{q:,.0f}" for q in t.qps)
        added = "" if t.name == "direct" else f"{med - d_med:9.1f}"
        print(
            f"{t.name:<12} {statistics.median(t.qps):>10,.0f} {rounds:>30}   {med:9.1f} "
            f"{pct(t.lat, 0.99):8.1f} {added:>9}"
        )
    s, p = by["sniff"], by["plain relay"]

    def ratio(a: Target, b: Target) -> float:
        """Median over rounds of a/b measured in the same round (neighbouring runs)."""
        return statistics.median(x / y for x, y in zip(a.qps, b.qps, strict=True))

    print()
    rp = ratio(s, p)
    print(
        f"throughput sniff / plain relay: {rp:.3f}  (target >= 0.95: {'MET' if rp >= 0.95 else 'NOT MET'})"
    )
    print(f"throughput sniff / direct:      {ratio(s, by['direct']):.3f}")
    if "haproxy" in by:
        h = by["haproxy"]
        rh = ratio(s, h)
        print(
            f"throughput sniff / haproxy:     {rh:.3f}  (target >= 1.0: {'MET' if rh >= 1.0 else 'NOT MET'})"
        )
        print(f"throughput plain relay / haproxy: {ratio(p, h):.3f}")
    s_add = statistics.median(s.lat) - d_med
    p_add = statistics.median(p.lat) - d_med
    lr = s_add / p_add if p_add > 0 else float("inf")
    print(
        f"added median latency sniff / plain relay: {s_add:.1f} us / {p_add:.1f} us = {lr:.2f}  "
        f"(target <= 1.25: {'MET' if lr <= 1.25 else 'NOT MET'})"
    )
    print(capture_line)
    load = os.getloadavg()
    print(
        f"(machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f};"
        " other work on the machine shows up as spread between rounds)"
    )


if __name__ == "__main__":
    main()
