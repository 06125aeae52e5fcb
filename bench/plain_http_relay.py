"""A plain no-decode asyncio relay (sniff's relay with a passthrough handler, on
uvloop) in its own process: the baseline the HTTP fast path is compared with.

    .venv/bin/python bench/plain_http_relay.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT

``start_plain_relay(listen_port, host, port)`` starts it and returns the process
once the port accepts connections.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class _NullSink:
    def emit(self, ev: object) -> None:
        pass


async def _serve(listen_port: int, host: str, port: int) -> None:
    from sniff.config import Address, ProxyConfig
    from sniff.relay import Handler, RelayListener

    cfg = ProxyConfig("plain", "tcp", Address("127.0.0.1", listen_port), Address(host, port))
    lst = RelayListener(cfg, _NullSink(), Handler)
    await lst.start()
    await asyncio.Event().wait()


def start_plain_relay(listen_port: int, host: str, port: int) -> subprocess.Popen[bytes]:
    from tests.helpers import wait_port

    p = subprocess.Popen(
        [sys.executable, __file__, str(listen_port), host, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(listen_port)
    return p


if __name__ == "__main__":
    import uvloop

    uvloop.run(_serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
