"""The relay itself (protocol = "tcp", no decoding): transparency under load,
half-close, backpressure, concurrency, and upstream failures."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from typing import Any

import pytest

from sniff.events import ConnClose, ConnOpen, UpstreamError
from tests.helpers import AsyncServer, free_port


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()  # half-close: our direction ends after theirs
        await writer.drain()
    finally:
        writer.close()


async def _digest_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read until the client's EOF, then answer with the digest: needs half-close."""
    h = hashlib.sha256()
    while data := await reader.read(1 << 16):
        h.update(data)
    writer.write(h.hexdigest().encode())
    await writer.drain()
    writer.close()


def _tcp(sniff_run: Any, upstream_port: int, **extra: Any) -> Any:
    return sniff_run([{"protocol": "tcp", "upstream": f"127.0.0.1:{upstream_port}", **extra}])


def test_bytes_identical_both_ways_under_load(sniff_run: Any) -> None:
    with AsyncServer(_echo) as up:
        proc = _tcp(sniff_run, up.port)
        blob = os.urandom(32 * 1024 * 1024)

        async def main() -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", proc.port())

            async def send() -> None:
                for i in range(0, len(blob), 1 << 20):
                    w.write(blob[i : i + (1 << 20)])
                    await w.drain()
                w.write_eof()

            got = bytearray()

            async def recv() -> None:
                while data := await r.read(1 << 20):
                    got.extend(data)

            await asyncio.gather(send(), recv())
            w.close()
            return bytes(got)

        got = asyncio.run(main())
        assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
        proc.stop()
        closes = [e for e in proc.events("core.conn_close") if isinstance(e, ConnClose)]
        assert closes[0].bytes_from_client == closes[0].bytes_from_server == len(blob)


def test_half_close_is_passed_on(sniff_run: Any) -> None:
    with AsyncServer(_digest_then_close) as up:
        proc = _tcp(sniff_run, up.port)
        data = os.urandom(3_000_000)
        with socket.create_connection(("127.0.0.1", proc.port())) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.decode() == hashlib.sha256(data).hexdigest()


def test_slow_reader_backpressure_bounds_memory(sniff_run: Any) -> None:
    total = 200 * 1024 * 1024

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"z" * (1 << 20)
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    with AsyncServer(firehose) as up:
        proc = _tcp(sniff_run, up.port)
        pid = proc.proc.pid

        def rss() -> int:
            with open(f"/proc/{pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024

        base = rss()
        got = 0
        peak = base
        with socket.create_connection(("127.0.0.1", proc.port())) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got += len(data)
                if got % (8 << 20) < 65536:
                    time.sleep(0.02)  # a slow consumer
                    peak = max(peak, rss())
        assert got == total
        # the proxy must not buffer the firehose: a few write buffers at most
        assert peak - base < 32 * 1024 * 1024, f"proxy RSS grew by {(peak - base) >> 20} MiB"


def test_many_concurrent_connections(sniff_run: Any) -> None:
    with AsyncServer(_echo) as up:
        proc = _tcp(sniff_run, up.port)

        async def one(i: int) -> bool:
            r, w = await asyncio.open_connection("127.0.0.1", proc.port())
            msg = f"hello {i} ".encode() * 100
            w.write(msg)
            w.write_eof()
            got = await r.read(-1)
            w.close()
            return got == msg

        async def main() -> list[bool]:
            return await asyncio.gather(*(one(i) for i in range(300)))

        assert all(asyncio.run(main()))
        proc.stop()
        assert len([e for e in proc.events("core.conn_open") if isinstance(e, ConnOpen)]) == 300


def test_upstream_refused_closes_client_promptly(sniff_run: Any) -> None:
    dead = free_port()
    proc = _tcp(sniff_run, dead)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", proc.port())) as s:
        s.settimeout(5)
        assert s.recv(10) == b""  # closed by the proxy
    assert time.monotonic() - t0 < 1.0
    proc.stop()
    errs = [e for e in proc.events("core.upstream_error") if isinstance(e, UpstreamError)]
    assert errs and errs[0].reason == "connection refused"
    assert f"upstream 127.0.0.1:{dead} unreachable (connection refused)" in proc.text()


def test_upstream_that_dies_mid_connection(sniff_run: Any) -> None:
    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(10)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # linger 0: an RST, as from a crashed server

    with AsyncServer(die) as up:
        proc = _tcp(sniff_run, up.port)
        with socket.create_connection(("127.0.0.1", proc.port())) as s:
            s.settimeout(5)
            s.sendall(b"hello")
            t0 = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(10) == b""
            assert time.monotonic() - t0 < 1.0
        # the proxy survives and keeps serving
        with socket.create_connection(("127.0.0.1", proc.port())) as s:
            s.sendall(b"again")
        proc.stop()
        assert proc.returncode == 0
        closes = [e for e in proc.events("core.conn_close") if isinstance(e, ConnClose)]
        dead = closes[0]
        assert dead.closed_by == "server" and "server connection lost" in dead.reason


def test_port_in_use_exits_nonzero(sniff_run: Any, tmp_path: Any) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "sniff",
                "run",
                "--proxy",
                f"tcp:127.0.0.1:{port}=127.0.0.1:1",
                "--capture",
                str(tmp_path / "c.db"),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in r.stderr


@pytest.mark.parametrize(
    "toml,expect",
    [
        ('[[proxy]]\nprotocol = "amqp"\nlisten = "127.0.0.1:5673"\n', "proxy[0].upstream: missing"),
        (
            '[[proxy]]\nprotocol = "kafka"\nlisten = "1:2"\nupstream = "1:3"\n',
            "proxy[0].protocol: unknown protocol 'kafka'",
        ),
        (
            '[[proxy]]\nprotocol = "amqp"\nlisten = "127.0.0.1"\nupstream = "127.0.0.1:5672"\n',
            "proxy[0].listen: '127.0.0.1' has no port",
        ),
        (
            '[[proxy]]\nprotocol = "amqp"\nlisten = "127.0.0.1:99999"\nupstream = "127.0.0.1:5672"\n',
            "out of range",
        ),
        (
            '[[proxy]]\nprotocol = "amqp"\nlisten = "127.0.0.1:5673"\nupstream = "127.0.0.1:5672"\ninject = "yes"\n',
            "proxy[0].inject: expected true or false",
        ),
        (
            '[[proxy]]\nprotocol = "amqp"\nlisten = "127.0.0.1:5673"\nupstream = "127.0.0.1:5672"\nbogus = 1\n',
            "proxy[0].bogus: unknown key",
        ),
        ('[proxy]\nprotocol = "amqp"\n', "write each proxy as [[proxy]]"),
        (
            '[export]\notlp = "localhost:4318"\n',
            "export.otlp: 'localhost:4318' must start with http://",
        ),
        ("capture = 5\n", "capture: expected a string"),
        ('[services]\n"not-an-ip" = "x"\n', "services.'not-an-ip': not an IP address or CIDR"),
        ("this is = not toml [", "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Any, toml: str, expect: str) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT

    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    r = subprocess.run(
        [sys.executable, "-m", "sniff", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr, r.stderr
