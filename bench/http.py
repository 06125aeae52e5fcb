"""HTTP benchmark: direct vs through sniff vs nginx as a reverse proxy vs a plain
asyncio relay, in one run, with wrk (keep-alive, small bodies).

    .venv/bin/python bench/http.py [--duration 5] [--conns 8,64] [--rounds 3] [--quick]

The upstream is nginx (Debian package, one worker) answering ``200 hello
world``. Paths, each measured with ``wrk -t2 -cN -dD --latency`` after a short
warm-up, in interleaved rounds (median reported):

- direct: wrk -> upstream;
- nginx-rp: wrk -> nginx reverse proxy (upstream keep-alive, HTTP/1.1) -> upstream,
  with ``worker_processes auto`` (what a typical deployment runs) and with 1
  worker (one process, like sniff's event loop);
- plain-relay: wrk -> sniff's relay with a passthrough handler (no decoding,
  no capture), on uvloop (bench/plain_http_relay.py);
- sniff: wrk -> ``sniff run`` with an ``http`` proxy: HTTP/1.1 fast path,
  traceparent injection and the capture on, with ``decode = "capture"`` (the
  default: the relay injects and ships copies, the capture process decodes);
- sniff-inline: the same with ``decode = "inline"`` (decoding on the relay's
  event loop), for comparison (``--no-inline`` skips it);
- sniff-mitmproxy: the same with ``engine = "mitmproxy"`` (the HTTP/2 / TLS path,
  here speaking HTTP/1.1), shorter runs.

Prints requests/s, latency p50/p99 and the ratios the issue sets a bar on
(sniff / nginx-rp >= 0.8), plus sniff / plain relay and sniff / direct, and
what each sniff captured: the exchanges recorded against the requests wrk
completed (warm-ups included), events dropped (capture meta), connections whose
decoding stopped because the capture queue was full (``capture.gap`` notes),
and how long the capture process took to finish after the last run (its
backlog). Everything shares this
machine's cores with wrk and the upstream: compare ratios from one run, not
absolute numbers across runs.
"""

from __future__ import annotations

import argparse
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.capture_check import CpuLedger, children  # noqa: E402
from tests.helpers import free_port, to_toml, wait_port  # noqa: E402

try:  # the shared baseline, when present
    from bench.plain_relay import start_plain_relay  # type: ignore[import-not-found]
except ImportError:
    from bench.plain_http_relay import start_plain_relay

NGINX = """
worker_processes {workers};
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {tmp}/{name}-cb; proxy_temp_path {tmp}/{name}-pt;
  fastcgi_temp_path {tmp}/{name}-ft; uwsgi_temp_path {tmp}/{name}-ut; scgi_temp_path {tmp}/{name}-st;
  {upstream}
  server {{ listen 127.0.0.1:{port}; location / {{ {location} }} }}
}}
"""


