"""What a request causes: a service that calls another while serving a request
(with the request id passed on, as OpenStack services do) puts the second
SERVER span under the first; slow requests are announced while in flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from proxies.http.events import HttpRequest
from tests.integration.http.upstream import AppServer, Nginx, wait_for


def test_a_call_made_while_serving_joins_the_request_trace(sniff_run: Any, tmp_path: Path) -> None:
    with AppServer() as app, Nginx() as nginx:
        proc = sniff_run(
            [
                {"name": "front", "protocol": "http", "upstream": f"127.0.0.1:{app.port}",
                 "state_dir": str(tmp_path / "state"), "http2": False},
                {"name": "back", "protocol": "http", "upstream": f"127.0.0.1:{nginx.plain}",
                 "state_dir": str(tmp_path / "state"), "http2": False},
            ]
        )  # fmt: skip
        s = requests.Session()
        s.trust_env = False
        back = f"http://127.0.0.1:{proc.port(1)}/v2.0/ports/42"
        r = s.get(
            f"http://127.0.0.1:{proc.port(0)}/chain",
            params={"to": back},
            headers={"X-Openstack-Request-Id": "req-causal-1"},
        )
        assert r.status_code == 200 and r.text.startswith("chained 200")
        r = s.get(f"http://127.0.0.1:{proc.port(0)}/slow", params={"ms": "1800"})
        assert r.status_code == 200
        early = wait_for(lambda: [e for e in proc.events("http.request") if e.path == "/slow"])
        proc.stop()
        spans = [s for s in proc.spans() if s.kind == "SERVER"]
    front = next(s for s in spans if s.service == "front" and s.attrs["url.path"] == "/chain")
    inner = next(s for s in spans if s.service == "back")
    assert inner.parent_id == front.span_id and inner.trace_id == front.trace_id
    assert inner.attrs["sniff.correlation.method"] in ("shared_id", "timing")
    assert front.parent_id is None  # never its own parent, though both ends are one process
    assert inner.attrs["http.route"] == "/v2.0/ports/{id}"
    # the slow request was announced while in flight, and still ends as one span
    assert early and isinstance(early[0], HttpRequest)
    slow = [s for s in spans if s.attrs.get("url.path") == "/slow"]
    assert len(slow) == 1 and slow[0].span_id == early[0].span_id
    assert slow[0].end - slow[0].start >= 1_800_000_000
