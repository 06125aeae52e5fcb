"""Helpers shared by the MySQL integration tests: reading a running sniff's capture."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from tests.helpers import SniffProcess


def conns_of(p: SniffProcess, program: str) -> set[int]:
    """Connections whose client announced ``program_name = program``."""
    return {
        e.conn
        for e in p.events("core.identity")
        if e.source == "mysql.connect_attrs" and e.attrs.get("program_name") == program
    }


def wait_for(fn: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``fn`` until it returns something truthy (the capture is written every 50 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def events_of(p: SniffProcess, program: str, kinds: tuple[str, ...] = ("mysql.",)) -> list[Any]:
    conns = conns_of(p, program)
    return [e for e in p.events() if e.conn in conns and e.kind.startswith(kinds)]


def wait_quiet(p: SniffProcess, program: str, min_events: int, timeout: float = 10.0) -> list[Any]:
    """The program's mysql events once at least ``min_events`` are in and none arrived
    for a moment (the last ones are written up to ~50 ms after they happen)."""
    last = -1
    deadline = time.monotonic() + timeout
    while True:
        evs = events_of(p, program)
        if len(evs) >= min_events and len(evs) == last:
            return evs
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(evs)} events from {program}, wanted {min_events}")
        last = len(evs)
        time.sleep(0.25)


def digest(rows: Any) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()
