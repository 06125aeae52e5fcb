"""One sniff process for the HTTP integration tests, with a proxy per path under
test, in front of real upstreams (aiohttp, nginx) started here. Module scope:
sniff with mitmproxy takes a second or two to start, the tests take less."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SniffProcess
from tests.integration.http.upstream import AppServer, Nginx, wait_for
from tests.otlp_receiver import OtlpHttpReceiver

SECRET_TOKEN = "gAAAAAB-integration-secret-token"
SECRET_QUERY = "hunter2-query-secret"


def flatten(events: list[Any]) -> list[Any]:
    """http.exchange and http.exchanges events -> HttpExchange items, in order."""
    out: list[Any] = []
    for e in events:
        if e.kind == "http.exchanges":
            out.extend(e.exchanges())
        elif e.kind == "http.exchange":
            out.append(e)
    return out


class Http:
    """The running setup: ports by proxy name, events and spans by proxy."""

    def __init__(self, proc: SniffProcess, names: list[str], app: AppServer, nginx: Nginx,
                 state: Path, otlp: OtlpHttpReceiver) -> None:  # fmt: skip
        self.proc = proc
        self.names = names
        self.app = app
        self.nginx = nginx
        self.state = state
        self.otlp = otlp

    def port(self, name: str) -> int:
        return self.proc.port(self.names.index(name))

    def url(self, name: str, path: str = "/", scheme: str = "http") -> str:
        host = "localhost" if scheme == "https" else "127.0.0.1"
        return f"{scheme}://{host}:{self.port(name)}{path}"

    @property
    def ca(self) -> str:
        return str(self.state / "tls" / "ca.pem")

    def all_exchanges(self) -> list[Any]:
        """Every HttpExchange in the capture, batches flattened."""
        return flatten(self.proc.events("http.exchange"))

    def exchanges(
        self, proxy: str, path_prefix: str = "", n: int = 1, timeout: float = 10
    ) -> list[Any]:
        def get() -> list[Any]:
            got = [
                e
                for e in self.all_exchanges()
                if e.proxy == proxy and (e.path or "").startswith(path_prefix)
            ]
            return got if len(got) >= n else []

        return wait_for(get, timeout) or []

    def spans(self, proxy: str, path_prefix: str = "", n: int = 1) -> list[Any]:
        self.exchanges(proxy, path_prefix, n)
        return [
            s
            for s in self.proc.spans()
            if s.kind == "SERVER"
            and s.service == proxy
            and str(s.attrs.get("url.path", "")).startswith(path_prefix)
        ]


PROXIES = [
    ("app", "http", "app", {"routes": ["/v2.1/servers/{server_id}"],
                            "redact_headers": ["x-custom-secret"],
                            "redact_query": ["mysecret"],
                            "user_agents": {"nova-compute": "nova-compute"}}),
    ("app-noinject", "http", "app", {"inject": False}),
    ("h2c", "http", "nginx-h2c", {}),
    ("tls", "https", "app", {}),
    ("tls-up", "https", "nginx-tls", {"upstream_tls": True}),
    ("mitm", "http", "app", {"engine": "mitmproxy"}),
    ("nginx-plain", "http", "nginx-plain", {}),
    ("no-h2", "http", "nginx-h2c", {"http2": False}),
]  # fmt: skip


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Http]:
    tmp = tmp_path_factory.mktemp("sniff-http")
    state = tmp / "state"
    with AppServer() as app, Nginx() as nginx, OtlpHttpReceiver() as otlp:
        upstreams = {
            "app": f"127.0.0.1:{app.port}",
            "nginx-h2c": f"127.0.0.1:{nginx.h2c}",
            "nginx-tls": f"127.0.0.1:{nginx.tls}",
            "nginx-plain": f"127.0.0.1:{nginx.plain}",
        }
        proxies = []
        for name, proto, up, opts in PROXIES:
            p = {
                "name": name,
                "protocol": proto,
                "upstream": upstreams[up],
                "state_dir": str(state),
            }
            p.update(opts)
            if opts.get("upstream_tls"):
                p["upstream_ca"] = str(nginx.ca)
            proxies.append(p)
        proc = SniffProcess(
            tmp,
            proxies,
            identify_processes=False,
            export={"otlp": otlp.url},
        ).start()
        try:
            yield Http(proc, [p[0] for p in PROXIES], app, nginx, state, otlp)
        finally:
            proc.stop()
