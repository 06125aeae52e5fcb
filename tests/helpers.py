"""Shared test helpers: free ports, a real ``sniff run`` subprocess, TOML writing."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(cfg: dict[str, Any]) -> str:
    """Enough TOML for sniff configs: scalars, tables, arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for k, v in cfg.items():
        if isinstance(v, dict) and k in ("export", "services", "correlate"):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for name, items in arrays:
        for t in items:
            lines.append(f"\n[[{name}]]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in t.items())
    for name, t in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in t.items())
    return "\n".join(lines) + "\n"


class SniffProcess:
    """``sniff run -c CONFIG`` as a real subprocess, stopped with SIGTERM."""

    def __init__(self, tmp: Path, proxies: list[dict[str, Any]], **top: Any) -> None:
        self.tmp = tmp
        self.capture = str(tmp / f"capture-{os.getpid()}-{time.monotonic_ns()}.db")
        self.proxies = []
        for p in proxies:
            p = dict(p)
            p.setdefault("listen", f"127.0.0.1:{free_port()}")
            self.proxies.append(p)
        # Tests that read events while sniff runs must not wait for idle CPU for the default
        # 30 s (a busy test machine makes the capture process defer decoding): 2 s here. The
        # deferral itself is tested with the default (tests/integration/test_capture_defer.py).
        cfg: dict[str, Any] = {"capture": self.capture, "proxy": self.proxies, "capture_defer": 2}
        cfg.update(top)
        self.config_path = tmp / f"sniff-{time.monotonic_ns()}.toml"
        self.config_path.write_text(to_toml(cfg))
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.returncode: int | None = None

    def port(self, index: int = 0) -> int:
        return int(self.proxies[index]["listen"].rsplit(":", 1)[1])

    def start(self, timeout: float = 30.0) -> SniffProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sniff", "run", "-c", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                if line.startswith("ready"):
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("sniff did not start:\n" + "".join(self.output))
        return self

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        time.sleep(0.05)
        return self.returncode

    def text(self) -> str:
        return "".join(self.output)

    def reader(self):  # type: ignore[no-untyped-def]
        from sniff.store import CaptureReader

        return CaptureReader(self.capture)

    def events(self, kind_prefix: str = "") -> list[Any]:
        r = self.reader()
        try:
            return [e for e in r.events() if e.kind.startswith(kind_prefix)]
        finally:
            r.close()

    def spans(self, **kw: Any) -> list[Any]:
        from correlate.offline import all_spans

        r = self.reader()
        try:
            return all_spans(r, **kw)
        finally:
            r.close()

    def __enter__(self) -> SniffProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class AsyncServer:
    """An asyncio TCP server on 127.0.0.1:<free port> in a background thread.

    ``handler(reader, writer)`` is a coroutine, as for ``asyncio.start_server``.
    """

    def __init__(self, handler: Any) -> None:
        import asyncio

        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._handler = handler
        self._ready = threading.Event()
        self._server: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import asyncio

        async def main() -> None:
            self._server = await asyncio.start_server(self._handler, "127.0.0.1", self.port)
            self._ready.set()
            async with self._server:
                await self._server.serve_forever()

        asyncio.set_event_loop(self.loop)
        with contextlib.suppress(BaseException):
            self.loop.run_until_complete(main())

    def __enter__(self) -> AsyncServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in __import__("asyncio").all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(stop)
        self._thread.join(5)


class RawSink:
    """A capture sink without a process, for in-process relay tests: the C shipper appends
    raw chunks to ``_buf`` (read them with ``sniff.capture_proc._unpack_raw``), events go to
    ``events``, and chunks that took the Python ship path (``emit_raw``) to ``slow``."""

    def __init__(self) -> None:
        from sniff.capture_proc import CaptureShipper

        self.events: list[Any] = []
        self.slow: list[tuple[int, int, bytes, Any]] = []
        self._buf = bytearray()
        self._lock = threading.Lock()
        self.raw_in = 0
        self.raw_out = 0
        self.max_raw_bytes = 1 << 30
        self._shipper = CaptureShipper

    def emit(self, ev: Any) -> None:
        self.events.append(ev)

    def emit_raw(self, conn: int, direction: int, ts: int, data: bytes, meta: Any = None) -> bool:
        self.slow.append((conn, direction, data, meta))
        return True

    def raw_shipper(self, ctx: Any, direction: int) -> Any:
        return self._shipper.raw_shipper(self, ctx, direction)  # type: ignore[arg-type]

    def _py_shipper(self, ctx: Any, direction: int, slow: Any) -> Any:
        return self._shipper._py_shipper(self, ctx, direction, slow)  # type: ignore[arg-type]
