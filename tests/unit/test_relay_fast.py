"""The relay's fast mode (sniff._shipper.Tee): once a handler only ships a direction,
the socket's protocol object forwards, counts and ships each chunk in C. In-process,
over real loopback sockets: the bytes both ways, the shipped copies and the byte
counts must be exactly what the slow path gives."""

from __future__ import annotations

import asyncio
import os

import pytest

from sniff import capture_proc, relay
from sniff.capture_proc import _unpack_raw
from sniff.config import Address, ProxyConfig
from sniff.events import ConnClose, Event
from tests.helpers import RawSink

pytestmark = pytest.mark.skipif(
    not relay.HAVE_C or capture_proc._PURE,
    reason="sniff._shipper is not built, or SNIFF_PURE_PYTHON=1 asks for the Python path",
)


class _ShipOnly(relay.Handler):
    """Ships both directions after the first client chunk (as the SQL handlers do once
    the startup packet is by); records whether the relay went fast."""

    observe = True
    rewrite_c2s = True

    def c2s(self, data: bytes) -> bytes:
        self.rewrite_c2s = False
        self.c2s = self.ctx.shipper(0)  # type: ignore[method-assign]
        self.s2c = self.ctx.shipper(1)  # type: ignore[method-assign]
        self.c2s(data)
        return data


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_fast_mode_forwards_ships_and_counts_every_byte() -> None:
    sink = RawSink()
    blob = os.urandom(3_000_000)

    async def main() -> tuple[bytes, bool]:
        up = await asyncio.start_server(_echo, "127.0.0.1", 0)
        up_port = up.sockets[0].getsockname()[1]
        cfg = ProxyConfig("t", "tcp", Address("127.0.0.1", 0), Address("127.0.0.1", up_port))
        lst = relay.RelayListener(cfg, sink, _ShipOnly)
        await lst.start()
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        got = bytearray()
        fast = False

        async def recv() -> None:
            while len(got) < len(blob):
                got.extend(await r.read(1 << 16))

        task = asyncio.create_task(recv())
        for i in range(0, len(blob), 4096):
            w.write(blob[i : i + 4096])
            await w.drain()
            await asyncio.sleep(0)  # let the relay (same loop) read it
            for conn in lst.conns:
                fast = fast or (conn.c_side is not None and conn.c_side.fast)
        await task
        w.close()
        await asyncio.sleep(0.1)
        await lst.stop()
        up.close()
        return bytes(got), fast

    got, fast = asyncio.run(main())
    assert got == blob
    assert fast  # the client side went fast after the first chunk
    assert not sink.slow  # every copy went through the C shipper
    chunks: list[Event] = []
    _unpack_raw(sink._buf, chunks)
    for direction in (0, 1):
        shipped = b"".join(c.data for c in chunks if c.direction == direction)  # type: ignore[attr-defined]
        assert shipped == blob, direction
    closes = [e for e in sink.events if isinstance(e, ConnClose)]
    assert (closes[0].bytes_from_client, closes[0].bytes_from_server) == (len(blob), len(blob))
