"""Real upstreams for the HTTP tests: an aiohttp app in a background thread, and
nginx (Debian package) for HTTP/2 (h2c prior knowledge, TLS with ALPN h2).

The aiohttp app reports what it received, so tests can check the traceparent
the upstream saw and body digests in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, WSMsgType, web

from tests.helpers import free_port, wait_port


def pattern(n: int, seed: int = 0) -> bytes:
    """n deterministic bytes (cheap to make, easy to check)."""
    block = hashlib.sha256(f"sniff-{seed}".encode()).digest() * 2048  # 64 KiB
    reps = n // len(block) + 1
    return (block * reps)[:n]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


async def _echo(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        n += len(chunk)
    body = {
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "raw_headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_sha256": h.hexdigest(),
        "body_len": n,
        "chunked": request.headers.get("transfer-encoding", "").lower() == "chunked",
    }
    headers = {}
    if "x-openstack-request-id" in request.headers:
        headers["X-Openstack-Request-Id"] = request.headers["x-openstack-request-id"]
    else:
        headers["X-Openstack-Request-Id"] = "req-5f3e8a1c-0c4e-4b7e-9d0a-2b1f6c7d8e9f"
    return web.json_response(body, headers=headers)


async def _bytes(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    data = pattern(n, int(request.query.get("seed", "0")))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = n
    await resp.prepare(request)
    if request.method == "HEAD":  # aiohttp would send what is written, even for HEAD
        await resp.write_eof()
        return resp
    for i in range(0, n, 256 * 1024):
        await resp.write(data[i : i + 256 * 1024])
    await resp.write_eof()
    return resp


async def _chunked(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    data = pattern(n, int(request.query.get("seed", "0")))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    step = int(request.query.get("step", str(64 * 1024)))
    for i in range(0, n, step):
        await resp.write(data[i : i + step])
    await resp.write_eof()
    return resp


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if code in (204, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code}\n")


async def _cookie(request: web.Request) -> web.Response:
    resp = web.Response(text="cookie set\n")
    resp.headers["Set-Cookie"] = "session=top-secret-cookie; Path=/"
    resp.headers["X-Subject-Token"] = "gAAAAA-top-secret-subject-token"
    return resp


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("ms", "100")) / 1000)
    return web.Response(text="slow\n")


async def _cut(request: web.Request) -> web.StreamResponse:
    """Headers and part of the body, then the connection is cut."""
    resp = web.StreamResponse()
    resp.content_length = 100_000
    await resp.prepare(request)
    await resp.write(b"x" * 1000)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return resp


async def _chain(request: web.Request) -> web.Response:
    """Serve a request by calling another service (the URL in ``to``), passing the
    request id on, as an OpenStack service does."""
    rid = request.headers.get("X-Openstack-Request-Id", "req-chain")
    sess = request.app[CLIENT]  # one pooled client, like a service's: connections stay open
    async with sess.get(request.query["to"], headers={"X-Openstack-Request-Id": rid}) as r:
        body = await r.read()
    return web.Response(text=f"chained {r.status} {len(body)}\n")


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


CLIENT = web.AppKey("client", ClientSession)


async def _client_ctx(app: web.Application) -> Any:
    app[CLIENT] = ClientSession()
    yield
    await app[CLIENT].close()


def make_app() -> web.Application:
    app = web.Application(client_max_size=1 << 30)
    app.cleanup_ctx.append(_client_ctx)
    for path in ("/echo", "/echo/{tail:.*}", "/v2.1/servers/{sid}", "/v2.1/servers/{sid}/action"):
        app.router.add_route("*", path, _echo)
    app.router.add_get("/bytes/{n}", _bytes)
    app.router.add_get("/chunked/{n}", _chunked)
    app.router.add_route("*", "/status/{code}", _status)
    app.router.add_get("/cookie", _cookie)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/cut", _cut)
    app.router.add_get("/ws", _ws)
    app.router.add_get("/chain", _chain)
    return app


class AppServer:
    """The aiohttp app on 127.0.0.1:<free port>, served from a background thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._runner = web.AppRunner(make_app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def __enter__(self) -> AppServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("aiohttp upstream did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        fut = asyncio.run_coroutine_threadsafe(stop(), self.loop)
        with contextlib.suppress(Exception):
            fut.result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/cb; proxy_temp_path {tmp}/pt; fastcgi_temp_path {tmp}/ft;
  uwsgi_temp_path {tmp}/ut; scgi_temp_path {tmp}/st;
  server {{
    listen 127.0.0.1:{h2c} http2;
    location / {{ add_header X-Upstream h2c; return 200 "h2c tp=$http_traceparent path=$request_uri proto=$server_protocol\\n"; }}
    location /big {{ alias {tmp}/big.bin; }}
  }}
  server {{
    listen 127.0.0.1:{tls} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{ add_header X-Upstream tls; return 200 "tls tp=$http_traceparent path=$request_uri proto=$server_protocol\\n"; }}
    location /big {{ alias {tmp}/big.bin; }}
  }}
  server {{
    listen 127.0.0.1:{plain};
    location / {{ return 200 "hello world\\n"; }}
  }}
}}
"""


class Nginx:
    """nginx from Debian packages: h2c prior knowledge, TLS (h2 + http/1.1), and plain."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="sniff-nginx-"))
        self.h2c = free_port()
        self.tls = free_port()
        self.plain = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ca = self.tmp / "tls" / "ca.pem"

    def __enter__(self) -> Nginx:
        from proxies.http.tls import ensure_leaf

        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        cert, key, ca = ensure_leaf(self.tmp / "tls", "upstream", "127.0.0.1")
        self.ca = ca
        (self.tmp / "big.bin").write_bytes(pattern(3 * 1024 * 1024, 7))
        # nginx workers run as an unprivileged user: let them read what they serve
        self.tmp.chmod(0o755)
        (self.tmp / "big.bin").chmod(0o644)
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                tmp=self.tmp, h2c=self.h2c, tls=self.tls, plain=self.plain, cert=cert, key=key
            )
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(self.tmp)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in (self.h2c, self.tls, self.plain):
            wait_port(port)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_for(fn: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll ``fn`` until it returns something truthy (events reach the capture in batches)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    return last


def env_without_proxies() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def loads(b: bytes) -> Any:
    return json.loads(b)
