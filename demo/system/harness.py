"""Runs the test system through sniff and scores the correlator against ground truth.

The system: ``api`` (threaded HTTP server, one process), two ``scheduler``
processes (RPC server), two ``worker`` processes (cast consumers that call the
``image`` service over HTTP), all on the real MariaDB and RabbitMQ. sniff sits
in front of RabbitMQ, MariaDB and both HTTP services. Each service writes its
ground truth: for every outbound call, the unit of work that caused it.

Scoring: every span that has a true parent (a call's causing unit; a consumer's
producer) is *right* when its parent is that span, *linked* when it has no
parent but a span link to it, *wrong* when it has another parent (always with
confidence 1: sniff only sets a parent when decided), *unattached* otherwise.
Root spans (the api's requests from the load client) are right when parentless.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from demo.system.common import drop_database, setup_database
from tests.helpers import ROOT, SniffProcess, free_port

GT_RE = re.compile(r"gt-[0-9a-f]{12}")


@dataclass
class Score:
    total: int = 0
    right: int = 0
    linked: int = 0
    wrong: int = 0
    unattached: int = 0
    missing: int = 0
    by_method: Counter[str] = field(default_factory=Counter)
    by_component: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    wrong_examples: list[str] = field(default_factory=list)
    trace_ok: int = 0
    trace_total: int = 0

    def pct(self, n: int) -> float:
        return 100.0 * n / self.total if self.total else 0.0

    def report(self, label: str) -> str:
        lines = [
            f"{label}: {self.total} spans with a known parent: right {self.right} ({self.pct(self.right):.1f}%), "
            f"linked to candidates {self.linked} ({self.pct(self.linked):.1f}%), wrong {self.wrong}, "
            f"unattached {self.unattached}, not found {self.missing}",
            "  by method: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_method.items())),
            f"  whole traces: {self.trace_ok}/{self.trace_total} requests with every span in the root's trace",
        ]
        for comp, c in sorted(self.by_component.items()):
            lines.append(f"  {comp}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        lines.extend(f"  WRONG: {w}" for w in self.wrong_examples[:10])
        return "\n".join(lines)


class System:
    def __init__(self, tmp: Path, sniff: bool = True) -> None:
        self.tmp = tmp
        self.suffix = uuid.uuid4().hex[:8]
        self.database = f"sniff_sys_{self.suffix}"
        self.images = [str(uuid.uuid4()) for _ in range(500)]
        self.gt_path = tmp / "ground-truth.jsonl"
        self.api_port, self.image_port = free_port(), free_port()
        self.procs: list[subprocess.Popen[str]] = []
        self.sniff: SniffProcess | None = None
        setup_database(3306, self.database, self.images)
        if sniff:
            self.sniff = SniffProcess(
                tmp,
                [
                    {"name": "rabbitmq", "protocol": "amqp", "upstream": "127.0.0.1:5672"},
                    {
                        "name": "mariadb",
                        "protocol": "mysql",
                        "upstream": "127.0.0.1:3306",
                        "capture_sql_literals": True,
                    },
                    {"name": "api", "protocol": "http", "upstream": f"127.0.0.1:{self.api_port}"},
                    {
                        "name": "image",
                        "protocol": "http",
                        "upstream": f"127.0.0.1:{self.image_port}",
                    },
                ],
            ).start()
            self.amqp, self.db = self.sniff.port(0), self.sniff.port(1)
            self.api_url = f"http://127.0.0.1:{self.sniff.port(2)}"
            self.image_via = self.sniff.port(3)
        else:
            self.amqp, self.db = 5672, 3306
            self.api_url = f"http://127.0.0.1:{self.api_port}"
            self.image_via = self.image_port

    def _spawn(self, module: str, *args: Any) -> None:
        p = subprocess.Popen(
            [sys.executable, "-m", f"demo.system.{module}", *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{module} did not start: {line!r}")
        self.procs.append(p)

    def start(self) -> System:
        common = ["--database", self.database, "--gt", self.gt_path]
        self._spawn("image", "--port", self.image_port, "--db-port", self.db, *common)
        for _ in range(2):
            self._spawn(
                "scheduler",
                "--db-port",
                self.db,
                "--amqp-port",
                self.amqp,
                "--suffix",
                self.suffix,
                *common,
            )
            self._spawn(
                "worker",
                "--db-port",
                self.db,
                "--amqp-port",
                self.amqp,
                "--image-port",
                self.image_via,
                "--suffix",
                self.suffix,
                *common,
            )
        self._spawn(
            "api",
            "--port",
            self.api_port,
            "--db-port",
            self.db,
            "--amqp-port",
            self.amqp,
            "--suffix",
            self.suffix,
            *common,
        )
        return self

    def load(self, requests_total: int, concurrency: int) -> list[str]:
        import requests

        local = threading.local()
        rnd = __import__("random").Random(42)
        images = [rnd.choice(self.images) for _ in range(requests_total)]

        def one(i: int) -> str:
            if not hasattr(local, "s"):
                local.s = requests.Session()
            tok = f"gt-{uuid.uuid4().hex[:12]}"
            r = local.s.post(
                f"{self.api_url}/v2.1/servers?gt={tok}",
                json={"name": f"vm{i}", "image": images[i]},
                headers={"X-Request-ID": f"req-{uuid.uuid4()}"},
                timeout=60,
            )
            r.raise_for_status()
            return tok

        with ThreadPoolExecutor(concurrency) as pool:
            toks = list(pool.map(one, range(requests_total)))
        return toks

    def wait_done(self, casts: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            done = sum(
                1
                for line in self.gt_path.read_text().splitlines()
                if '"component": "worker"' in line and '"done"' in line
            )
            if done >= casts:
                time.sleep(0.5)
                return
            time.sleep(0.1)
        raise TimeoutError(f"the workers finished fewer than {casts} casts in {timeout}s")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.sniff is not None:
            self.sniff.stop()
        drop_database(3306, self.database)

    def ground_truth(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.gt_path.read_text().splitlines() if line.strip()]


def span_key(s: Any) -> str | None:
    a = s.attrs
    if "db.query.text" in a:
        m = GT_RE.search(str(a["db.query.text"]))
        return f"sql:{m.group(0)}" if m else None
    if s.kind in ("PRODUCER", "CONSUMER") and a.get("messaging.message.id"):
        return f"amqp:{a['messaging.message.id']}"
    if s.kind == "SERVER":
        q = parse_qs(str(a.get("url.query", "")))
        if q.get("gt"):
            return f"http:{q['gt'][0]}"
    return None


def score(spans: list[Any], gt: list[dict[str, Any]], roots: list[str]) -> Score:
    sc = Score()
    calls: dict[str, Any] = {}  # key -> the call's span (SQL, PRODUCER, HTTP SERVER)
    units: dict[str, Any] = {}  # key -> the unit's span (CONSUMER that is not a reply, HTTP SERVER)
    consumers: list[Any] = []
    for s in spans:
        k = span_key(s)
        if k is None:
            continue
        if s.kind == "CONSUMER":
            consumers.append(s)
            if not s.attrs.get("sniff.amqp.rpc_response"):
                units[k] = s
        else:
            calls[k] = s
            if s.kind == "SERVER":
                units[k] = s

    def judge(span: Any, expected: Any | None, comp: str) -> None:
        sc.total += 1
        method = span.attrs.get("sniff.correlation.method", "none")
        if expected is None:
            ok = span.parent_id is None
            verdict = "right" if ok else "wrong"
        elif span.parent_id == expected.span_id and span.trace_id == expected.trace_id:
            verdict = "right"
        elif span.parent_id is None and any(lk.span_id == expected.span_id for lk in span.links):
            verdict = "linked"
        elif span.parent_id is not None:
            verdict = "wrong"
            sc.wrong_examples.append(
                f"{comp} {span.name} ({method}) parent {span.parent_id} "
                f"expected {expected.span_id} {expected.name}"
            )
        else:
            verdict = "unattached"
        setattr(sc, verdict, getattr(sc, verdict) + 1)
        sc.by_method[f"{verdict}:{method}"] += 1
        sc.by_component[comp][verdict] += 1

    cause_of: dict[str, str | None] = {}
    for line in gt:
        if "call" in line:
            cause_of[line["call"]] = line["cause"]
            span = calls.get(line["call"])
            if span is None:
                sc.missing += 1
                continue
            judge(span, units.get(line["cause"]), line["component"])
    producers = {k: s for k, s in calls.items() if s.kind == "PRODUCER"}
    for c in consumers:
        judge(c, producers.get(span_key(c) or ""), "consumer")
    for tok in roots:
        root = units.get(f"http:{tok}")
        if root is None:
            sc.missing += 1
            continue
        judge(root, None, "api (root)")
    # whole traces: every call whose cause chain leads to a root is in the root's trace.
    # A unit "amqp:<id>" is the delivery of the message whose publish is the call
    # "amqp:<id>", and a unit "http:<tok>" is the request that is the call "http:<tok>",
    # so a key's cause is always cause_of[key].
    roots_set = {f"http:{t}" for t in roots}

    def find_root(key: str) -> str | None:
        for _ in range(20):
            if key in roots_set:
                return key
            nxt = cause_of.get(key)
            if nxt is None:
                return None
            key = nxt
        return None

    by_root: dict[str, set[str]] = defaultdict(set)
    for key in cause_of:
        r = find_root(key)
        if r is not None:
            span = calls.get(key)
            if span is not None:
                by_root[r].add(span.trace_id)
    for tok in roots:
        root = units.get(f"http:{tok}")
        if root is None:
            continue
        sc.trace_total += 1
        traces = by_root.get(f"http:{tok}", set())
        if traces and traces == {root.trace_id}:
            sc.trace_ok += 1
    return sc


def run(tmp: Path, requests_total: int, concurrency: int) -> tuple[Score, Any]:
    system = System(tmp).start()
    try:
        roots = system.load(requests_total, concurrency)
        system.wait_done(requests_total)
    finally:
        system.stop()
    assert system.sniff is not None
    spans = system.sniff.spans()
    return score(spans, system.ground_truth(), roots), system


if __name__ == "__main__":
    import tempfile

    n, c = int(sys.argv[1]), int(sys.argv[2])
    result, _ = run(Path(tempfile.mkdtemp()), n, c)
    print(result.report(f"concurrency {c}"))
    os._exit(0)
