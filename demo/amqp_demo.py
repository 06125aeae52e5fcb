"""The AMQP demo: sniff in front of the local RabbitMQ, a small system through it.

Three components talk over RabbitMQ through sniff (none of them knows it is
traced): an ``api`` that casts a task and makes an RPC call, a ``worker`` that
consumes tasks, and a ``conductor`` that answers RPCs. Afterwards the demo
prints what sniff captured (``sniff stats``) and the linked spans as trees
(``sniff traces``): every publish joined to its deliveries, the RPC reply in
its request's trace.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import aio_pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.helpers import free_port  # noqa: E402


async def worker(url: str, tasks: str, done: asyncio.Event, expect: int) -> None:
    conn = await aio_pika.connect(url, client_properties={"connection_name": "worker"})
    ch = await conn.channel()
    q = await ch.declare_queue(tasks, auto_delete=True)
    seen = 0

    async def on(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen
        async with msg.process():  # acks on exit
            await asyncio.sleep(0.005)  # "work"
        seen += 1
        if seen == expect:
            done.set()

    await q.consume(on)
    await done.wait()
    await conn.close()


async def conductor(url: str, rpc: str, stop: asyncio.Event) -> None:
    conn = await aio_pika.connect(url, client_properties={"connection_name": "conductor"})
    ch = await conn.channel()
    q = await ch.declare_queue(rpc, auto_delete=True)

    async def on(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with msg.process():
            await ch.default_exchange.publish(
                aio_pika.Message(b'{"host": "compute-1"}', correlation_id=msg.correlation_id),
                routing_key=msg.reply_to or "",
            )

    await q.consume(on)
    await stop.wait()
    await conn.close()


async def api(url: str, tasks: str, rpc: str, n: int) -> None:
    conn = await aio_pika.connect(url, client_properties={"connection_name": "api"})
    ch = await conn.channel(publisher_confirms=True)
    replies = await ch.declare_queue(exclusive=True)
    pending: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with msg.process():
            pending.pop(msg.correlation_id or "").set_result(msg.body)

    await replies.consume(on_reply)
    loop = asyncio.get_running_loop()
    for i in range(n):
        corr = f"req-{i}"
        pending[corr] = loop.create_future()
        await ch.default_exchange.publish(  # an RPC "call": select a host
            aio_pika.Message(
                b'{"method": "select_destinations"}',
                correlation_id=corr,
                reply_to=replies.name,
                message_id=f"call-{i}",
            ),
            routing_key=rpc,
        )
        await asyncio.wait_for(pending[corr], 10)
        await ch.default_exchange.publish(  # a "cast": build the instance
            aio_pika.Message(
                b'{"method": "build_and_run_instance"}' + b" " * 900, message_id=f"cast-{i}"
            ),
            routing_key=tasks,
        )
    await conn.close()


async def system(url: str, n: int) -> None:
    tasks, rpc = f"demo-tasks-{os.getpid()}", f"demo-rpc-{os.getpid()}"
    done, stop = asyncio.Event(), asyncio.Event()
    w = asyncio.create_task(worker(url, tasks, done, n))
    c = asyncio.create_task(conductor(url, rpc, stop))
    await asyncio.sleep(0.5)
    await api(url, tasks, rpc, n)
    await asyncio.wait_for(done.wait(), 20)
    stop.set()
    await asyncio.gather(w, c)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sniff-demo-"))
    capture = tmp / "demo.db"
    port = free_port()
    sniff = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sniff",
            "run",
            "--proxy",
            f"rabbitmq@amqp:127.0.0.1:{port}=127.0.0.1:5672",
            "--capture",
            str(capture),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sniff.stdout is not None
        for line in sniff.stdout:  # wait for "ready" without opening a probe connection
            print(line, end="", flush=True)
            if line.startswith("ready"):
                break
        threading.Thread(
            target=lambda: [print(x, end="") for x in sniff.stdout], daemon=True
        ).start()
        print(
            f"\n== demo: api, worker and conductor talk to RabbitMQ through sniff on 127.0.0.1:{port}\n",
            flush=True,
        )
        asyncio.run(system(f"amqp://guest:guest@127.0.0.1:{port}/", n=3))
    finally:
        sniff.send_signal(signal.SIGTERM)
        sniff.wait(30)
    sniff_cmd = [sys.executable, "-m", "sniff"]
    print("\n== sniff stats " + str(capture) + "\n", flush=True)
    subprocess.run([*sniff_cmd, "stats", str(capture)], cwd=ROOT, check=True)
    print("\n== sniff traces " + str(capture) + "\n", flush=True)
    subprocess.run([*sniff_cmd, "traces", str(capture)], cwd=ROOT, check=True)
    print(
        f"\ncapture kept at {capture}; try: .venv/bin/sniff export {capture} --jaeger-json traces.json"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
