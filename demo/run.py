"""The demo: a small OpenStack-like control plane traced by sniff, black-box.

Components (demo/system/, plain Python services that know nothing of sniff):
``api`` (HTTP, one threaded process) records a server in MariaDB, asks a
``scheduler`` for a host over an RPC call on RabbitMQ, updates the row and
casts a build to a ``worker``; the workers update MariaDB and fetch the image
from the ``image`` service over HTTP. sniff sits in front of RabbitMQ, MariaDB
and both HTTP services. The demo sends "create server" requests, then prints:

1. ``sniff stats``: what the capture holds, per protocol and service;
2. ``sniff report``: per operation, what each component did per request
   (statements by operation and table, HTTP requests, messages and sizes);
3. ``sniff traces``: one "create server" as a tree across all components;
4. how sniff's parents compare with the ground truth the services recorded.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.system.harness import System, score  # noqa: E402


def sniff(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sniff", *args], cwd=ROOT, check=True)


def main() -> int:
    requests_total = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    tmp = Path(tempfile.mkdtemp(prefix="sniff-demo-"))
    print(
        f"== starting sniff (RabbitMQ, MariaDB, api, image proxies) and the services; work dir {tmp}",
        flush=True,
    )
    system = System(tmp).start()
    assert system.sniff is not None
    print(system.sniff.text(), end="", flush=True)
    try:
        print(
            f"== sending {requests_total} 'create server' requests, {concurrency} at a time",
            flush=True,
        )
        roots = system.load(requests_total, concurrency)
        system.wait_done(requests_total)
    finally:
        system.stop()
    capture = system.sniff.capture
    print(f"\n== sniff stats {capture}\n", flush=True)
    sniff("stats", capture)
    print(f"\n== sniff report {capture}\n", flush=True)
    sniff("report", capture)
    print(f"\n== sniff traces {capture} --operation POST --limit 1\n", flush=True)
    sniff("traces", capture, "--operation", "POST", "--limit", "1")
    out = ROOT / "demo-out"
    out.mkdir(exist_ok=True)
    sniff("export", capture, "--jaeger-json", str(out / "traces.json"))
    result = score(system.sniff.spans(), system.ground_truth(), roots)
    print("\n== sniff's parents against the ground truth the services recorded\n")
    print(result.report(f"{requests_total} requests at concurrency {concurrency}"))
    print(f"\ncapture: {capture}\nJaeger UI: open {out / 'traces.json'} (Search > JSON File)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