class Proc:
    def __init__(self, p: subprocess.Popen[Any], port: int, name: str) -> None:
        self.p = p
        self.port = port
        self.name = name
        self.out = ""
        self.stop_s = 0.0

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                out, _ = self.p.communicate(timeout=60)
                self.out = out or ""
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def nginx(tmp: Path, name: str, workers: str, upstream_port: int | None) -> Proc:
    port = free_port()
    if upstream_port is None:
        up, loc = "", 'return 200 "hello world\\n";'
    else:
        up = f"upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}"
        loc = 'proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";'
    conf = tmp / f"{name}.conf"
    conf.write_text(
        NGINX.format(workers=workers, tmp=tmp, name=name, port=port, upstream=up, location=loc)
    )
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    p = subprocess.Popen(
        [binary, "-c", str(conf), "-p", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return Proc(p, port, name)


def sniff(
    tmp: Path, name: str, upstream_port: int, capture_defer: float | None = None, **opts: Any
) -> Proc:
    port = free_port()
    cfg: dict[str, Any] = {
        "capture": str(tmp / f"{name}.db"),
        "log_level": "warning",
        "proxy": [
            {
                "name": name,
                "protocol": "http",
                "listen": f"127.0.0.1:{port}",
                "upstream": f"127.0.0.1:{upstream_port}",
                "state_dir": str(tmp / "state"),
                **opts,
            }
        ],
    }
    if capture_defer is not None:
        cfg["capture_defer"] = capture_defer
    path = tmp / f"{name}.toml"
    path.write_text(to_toml(cfg))
    p = subprocess.Popen(
        [sys.executable, "-m", "sniff", "run", "-c", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_port(port, timeout=30)
    return Proc(p, port, name)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk(port: int, conns: int, duration: float) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{conns}", f"-d{duration:g}s", "--latency", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50": _ms(p50.group(1)) if p50 else float("nan"),
        "p99": _ms(p99.group(1)) if p99 else float("nan"),
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 1.0 if sock else 0.0,
        "requests": float(done.group(1)) if done else 0.0,
    }


def completeness(capture: Path, sent: float, stop_s: float) -> str:
    """Exchanges recorded vs requests wrk completed; drops; connections cut from decoding."""
    import sqlite3

    db = sqlite3.connect(str(capture))
    try:
        rows = db.execute(
            "SELECT coalesce(sum(json_array_length(data, '$.rows')), 0) FROM events"
            " WHERE kind = 'http.exchanges'"
        ).fetchone()[0]
        single = db.execute("SELECT count(*) FROM events WHERE kind = 'http.exchange'").fetchone()[
            0
        ]
        gaps = db.execute(
            "SELECT count(*) FROM events WHERE kind = 'core.note'"
            " AND json_extract(data, '$.code') = 'capture.gap'"
        ).fetchone()[0]
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    finally:
        db.close()
    got = rows + single
    return (
        # wrk does not count the requests in flight when a run ends; sniff records them
        f"exchanges recorded {got:,} for {sent:,.0f} requests wrk completed "
        f"({got / max(sent, 1):.1%}); "
        f"dropped events {meta.get('dropped_events', '?')}; connections whose decoding stopped "
        f"(capture queue full) {gaps}; stop took {stop_s:.1f}s (capture backlog)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--conns", default="8,64", help="connection counts, comma separated")
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds per path; the median is reported"
    )
    ap.add_argument("--quick", action="store_true", help="3 s runs")
    ap.add_argument("--no-mitmproxy", action="store_true", help="skip the mitmproxy path")
    ap.add_argument("--no-inline", action="store_true", help='skip decode = "inline"')
    ap.add_argument(
        "--capture-defer",
        type=float,
        default=None,
        help="sniff's capture_defer (default: sniff's own, 30 s; 0 decodes at once)",
    )
    args = ap.parse_args()
    duration = 3.0 if args.quick else args.duration
    if args.quick:
        args.rounds = 1
    conns = [int(c) for c in args.conns.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="sniff-bench-http-"))
    procs: list[Proc] = []
    plain: Any = None
    try:
        up = nginx(tmp, "upstream", "1", None)
        procs.append(up)
        paths: dict[str, int] = {"direct": up.port}
        rp_auto = nginx(tmp, "rp-auto", "auto", up.port)
        rp_one = nginx(tmp, "rp-1", "1", up.port)
        procs += [rp_auto, rp_one]
        paths["nginx-rp"] = rp_auto.port
        paths["nginx-rp-1w"] = rp_one.port
        plain_port = free_port()
        plain = start_plain_relay(plain_port, "127.0.0.1", up.port)
        paths["plain-relay"] = plain_port
        fast = sniff(tmp, "sniff", up.port, capture_defer=args.capture_defer)
        procs.append(fast)
        paths["sniff"] = fast.port
        inline = None
        if not args.no_inline:
            inline = sniff(tmp, "sniff-inline", up.port, decode="inline")
            procs.append(inline)
            paths["sniff-inline"] = inline.port
        mitm = None
        if not args.no_mitmproxy:
            mitm = sniff(tmp, "sniff-mitm", up.port, engine="mitmproxy")
            procs.append(mitm)
            paths["sniff-mitmproxy"] = mitm.port
        time.sleep(1.0)
        load = os.getloadavg()
        print(
            f"# wrk -t2 --latency, keep-alive, GET / -> 12-byte body; {duration:g}s per run, "
            f"{args.rounds} round(s); {os.cpu_count()} CPUs; load before: "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            flush=True,
        )
        results: dict[tuple[str, int], dict[str, float]] = {}
        sent: dict[str, float] = dict.fromkeys(paths, 0.0)
        groups = {"plain-relay": {"plain relay": [getattr(plain, "proc", plain).pid]}}
        groups["sniff"] = {
            "sniff relay": [fast.p.pid], "sniff capture": children(fast.p.pid)
        }  # fmt: skip
        ledger = CpuLedger()
        for c in conns:
            for name, port in paths.items():
                # warm-up (connections, caches, CPU frequency)
                sent[name] += wrk(port, c, 1.0)["requests"]
            # rounds interleave the paths, so a burst of other load on this shared
            # machine hits them all alike; the median of the rounds is reported
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, port in paths.items():
                    d = duration if name != "sniff-mitmproxy" else min(duration, 5.0)

                    def run(
                        port: int = port,
                        d: float = d,
                        out: list[dict[str, float]] = runs[name],
                        c: int = c,
                    ) -> float:
                        out.append(wrk(port, c, d))
                        return out[-1]["requests"]

                    sent[name] += ledger.measure(groups.get(name, {}), run)
                    if name in groups and name != "plain-relay":
                        ledger.after(groups[name])  # deferred decoding: not in the next run
            for name in paths:
                rs = runs[name]
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                results[(name, c)] = med
                each = ", ".join(f"{r['rps']:,.0f}" for r in rs)
                spread = f"   (runs {each})" if len(rs) > 1 else ""
                print(
                    f"  c={c:<3} {name:<16} {med['rps']:>10,.0f} req/s   p50 {med['p50']:7.2f} ms"
                    f"   p99 {med['p99']:7.2f} ms"
                    + (f"   non-2xx {med['errors']:.0f}" if med["errors"] else "")
                    + spread,
                    flush=True,
                )
        print("\n# CPU per request, all runs at every connection count (from /proc)")
        print("\n".join(ledger.lines("request")))
        print("\n# ratios (requests/s)")
        for c in conns:
            s = results[("sniff", c)]["rps"]
            line = (
                f"  c={c:<3} sniff/nginx-rp {s / results[('nginx-rp', c)]['rps']:.2f}"
                f"   sniff/nginx-rp-1w {s / results[('nginx-rp-1w', c)]['rps']:.2f}"
                f"   sniff/plain-relay {s / results[('plain-relay', c)]['rps']:.2f}"
                f"   sniff/direct {s / results[('direct', c)]['rps']:.2f}"
                f"   plain-relay/nginx-rp "
                f"{results[('plain-relay', c)]['rps'] / results[('nginx-rp', c)]['rps']:.2f}"
            )
            if ("sniff-inline", c) in results:
                i = results[("sniff-inline", c)]["rps"]
                line += f"   inline/nginx-rp {i / results[('nginx-rp', c)]['rps']:.2f}"
            if ("sniff-mitmproxy", c) in results:
                m = results[("sniff-mitmproxy", c)]["rps"]
                line += f"   mitmproxy/nginx-rp {m / results[('nginx-rp', c)]['rps']:.3f}"
            print(line)
        bar = min(results[("sniff", c)]["rps"] / results[("nginx-rp", c)]["rps"] for c in conns)
        print(f"\n# bar: sniff >= 0.8x nginx-rp: {'met' if bar >= 0.8 else 'NOT met'} ({bar:.2f})")
        for p in procs:
            t0 = time.monotonic()
            p.stop()
            if p in (fast, inline, mitm):
                p.stop_s = time.monotonic() - t0
        for p in (fast, inline, mitm):
            if p is not None:
                last = [ln for ln in p.out.splitlines() if "events captured" in ln]
                print(f"# {p.name}: {last[-1].removeprefix('sniff: ') if last else p.out[-300:]}")
                path = {"sniff-mitm": "sniff-mitmproxy"}.get(p.name, p.name)
                print(f"#   {completeness(tmp / f'{p.name}.db', sent[path], p.stop_s)}")
        return 0
    finally:
        for p in procs:  # SIGTERM first: an nginx master must take its workers down
            p.stop()
        if plain is not None and hasattr(plain, "stop"):
            plain.stop()
        elif plain is not None and plain.poll() is None:
            plain.terminate()
            plain.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
