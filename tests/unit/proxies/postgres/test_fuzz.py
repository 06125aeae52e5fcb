"""Fuzz: random and mutated streams. The only allowed outcome of bad input is one
``ProtocolError`` event and passthrough: never an exception, never altered bytes."""

from __future__ import annotations

import random
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.proxies.postgres.pgwire import Chunks, Replay, fixture, stream

SOURCES = ["asyncpg.bin", "psycopg.bin", "auth_scram.bin", "asyncpg_cancel.bin"]
_CACHE: dict[str, Chunks] = {}


def _chunks(name: str) -> Chunks:
    if name not in _CACHE:
        _CACHE[name] = fixture(name)
    return _CACHE[name]


def _check(chunks: Chunks, **kw: object) -> Replay:
    r = Replay(**kw)  # type: ignore[arg-type]
    r.feed(chunks)  # must not raise
    r.end()
    errors = r.of("core.protocol_error")
    assert len(errors) <= 1
    if errors:
        assert r.dec.passthrough
    return r


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=64)), max_size=20))
def test_random_streams(chunks: Chunks) -> None:
    r = _check(chunks)
    assert r.forwarded() == stream(chunks, True)  # observe mode: bytes unchanged


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=64)), max_size=20))
def test_random_streams_rewrite_mode(chunks: Chunks) -> None:
    r = _check(chunks, ssl_policy="refuse", inject=True)
    # only deliberate changes: SSL/GSSENC requests answered (8 bytes each) and tags added
    untagged = _TAG.sub(b"", r.forwarded())
    assert len(untagged) == len(stream(chunks, True)) - 8 * len(r.replies)


_TAG = re.compile(rb"[ \n]/\*traceparent='[0-9a-f-]{55}'\*/")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SOURCES),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete", "truncate"]),
            st.floats(0, 1, exclude_max=True),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_mutated_fixtures(name: str, mutations: list[tuple[str, float, int]], inject: bool) -> None:
    chunks = [(d, bytearray(c)) for d, c in _chunks(name)]
    for op, where, byte in mutations:
        i = int(where * len(chunks))
        _d, c = chunks[i]
        j = int(where * 7919) % max(1, len(c))
        if op == "flip" and c:
            c[j] ^= byte or 1
        elif op == "insert":
            c[j:j] = bytes([byte])
        elif op == "delete" and len(c) > 1:
            del c[j]
        elif op == "truncate" and len(c) > 1:
            del c[j:]
    mutated = [(d, bytes(c)) for d, c in chunks if c]
    r = _check(mutated, inject=inject)
    if not inject:
        assert r.forwarded() == stream(mutated, True)


def test_every_prefix_of_the_startup_is_safe() -> None:
    rnd = random.Random(1)
    chunks = _chunks("psycopg.bin")
    data = stream(chunks, True)
    for _ in range(200):
        k = rnd.randrange(1, 400)
        noise = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40)))
        _check([(True, data[:k] + noise)], ssl_policy="refuse", inject=True)
