"""A plain TCP relay: the baseline every proxy benchmark compares sniff with.

    python bench/plain_relay.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT

What a competent engineer would write for a transparent relay in Python, and
nothing more: uvloop, asyncio ``Protocol`` callbacks (no streams, no task per
chunk), writes straight to the other transport, backpressure with
``pause_reading``/``resume_reading`` on the write-buffer watermarks, half-close
passed on, TCP_NODELAY (asyncio sets it by default), no decoding at all. It
listens on 127.0.0.1 only.

From another program (``bench/mysql.py``, ``bench/postgres.py``)::

    from bench.plain_relay import start_plain_relay
    relay = start_plain_relay(listen_port, "127.0.0.1", 3306)  # a subprocess, ready
    ...
    relay.stop()

It runs in its own process so that, like sniff, it has a core's worth of event
loop to itself and never shares a GIL with the load generator.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024


class _Half(asyncio.Protocol):
    """One socket; ``peer`` is the other side's protocol."""

    def __init__(self, peer: _Half | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.pending: list[bytes] = []  # bytes that arrived before the peer was connected
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Half):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host = host
        self.port = port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]  # until upstream is there
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        server = _Half(self)
        try:
            await loop.create_connection(lambda: server, self.host, self.port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.peer = server
        assert server.transport is not None and self.transport is not None
        for chunk in server.pending:  # a server that speaks first (MySQL's greeting)
            self.transport.write(chunk)
        server.pending.clear()
        for chunk in self.pending:
            server.transport.write(chunk)
        self.pending.clear()
        if self.eof and server.transport.can_write_eof():
            server.transport.write_eof()
        self.transport.resume_reading()


async def serve(listen_port: int, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: _Client(host, port), "127.0.0.1", listen_port, reuse_address=True, backlog=1024
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with srv:
        await stop.wait()


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: plain_relay.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))


class RelayHandle:
    """A running plain relay subprocess."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> RelayHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_plain_relay(listen_port: int, host: str, port: int, timeout: float = 10.0) -> RelayHandle:
    """Start the relay in a subprocess; return once it accepts connections."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(listen_port), host, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"plain relay did not start: {line!r}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", listen_port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    return RelayHandle(proc, listen_port)


if __name__ == "__main__":
    main()
