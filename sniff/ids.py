"""Trace and span identifiers and the W3C ``traceparent`` header.

Identifiers are lowercase hex strings everywhere inside sniff (events, spans,
capture): they survive JSON untouched (a 128-bit integer would not) and they are
what users see in Jaeger. ``random.getrandbits`` is used rather than
``os.urandom`` because it is ten times cheaper on the hot path and these ids
need uniqueness, not secrecy.
"""

from __future__ import annotations

import random
import re

_rand = random.Random()
_getrandbits = _rand.getrandbits

TRACEPARENT_LEN = 55
_TP_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?$")


def new_trace_id() -> str:
    while True:
        v = _getrandbits(128)
        if v:
            return f"{v:032x}"


def new_span_id() -> str:
    while True:
        v = _getrandbits(64)
        if v:
            return f"{v:016x}"


def format_traceparent(trace_id: str, span_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def parse_traceparent(value: str | bytes | None) -> tuple[str, str, int] | None:
    """Return (trace_id, span_id, flags) for a valid traceparent, else None.

    Follows the W3C rules a receiver must apply: version ff is invalid, all-zero
    ids are invalid, future versions may carry extra fields after the flags.
    """
    if value is None:
        return None
    if value.__class__ is not str:
        return _parse(value)
    hit = _parsed.get(value)
    if hit is not None:  # the same header is read at publish and at every delivery
        return hit
    found = _parse(value)
    if found is not None:
        if len(_parsed) >= 8192:
            _parsed.clear()
        _parsed[value] = found
    return found


_parsed: dict[str, tuple[str, str, int]] = {}


def _parse(value: str | bytes | bytearray) -> tuple[str, str, int] | None:
    if isinstance(value, bytes | bytearray):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    m = _TP_RE.match(value.strip().lower())
    if m is None:
        return None
    version, trace_id, span_id, flags = m.groups()
    if version == "ff" or (version == "00" and len(value.strip()) != TRACEPARENT_LEN):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, int(flags, 16)
