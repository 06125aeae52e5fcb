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
``E`` a batch (pickled list of ``(kind, field values)``), ``R`` a buffer of raw chunks as
``emit_raw`` wrote it (not pickled), ``Q`` quit (JSON: dropped count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
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
from collections.abc import Callable
from operator import attrgetter
from typing import IO, Any, BinaryIO

import orjson

from sniff.events import Event, RawChunk, event_class

log = logging.getLogger("sniff.capture")

_HDR = struct.Struct(">IB")
_E, _R = ord("E"), ord("R")  # frame types: pickled events; a raw-chunk buffer as is
# A raw chunk in a shipped buffer: ts, conn, direction, length, then the bytes
_RAW = struct.Struct("<qqBI")
_BLOB = "core.raw*"  # a batch item holding such a buffer
try:  # the same append in C (sniff/_shipper.c), built by pip when a compiler is there
    from sniff._shipper import Shipper as _CShipper
except ImportError:
    _CShipper = None  # type: ignore[assignment,misc]
_PURE = os.environ.get("SNIFF_PURE_PYTHON") == "1"  # force the Python path (tests, debugging)
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
        # raw bytes queued (headers included) and shipped: each written by one thread only
        # (producers on the event loop, the shipper thread), so no update is lost
        self.raw_in = 0
        self.raw_out = 0
        self.dropped = 0
        self.dropped_raw_bytes = 0
        self.shipped = 0
        self.recorded: int | None = None  # events the capture process wrote (known at close)
        # Events, or (kind, field values) tuples from emit_fields/emit_raw
        self._q: deque[Any] = deque()
        self._buf = bytearray()  # raw chunks not yet queued (see emit_raw)
        self._lock = threading.Lock()
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
        with contextlib.suppress(OSError, AttributeError):  # fewer wake-ups per batch (Linux)
            fcntl.fcntl(self._pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
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
    def raw_bytes(self) -> int:
        """Raw bytes queued, not yet shipped (the budget ``max_raw_bytes`` bounds)."""
        return self.raw_in - self.raw_out

    @property
    def written(self) -> int:
        """Events in the capture: what the capture process wrote once it has finished
        (decoded events from shipped bytes included), else what has been shipped."""
        return self.shipped if self.recorded is None else self.recorded

    def emit(self, ev: Event) -> None:
        if len(self._q) >= self.max_queue:
            self.dropped += 1
            return
        if self._buf:  # raw bytes shipped before this event go before it
            with self._lock:
                self._seal()
        self._q.append(ev)

    def emit_raw(self, conn: int, direction: int, ts: int, data: bytes, meta: Any = None) -> bool:
        """Forwarded bytes to decode in the capture process; False if over budget.

        Chunks without ``meta`` (nearly all) are appended to one byte buffer with a
        21-byte header each, so the relay pays a lock and two appends per chunk and
        the shipper pickles one buffer per batch instead of a tuple per chunk."""
        n = len(data) + _RAW.size
        if self.raw_bytes + n > self.max_raw_bytes:
            self.dropped_raw_bytes += n - _RAW.size
            return False
        with self._lock:
            self.raw_in += n
            if meta is None:
                buf = self._buf
                buf += _RAW.pack(ts, conn, direction, n - _RAW.size)
                buf += data
            else:
                self._seal()
                self._q.append(("core.raw", (ts, conn, direction, data, meta)))
        return True

    def raw_shipper(self, ctx: Any, direction: int) -> Callable[[bytes], None]:
        """``emit_raw`` for one connection and direction, without ``meta``, as a
        one-argument callable: what a capture-mode handler calls for every chunk
        (``ConnContext.shipper``). The C :class:`sniff._shipper.Shipper` when built,
        else a closure that appends the same bytes. Over budget both defer to
        ``ctx.ship``, which records the gap."""

        def slow(data: bytes) -> None:
            ctx.ship(direction, data)

        if _CShipper is not None and not _PURE:
            return _CShipper(self, ctx.conn_id, direction, slow)
        return self._py_shipper(ctx, direction, slow)

    def _py_shipper(
        self, ctx: Any, direction: int, slow: Callable[[bytes], None]
    ) -> Callable[[bytes], None]:
        conn = ctx.conn_id
        lock = self._lock
        pack = _RAW.pack
        size = _RAW.size
        now = time.time_ns

        def ship(data: bytes) -> None:
            if ctx.gap or not data:
                return
            n = len(data) + size
            if self.raw_in - self.raw_out + n > self.max_raw_bytes:
                slow(data)
                return
            with lock:
                self.raw_in += n
                buf = self._buf
                buf += pack(now(), conn, direction, n - size)
                buf += data

        return ship

    def _seal(self) -> None:
        """Queue the raw buffer as one item (under ``_lock``), keeping its place
        among the events."""
        if self._buf:
            self._q.append((_BLOB, (self._buf,)))
            self._buf = bytearray()

    def emit_fields(self, cls: type[Event], values: tuple[Any, ...]) -> None:
        """An event given as its class and positional field values, shipped as is."""
        if len(self._q) >= self.max_queue:
            self.dropped += 1
            return
        if self._buf:
            with self._lock:
                self._seal()
        self._q.append((cls.kind, values))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._ship()
        self._ship()

    def _ship(self) -> None:
        q = self._q
        with self._lock:
            self._seal()
        while q:
            n = min(len(q), MAX_BATCH)
            batch = [q.popleft() for _ in range(n)]
            try:
                getters = self._getters
                rows: list[Any] = []
                raw = 0
                for ev in batch:
                    if ev.__class__ is tuple:  # already (kind, values): emit_fields, emit_raw
                        if ev[0] is _BLOB:  # raw chunks: their own frame, not pickled
                            self._send_events(rows)
                            rows = []
                            blob = ev[1][0]
                            self._pipe.write(_HDR.pack(len(blob), _R))
                            self._pipe.write(blob)
                            raw += len(blob)
                            continue
                        rows.append(ev)
                        if ev[0] == "core.raw":
                            raw += len(ev[1][3]) + _RAW.size
                        continue
                    g = getters.get(ev.__class__)
                    if g is None:
                        g = getters[ev.__class__] = attrgetter(
                            *(f.name for f in dataclasses.fields(ev))
                        )
                    rows.append((ev.kind, g(ev)))
                self._send_events(rows)
                self._pipe.flush()
                self.shipped += n
                self.raw_out += raw
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

    def _send_events(self, rows: list[Any]) -> None:
        if rows:
            payload = pickle.dumps(rows, protocol=5)
            self._pipe.write(_HDR.pack(len(payload), _E))
            self._pipe.write(payload)

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


def _unpack_raw(buf: bytes | bytearray, out: list[Event]) -> None:
    """The raw chunks of one shipped buffer (see ``CaptureShipper.emit_raw``). A record
    whose direction byte has bit 7 set carries a bytes ``meta`` after its data (4-byte
    length, bytes): the C ``Shipper.tag_head`` writes the traceparent line it added so."""
    view = memoryview(buf)
    unpack = _RAW.unpack_from
    size = _RAW.size
    pos, end = 0, len(buf)
    while pos < end:
        ts, conn, direction, n = unpack(buf, pos)
        pos += size
        data = bytes(view[pos : pos + n])
        pos += n
        if direction & 0x80:
            m = int.from_bytes(view[pos : pos + 4], "little")
            out.append(
                RawChunk(ts, conn, direction & 0x7F, data, bytes(view[pos + 4 : pos + 4 + m]))
            )
            pos += 4 + m
        else:
            out.append(RawChunk(ts, conn, direction, data))


def _read_exact(f: BinaryIO, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _Inbox:
    """Frames read from the pipe as they arrive (the reader thread), for the main loop.

    The reader unpickles each batch at once and hands the field values of its new
    connections to ``on_open`` (identity lookups must not wait for decoding). The
    queue is unbounded: what the main loop has not processed yet is the backlog the
    :class:`LoadGate` bounds, and ``closing`` is set once the parent has finished."""

    def __init__(self, f: BinaryIO, on_open: Callable[[list[tuple[Any, ...]]], None]) -> None:
        self.items: queue.Queue[tuple[int, Any, float, int] | None] = queue.Queue()
        self.received = 0  # bytes read (reader thread only)
        self.done = 0  # bytes processed (main loop only)
        self.closing = threading.Event()
        self._f = f
        self._on_open = on_open
        threading.Thread(target=self._run, name="capture-reader", daemon=True).start()

    @property
    def backlog(self) -> int:
        return self.received - self.done

    def _run(self) -> None:
        f = self._f
        while True:
            hdr = _read_exact(f, 5)
            payload = None if hdr is None else _read_exact(f, _HDR.unpack(hdr)[0])
            if hdr is None or payload is None:
                self.closing.set()
                self.items.put(None)
                return
            kind = hdr[4]
            body: Any = payload
            if kind == ord("E"):
                try:
                    body = pickle.loads(payload)
                except Exception:
                    log.exception("capture process: an undecodable batch was skipped")
                    continue
                opens = [v for k, v in body if k == "core.conn_open"]
                if opens:
                    self._on_open(opens)
            elif kind == ord("Q"):
                self.closing.set()
            # "R": a raw-chunk buffer, decoded by the main loop as it is
            self.received += len(payload)
            self.items.put((kind, body, time.monotonic(), len(payload)))


class LoadGate:
    """Decoding yields to traffic: while the machine's other processes leave less than
    ``min_idle`` CPUs idle (default one whole CPU: decoding is one thread's work, and
    on a partly idle CPU it would still delay the processes that wake there), batches wait, up to ``max_defer`` seconds for the oldest
    one and ``max_backlog`` bytes in all; past either bound (or once the proxy process
    has finished) they are processed regardless, at the process's nice +10.

    Why. On a machine whose cores the traffic fills, every microsecond the capture
    process spends is taken from the traced services (nice only shares the CPU
    out). Bursts are what such machines see; deferring the decoding to the idle
    time after them costs memory and export latency, not throughput. The load is
    read from ``/proc/stat`` (all CPUs' busy time, minus this process's own) at most
    every ``period`` seconds; where it cannot be read the gate never holds."""

    def __init__(
        self,
        max_defer: float,
        max_backlog: int = 256 * 1024 * 1024,
        min_idle: float = 1.0,
        period: float = 0.1,
    ) -> None:
        self.max_defer = max_defer
        self.max_backlog = max_backlog
        self.min_idle = min_idle
        self.period = period
        self.ncpu = os.cpu_count() or 1
        self.tck = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self.busy = False
        self.held = 0.0  # seconds spent holding, in all
        self._last = self._sample()
        self._at = time.monotonic()

    def _sample(self) -> tuple[float, float] | None:
        """(all CPUs' time, other processes' busy time), in seconds, or None."""
        try:
            with open("/proc/stat", "rb") as f:
                v = f.readline().split()
            ticks = [int(x) for x in v[1:9]]
        except (OSError, ValueError):
            return None
        total = sum(ticks) / self.tck
        t = os.times()
        return total, total - (ticks[3] + ticks[4]) / self.tck - (t.user + t.system)

    def idle_cpus(self) -> float | None:
        """CPUs the other processes left idle since the previous reading."""
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        return self.ncpu * (1.0 - (now[1] - last[1]) / (now[0] - last[0]))

    def hold(self, oldest: float, backlog: int, closing: bool) -> bool:
        """Whether a batch received at ``oldest`` (monotonic) should wait now."""
        if self.max_defer <= 0 or closing or backlog >= self.max_backlog:
            return False
        now = time.monotonic()
        if now - oldest >= self.max_defer:
            return False
        if now - self._at >= self.period:
            self._at = now
            idle = self.idle_cpus()
            self.busy = idle is not None and idle < self.min_idle
        return self.busy


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
    inbox = _Inbox(stdin, rec.prefetch)
    gate = LoadGate(float(settings.get("capture_defer", 0)))
    dropped = 0
    last_tick = time.monotonic()
    while True:
        try:
            item = inbox.items.get(timeout=0.5)
        except queue.Empty:
            item = (0, None, 0.0, 0)  # a tick
        if item is None:
            break
        kind, body, received, size = item
        if kind in (_E, _R):
            while gate.hold(received, inbox.backlog, inbox.closing.is_set()):
                time.sleep(0.05)
                gate.held += 0.05
            batch: list[Event] = []
            if kind == _R:
                _unpack_raw(body, batch)
            else:
                for k, values in body:
                    if k == _BLOB:
                        _unpack_raw(values[0], batch)
                        continue
                    cls = event_class(k)
                    if cls is not None:
                        batch.append(cls(*values))
            rec.process(batch)
        elif kind == ord("Q"):
            dropped = int(orjson.loads(body).get("dropped", 0))
        inbox.done += size
        if time.monotonic() - last_tick >= 1.0:
            last_tick = time.monotonic()
            rec.tick(behind=inbox.backlog > 0)
    if gate.held:
        log.info("capture: decoding waited %.1f s in all for the CPU to go idle", gate.held)
    rec.close(dropped)
    if live is not None:
        live.close()
    print(f"done {rec.written}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
