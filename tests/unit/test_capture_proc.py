"""The capture pipeline's hot-path pieces: the raw-chunk buffer (C and Python), the
load gate that defers decoding, and identity lookups made before a deferred batch."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sniff import capture_proc
from sniff.capture_proc import _RAW, CaptureShipper, LoadGate, _unpack_raw
from sniff.events import ConnIdentity, ConnOpen, Event, RawChunk
from sniff.store import CaptureReader, Recorder


class _Owner:
    """The attributes a raw shipper touches on a CaptureShipper."""

    def __init__(self, budget: int = 1 << 30) -> None:
        self._buf = bytearray()
        self._lock = threading.Lock()
        self.raw_in = 0
        self.raw_out = 0
        self.max_raw_bytes = budget


class _Ctx:
    def __init__(self, conn: int) -> None:
        self.conn_id = conn
        self.gap = False
        self.slow: list[tuple[int, bytes]] = []

    def ship(self, direction: int, data: bytes) -> None:
        self.gap = True
        self.slow.append((direction, data))


def _makers() -> list[str]:
    return ["python", "c"] if capture_proc._CShipper is not None else ["python"]


def _shipper(kind: str, owner: _Owner, ctx: _Ctx, direction: int) -> Any:
    def slow(data: bytes) -> None:
        ctx.ship(direction, data)

    if kind == "c":
        assert capture_proc._CShipper is not None
        return capture_proc._CShipper(owner, ctx.conn_id, direction, slow)
    return CaptureShipper._py_shipper(owner, ctx, direction, slow)  # type: ignore[arg-type]


CHUNKS = [b"\x00", b"Q\x00\x00\x00\x0dSELECT 1\x00", bytes(range(256)) * 300, memoryview(b"mv")]


@pytest.mark.parametrize("kind", _makers())
def test_shipped_chunks_come_back_whole_and_in_order(kind: str) -> None:
    owner, ctx = _Owner(), _Ctx((123 << 32) | 7)
    c2s, s2c = _shipper(kind, owner, ctx, 0), _shipper(kind, owner, ctx, 1)
    t0 = time.time_ns()
    for i, chunk in enumerate(CHUNKS):
        (c2s if i % 2 == 0 else s2c)(chunk)
    c2s(b"")  # nothing to ship
    t1 = time.time_ns()
    out: list[Event] = []
    _unpack_raw(owner._buf, out)
    assert [(ev.conn, ev.direction, ev.data) for ev in out] == [  # type: ignore[attr-defined]
        (ctx.conn_id, i % 2, bytes(c)) for i, c in enumerate(CHUNKS)
    ]
    assert all(isinstance(ev, RawChunk) and t0 <= ev.ts <= t1 for ev in out)
    assert owner.raw_in == len(owner._buf) == sum(len(c) + _RAW.size for c in CHUNKS)
    assert not ctx.slow


def test_the_c_and_python_buffers_are_byte_identical_but_for_the_clock() -> None:
    if capture_proc._CShipper is None:
        pytest.skip("sniff._shipper is not built (no C compiler at install)")
    bufs = []
    for kind in ("python", "c"):
        owner, ctx = _Owner(), _Ctx(2**62 + 5)
        ship = _shipper(kind, owner, ctx, 1)
        for chunk in CHUNKS:
            ship(chunk)
        buf = bytearray(owner._buf)
        pos = 0
        while pos < len(buf):  # blank the timestamps
            n = _RAW.unpack_from(buf, pos)[3]
            buf[pos : pos + 8] = bytes(8)
            pos += _RAW.size + n
        bufs.append(buf)
    assert bufs[0] == bufs[1]


@pytest.mark.parametrize("kind", _makers())
def test_over_budget_the_chunk_goes_the_slow_way_and_shipping_stops(kind: str) -> None:
    owner, ctx = _Owner(budget=100), _Ctx(1)
    ship = _shipper(kind, owner, ctx, 0)
    ship(b"a" * 50)
    owner.raw_out = 30  # the shipper thread shipped some
    ship(b"b" * 40)  # 50+21 - 30 + 40+21 = 102 > 100
    ship(b"c")
    out: list[Event] = []
    _unpack_raw(owner._buf, out)
    assert [ev.data for ev in out] == [b"a" * 50]  # type: ignore[attr-defined]
    assert ctx.slow == [(0, b"b" * 40)]  # ConnContext.ship records the gap


def test_the_gate_holds_only_while_busy_and_within_its_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = LoadGate(max_defer=30, max_backlog=1000, period=0)
    idle = [0.1]
    monkeypatch.setattr(gate, "idle_cpus", lambda: idle[0])
    now = time.monotonic()
    assert gate.hold(now, 10, closing=False)  # busy machine: wait
    assert not gate.hold(now, 1000, closing=False)  # backlog at its bound
    assert not gate.hold(now - 31, 10, closing=False)  # oldest batch waited long enough
    assert not gate.hold(now, 10, closing=True)  # the proxy process has finished
    idle[0] = 1.5
    assert not gate.hold(now, 10, closing=False)  # idle CPU: decode now
    idle[0] = None  # type: ignore[call-overload]
    assert not gate.hold(now, 10, closing=False)  # load unknown: never hold
    assert not LoadGate(max_defer=0).hold(now, 0, closing=False)  # capture_defer = 0


def test_the_gate_does_not_count_its_own_cpu() -> None:
    gate = LoadGate(max_defer=30)
    first = gate._sample()
    if first is None:
        pytest.skip("no /proc/stat here")
    with open("/proc/stat", "rb") as f:
        v0 = [int(x) for x in f.readline().split()[1:9]]
    busy_until = time.monotonic() + 0.4
    while time.monotonic() < busy_until:  # this process's own CPU
        pass
    second = gate._sample()
    with open("/proc/stat", "rb") as f:
        v1 = [int(x) for x in f.readline().split()[1:9]]
    assert second is not None
    tck = gate.tck
    all_busy = (sum(v1) - sum(v0) - (v1[3] + v1[4] - v0[3] - v0[4])) / tck
    others = second[1] - first[1]
    assert others <= all_busy - 0.25  # the spin is not "other processes"


class _Resolver:
    """Answers at once, as a ProcResolver's thread would later."""

    def __init__(self, out: Any) -> None:
        self.out = out

    def request(self, conn: int, role: str, remote: Any, local: Any) -> None:
        self.out(ConnIdentity(time.time_ns(), conn, f"proc.{role}", {"pid": "42"}))

    def request_listen(self, *a: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_identity_asked_on_arrival_is_written_after_its_connection(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "cap.db")
    rec.resolver = _Resolver(rec._side.append)
    opened = ConnOpen(time.time_ns(), 9, "pg", "postgres", "127.0.0.1", 5000, "127.0.0.1", 5432,
                      "127.0.0.1", 6432)  # fmt: skip
    fields = tuple(getattr(opened, f.name) for f in dataclasses.fields(opened))
    rec.prefetch([fields])  # on arrival, before the batch is decoded
    rec.process([])  # an older batch: the answer must not overtake its ConnOpen
    assert rec.written == 0
    rec.process([opened])
    rec.close()
    cap = CaptureReader(tmp_path / "cap.db")
    kinds = [(ev.kind, ev.conn) for ev in cap.events()]
    cap.close()
    assert kinds == [("core.conn_open", 9), ("core.identity", 9)]


def test_capture_defer_is_checked() -> None:
    from sniff.config import ConfigError, from_dict

    assert from_dict({}).capture_defer == 30.0
    assert from_dict({"capture_defer": 0}).capture_defer == 0.0
    for bad in (-1, "soon", True):
        with pytest.raises(ConfigError, match=r"capture_defer: expected a number of seconds >= 0"):
            from_dict({"capture_defer": bad})


def test_tag_head_adds_a_traceparent_and_ships_it_as_meta() -> None:
    """The HTTP injector's repeated-head case in C: the same line format as the Python
    path (proxies.http.injector._LINE), shipped with the line as the chunk's meta."""
    if capture_proc._CShipper is None:
        pytest.skip("sniff._shipper is not built (no C compiler at install)")
    import re

    owner, ctx = _Owner(), _Ctx(77)
    ship = _shipper("c", owner, ctx, 0)
    head = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    outs = [ship.tag_head(head) for _ in range(200)]
    assert ship.tag_head(b"GET / HTTP/1.1\r\n") is None  # not a whole head: Python path
    line_rx = re.compile(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-01\r\n\r\n")
    ids = set()
    for out in outs:
        assert out is not None and out.startswith(head[:-2])
        m = line_rx.fullmatch(out, len(head) - 2)
        assert m is not None
        trace, span = m.groups()
        assert int(trace[-1:], 16) & 1 and int(span[-1:], 16) & 1  # never all-zero
        ids.add(trace)
    assert len(ids) == 200
    got: list[Event] = []
    _unpack_raw(owner._buf, got)
    assert (
        [(ev.direction, ev.data, ev.meta) for ev in got]
        == [  # type: ignore[attr-defined]
            (0, out, out[len(head) - 2 :]) for out in outs
        ]
    )
    assert owner.raw_in == len(owner._buf)
    owner.max_raw_bytes = owner.raw_in + 10  # over budget: declines, the Python path decides
    assert ship.tag_head(head) is None
