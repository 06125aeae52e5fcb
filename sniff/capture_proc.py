"""The capture process: events leave the proxy process as soon as possible.

Why. Measured on the SQL proxies, the work done with each event after the hot
path (``prepare()``'s statement analysis, JSON, SQLite, live correlation, /proc
lookups) cost more than the relay itself, and on a thread of the proxy process
it took the GIL away from the event loop. In ``sniff run`` that work runs in a
child process at a lower CPU priority (nice +10): under CPU pressure traffic
wins and telemetry waits, and if it falls too far behind, events are dropped
and counted rather than slowing traffic.

How. The proxy side (:class:`CaptureShipper`) keeps the same ``emit`` contract
as the in-process writer: a length check and a ``deque.append``. A shipper
thread wakes every ``interval``, serialises the batch with one orjson call (the
only per-event cost left in the proxy process) and writes it to the child's
stdin. Events travel as pickled positional tuples of their fields: measured
~2 us per event where orjson over the dataclasses took ~4 us; the pipe is
private to sniff's own two processes, so pickle's trust model is met. A full pipe blocks the shipper, never the event loop; the deque
then fills and further events are dropped and counted. The child
(``python -m sniff.capture_proc``) rebuilds the events and hands each batch to
a :class:`sniff.store.Recorder`.

Frames on the pipe: ``length:4 type:1 payload``; ``C`` config (JSON, first),
``E`` a batch (pickled list of ``(kind, field values)``), ``Q`` quit (JSON: dropped count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from operator import attrgetter
from typing import IO, Any, BinaryIO

import orjson

from sniff.events import Event, event_class

log = logging.getLogger("sniff.capture")

_HDR = struct.Struct(">IB")
MAX_BATCH = 20_000


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _HDR.pack(len(payload), kind[0]) + payload


class CaptureShipper:
    """Proxy side: ``emit`` events; they are written by a child capture process."""

    def __init__(
        self,
        settings: dict[str, Any],
        max_queue: int = 200_000,
        interval: float = 0.05,
        max_raw_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.path = str(settings["capture"])
        self.max_queue = max_queue
        self.interval = interval
        self.max_raw_bytes = max_raw_bytes
        self.raw_bytes = 0  # raw bytes queued, not yet shipped
        self.dropped = 0
        self.dropped_raw_bytes = 0
        self.shipped = 0
        self.recorded: int | None = None  # events the capture process wrote (known at close)
        # Events, or (kind, field values) tuples from emit_fields/emit_raw
        self._q: deque[Any] = deque()
        self._stop = threading.Event()
        self._getters: dict[type, Any] = {}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sniff.capture_proc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches sniff run, which then closes the pipe
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._pipe: IO[bytes] = self.proc.stdin
        self._pipe.write(_frame(b"C", orjson.dumps(settings)))
        self._pipe.flush()
        ready = self.proc.stdout.readline()
        if not ready.startswith(b"ready"):
            self.proc.wait(10)
            raise RuntimeError(
                f"the capture process did not start: {ready.decode(errors='replace').strip()}"
            )
        self._thread = threading.Thread(target=self._run, name="sniff-shipper", daemon=True)
        self._thread.start()

    @property
    def written(self) -> int:
        """Events in the capture: what the capture process wrote once it has finished
        (decoded events from shipped bytes included), else what has been shipped."""
        return self.shipped if self.recorded is None else self.recorded

    def emit(self, ev: Event) -> None:
        if len(self._q) >= self.max_queue:
            self.dropped += 1
            return
        self._q.append(ev)

    def emit_raw(self, conn: int, direction: int, ts: int, data: bytes, meta: Any = None) -> bool:
        """Forwarded bytes to decode in the capture process; False if over budget."""
        n = len(data)
        if self.raw_bytes + n > self.max_raw_bytes or len(self._q) >= self.max_queue:
            self.dropped_raw_bytes += n
            return False
        self.raw_bytes += n
        self._q.append(("core.raw", (ts, conn, direction, data, meta)))
        return True

    def emit_fields(self, cls: type[Event], values: tuple[Any, ...]) -> None:
        """An event given as its class and positional field values, shipped as is."""
        if len(self._q) >= self.max_queue:
            self.dropped += 1
            return
        self._q.append((cls.kind, values))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._ship()
        self._ship()

    def _ship(self) -> None:
        q = self._q
        while q:
            n = min(len(q), MAX_BATCH)
            batch = [q.popleft() for _ in range(n)]
            try:
                getters = self._getters
                rows = []
                raw = 0
                for ev in batch:
                    if ev.__class__ is tuple:  # already (kind, values): emit_fields, emit_raw
                        rows.append(ev)
                        if ev[0] == "core.raw":
                            raw += len(ev[1][3])
                        continue
                    g = getters.get(ev.__class__)
                    if g is None:
                        g = getters[ev.__class__] = attrgetter(
                            *(f.name for f in dataclasses.fields(ev))
                        )
                    rows.append((ev.kind, g(ev)))
                payload = pickle.dumps(rows, protocol=5)
                self._pipe.write(_frame(b"E", payload))
                self._pipe.flush()
                self.shipped += n
                self.raw_bytes -= raw
            except (BrokenPipeError, OSError, ValueError):
                self.dropped += n
                if self.proc.poll() is not None:
                    log.error(
                        "the capture process exited (status %s); events are being dropped",
                        self.proc.returncode,
                    )
                    q.clear()
                    return
            except Exception:
                log.exception("capture: could not serialise %d events", n)
                self.dropped += n

    def close(self, timeout: float = 120.0) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._pipe.write(_frame(b"Q", orjson.dumps({"dropped": self.dropped})))
            self._pipe.close()
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        try:
            out = self.proc.stdout
            assert out is not None
            # it says b"done <events written>" once the capture is closed
            if select.select([out], [], [], timeout)[0]:
                done = out.readline().split()
                if len(done) == 2 and done[0] == b"done":
                    self.recorded = int(done[1])
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("the capture process did not finish within %ss; stopping it", timeout)
            self.proc.kill()
            self.proc.wait()


# --- the child ------------------------------------------------------------------------------


def _read_exact(f: BinaryIO, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _reader(f: BinaryIO, out: queue.Queue[tuple[int, bytes] | None]) -> None:
    while True:
        hdr = _read_exact(f, 5)
        if hdr is None:
            out.put(None)
            return
        n, kind = _HDR.unpack(hdr)
        payload = _read_exact(f, n)
        if payload is None:
            out.put(None)
            return
        out.put((kind, payload))


def main() -> int:
    # the parent decides when we stop (it closes the pipe); signals are its business
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(10)  # telemetry never competes with traffic
    stdin = sys.stdin.buffer
    hdr = _read_exact(stdin, 5)
    if hdr is None:
        return 1
    n, kind = _HDR.unpack(hdr)
    payload = _read_exact(stdin, n)
    if kind != ord("C") or payload is None:
        print("error: expected the config frame first", flush=True)
        return 1
    settings = orjson.loads(payload)
    logging.basicConfig(
        level=getattr(logging, settings.get("log_level", "info").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from correlate import shared_ids
    from sniff.store import Recorder

    shared_ids.configure(settings.get("correlate", {}))
    from sniff.store import BatchListener

    listeners: list[BatchListener] = []
    live = None
    if settings.get("otlp"):
        from correlate.engine import Correlator
        from exporters.otlp import OtlpExporter
        from sniff.live import LiveExport

        live = LiveExport(
            Correlator(services=settings.get("services"), options=settings.get("correlate")),
            OtlpExporter(settings["otlp"], settings.get("otlp_headers") or {}),
        )
        listeners.append(live.on_batch)
    try:
        from sniff.decode_host import proxies_from_settings

        rec = Recorder(
            settings["capture"],
            listeners,
            identify=bool(settings.get("identify_processes")),
            proxies=proxies_from_settings(settings.get("proxies", [])),
        )
    except Exception as e:
        print(f"error: {e}", flush=True)
        return 1
    print("ready", flush=True)
    frames: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=64)
    threading.Thread(target=_reader, args=(stdin, frames), daemon=True).start()
    dropped = 0
    last_tick = time.monotonic()
    while True:
        try:
            item = frames.get(timeout=0.5)
        except queue.Empty:
            item = ("tick", b"")  # type: ignore[assignment]
        if item is None:
            break
        kind, payload = item
        if kind == ord("E"):
            try:
                batch = []
                for k, values in pickle.loads(payload):
                    cls = event_class(k)
                    if cls is not None:
                        batch.append(cls(*values))
            except Exception:
                log.exception("capture process: an undecodable batch was skipped")
                continue
            rec.process(batch)
        elif kind == ord("Q"):
            dropped = int(orjson.loads(payload).get("dropped", 0))
        if time.monotonic() - last_tick >= 1.0:
            last_tick = time.monotonic()
            rec.tick()
    rec.close(dropped)
    if live is not None:
        live.close()
    print(f"done {rec.written}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
