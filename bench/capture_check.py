"""Did sniff's capture keep up during a benchmark, and what did it cost? (shared by the benchmarks)

With ``decode = "capture"`` the proxy ships copies of the bytes it relays to the
capture process (nice +10), which decodes them there. Under CPU saturation that
process can fall behind: events dropped at the shipper are counted in the capture's
``dropped_events``; bytes refused by a full queue stop that connection's decoding and
leave a ``capture.gap`` note. This reads both, and the count of statement events of
one kind, so that a benchmark can say whether decoding kept up with the traffic.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (from /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (sniff's capture process is its only one)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]
    return []


def settle(pids: list[int], timeout: float = 120.0) -> float:
    """Wait until ``pids`` are idle (under 5% of a core over 0.5 s) and return the
    seconds waited. After a run through sniff this is how long its capture process
    took to decode what the run left behind: with ``capture_defer`` (the default)
    decoding waits for idle CPU, so the next measured path must not pay for it."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        a = cpu_seconds(pids)
        time.sleep(0.5)
        if cpu_seconds(pids) - a < 0.025:
            break
    return time.monotonic() - t0


class CpuLedger:
    """CPU per unit of work (transaction, request) of each process group, summed over a
    benchmark's runs.

    ``measure(groups, fn)`` runs ``fn`` (which returns the units it did) and books the
    CPU each group of processes used meanwhile; ``after(groups)`` books what they use
    from then until they go idle (sniff's deferred decoding), separately."""

    def __init__(self) -> None:
        self.during: dict[str, float] = {}
        self.later: dict[str, float] = {}
        self.units: dict[str, float] = {}
        self.waited = 0.0

    def measure(self, groups: dict[str, list[int]], fn: Callable[[], float]) -> float:
        c0 = {g: cpu_seconds(p) for g, p in groups.items()}
        n = fn()
        for g, pids in groups.items():
            self.during[g] = self.during.get(g, 0.0) + cpu_seconds(pids) - c0[g]
            self.units[g] = self.units.get(g, 0.0) + n
        return n

    def after(self, groups: dict[str, list[int]]) -> float:
        c0 = {g: cpu_seconds(p) for g, p in groups.items()}
        w = settle([pid for pids in groups.values() for pid in pids])
        for g, pids in groups.items():
            self.later[g] = self.later.get(g, 0.0) + cpu_seconds(pids) - c0[g]
        self.waited = max(self.waited, w)
        return w

    def lines(self, unit: str) -> list[str]:
        out = []
        for g, cpu in self.during.items():
            n = self.units[g] or 1.0
            text = f"  {g:<16} {1e6 * cpu / n:6.1f} us per {unit} during the runs"
            if g in self.later:
                text += f", {1e6 * self.later[g] / n:6.1f} us after them"
            out.append(text)
        if self.later:
            out.append(
                f"  (after them: decoding that waited for idle CPU, capture_defer; it caught up "
                f"within {self.waited:.1f} s of a run's end)"
            )
        return out


def summary(path: str, statement_kind: str, issued: int | None = None) -> str:
    from sniff.store import CaptureReader

    cap = CaptureReader(path)
    try:
        meta = cap.meta()
        kinds: Counter[str] = Counter()
        for kind, _, n in cap.kind_counts_by_conn():
            kinds[kind] += n
        gaps = sum(f.get("code") == "capture.gap" for _, f in cap.raw(kinds=["core.note"]))
        total = cap.count()
    finally:
        cap.close()
    n = kinds[statement_kind]
    line = (
        f"sniff captured {total:,} events ({n:,} {statement_kind}), "
        f"{meta.get('dropped_events', '?')} dropped, {gaps} connections with a capture gap"
    )
    if issued:
        line += f"; statements issued through sniff: {issued:,} ({n / issued:.3f} recorded)"
    return line
