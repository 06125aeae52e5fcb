from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require_server
from tests.helpers import SniffProcess


@pytest.fixture
def sniff_amqp(sniff_run: Any) -> Iterator[SniffProcess]:
    require_server("rabbitmq")
    # these tests play several components in one process; name them by their AMQP
    # connection_name rather than by pid (identity itself is tested in tests/integration/test_identity.py)
    yield sniff_run(
        [{"name": "rabbitmq", "protocol": "amqp", "upstream": "127.0.0.1:5672"}],
        identify_processes=False,
    )


def qname(tag: str) -> str:
    return f"sniff-test-{tag}-{uuid.uuid4().hex[:8]}"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def by_kind(spans: list[Any], kind: str) -> list[Any]:
    return sorted((s for s in spans if s.kind == kind), key=lambda s: s.start)


def assert_linked(spans: list[Any], traceparents: list[str]) -> None:
    """Each traceparent a consumer saw names a PRODUCER span, and a CONSUMER span
    in the same trace is its child and links to it. (The trace may have moved from
    the wire's id to a caller's trace by causal correlation; both moved together.)"""
    producers = {s.span_id: s for s in spans if s.kind == "PRODUCER"}
    consumers = [s for s in spans if s.kind == "CONSUMER"]
    for tp in traceparents:
        _, _trace_id, span_id, _ = tp.split("-")
        assert span_id in producers, f"no producer span for {tp}"
        trace_id = producers[span_id].trace_id
        kids = [c for c in consumers if c.parent_id == span_id]
        assert kids, f"no consumer span under {tp}"
        for c in kids:
            assert c.trace_id == trace_id
            assert any(lk.span_id == span_id and lk.trace_id == trace_id for lk in c.links)
