"""The AMQP decoder on real captured sessions: fed whole, split at every offset,
and one byte at a time, it must give the same events and forward the same bytes;
garbage gives one ProtocolError and passthrough, never an exception."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import frame as pamqp_frame

from proxies.amqp.decoder import AmqpDecoder, AmqpShared
from proxies.amqp.events import (
    AmqpConfirm,
    AmqpDeliver,
    AmqpGetOk,
    AmqpMethod,
    AmqpPublish,
    AmqpSettle,
)
from proxies.amqp.handler import AmqpRawDecoder
from sniff import ids
from sniff.events import ConnIdentity, ProtocolError, dumps
from tests.fixtures.amqp.record import load

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "amqp"
PIKA = load(FIXTURES / "pika_session.bin")
RPC = load(FIXTURES / "aio_pika_rpc.bin")

Chunks = list[tuple[int, bytes]]


def run(chunks: Chunks, inject: bool = True) -> tuple[list[Any], bytes]:
    events: list[Any] = []
    out: list[bytes] = []
    counter = itertools.count(1)
    dec = AmqpDecoder(
        7,
        events.append,
        inject=inject,
        clock=lambda: 1000,
        new_span_id=lambda: f"{next(counter):016x}",
        new_trace_id=lambda: f"{next(counter):032x}",
        release=out.append,
    )
    for direction, data in chunks:
        if direction == 0:
            out.append(dec.feed_client(data))
        else:
            dec.feed_server(data)
    out.append(dec.flush_client())
    return events, b"".join(out)


def merged(chunks: Chunks) -> Chunks:
    out: Chunks = []
    for d, data in chunks:
        if out and out[-1][0] == d:
            out[-1] = (d, out[-1][1] + data)
        else:
            out.append((d, data))
    return out


def split_at(chunks: Chunks, direction: int, offset: int) -> Chunks:
    out: Chunks = []
    seen = 0
    for d, data in chunks:
        if d == direction and seen < offset < seen + len(data):
            k = offset - seen
            out.extend([(d, data[:k]), (d, data[k:])])
        else:
            out.append((d, data))
        if d == direction:
            seen += len(data)
    return out


def bytewise(chunks: Chunks) -> Chunks:
    return [(d, data[i : i + 1]) for d, data in chunks for i in range(len(data))]


def stream(chunks: Chunks, direction: int) -> bytes:
    return b"".join(data for d, data in chunks if d == direction)


def fingerprint(events: list[Any]) -> list[bytes]:
    return [dumps(e) for e in events]


@pytest.mark.parametrize("name,chunks", [("pika", PIKA), ("aio_pika_rpc", RPC)])
def test_whole_split_and_bytewise_agree(name: str, chunks: Chunks) -> None:
    whole = merged(chunks)
    ref_events, ref_out = run(whole)
    assert ref_events and not any(isinstance(e, ProtocolError) for e in ref_events)
    assert fingerprint(run(chunks)[0]) == fingerprint(ref_events)
    ev, out = run(bytewise(chunks))
    assert fingerprint(ev) == fingerprint(ref_events)
    assert out == ref_out
    for direction in (0, 1):
        for k in range(1, len(stream(whole, direction))):
            ev, out = run(split_at(whole, direction, k))
            assert fingerprint(ev) == fingerprint(ref_events), (direction, k)
            assert out == ref_out, (direction, k)


def _frames(data: bytes) -> list[tuple[int, Any]]:
    frames = []
    pos = 0
    while pos < len(data):
        n, ch, f = pamqp_frame.unmarshal(data[pos:])
        frames.append((ch, f))
        pos += n
    return frames


def test_only_the_traceparent_header_is_added() -> None:
    events, out = run(merged(PIKA))
    original = stream(PIKA, 0)
    assert run(merged(PIKA), inject=False)[1] == original  # injection off: byte-identical
    a, b = _frames(original), _frames(out)
    assert len(a) == len(b)
    publishes = [e for e in events if isinstance(e, AmqpPublish)]
    injected = [p for p in publishes if p.injected]
    changed = 0
    for (ch1, f1), (ch2, f2) in zip(a, b, strict=True):
        assert ch1 == ch2 and type(f1) is type(f2)
        if f1.name == "ContentHeader":
            h1 = dict(f1.properties.headers or {})
            h2 = dict(f2.properties.headers or {})
            if h1 != h2:
                changed += 1
                tp = h2.pop("traceparent")
                assert h1 == h2 and tp.startswith("00-")
            for slot in f1.properties.__slots__:
                if slot != "headers":
                    assert getattr(f1.properties, slot) == getattr(f2.properties, slot)
        elif f1.name == "ContentBody":
            assert f1.value == f2.value
    assert changed == len(injected) == 3  # the message that had a traceparent kept it


def test_pika_session_events() -> None:
    events, _ = run(merged(PIKA))
    ident = [e for e in events if isinstance(e, ConnIdentity)]
    assert ident[0].attrs["connection_name"] == "fixture-pika"
    assert "response" not in str([e for e in events if isinstance(e, AmqpMethod)])
    pubs = [e for e in events if isinstance(e, AmqpPublish)]
    assert [p.body_size for p in pubs] == [0, 1024, 9000, 2]
    assert pubs[0].confirm_seq == 1 and pubs[2].confirm_seq == 3 and pubs[3].confirm_seq is None
    assert pubs[3].tx
    assert pubs[1].properties["message_id"] == "m-1" and pubs[1].properties["priority"] == 3
    assert pubs[2].injected is False and pubs[2].parent_span_id == "b7ad6b7169203331"
    assert pubs[2].trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert [c.delivery_tag for c in events if isinstance(c, AmqpConfirm)] == [1, 2, 3]
    gets = [e for e in events if isinstance(e, AmqpGetOk)]
    assert [g.body_size for g in gets] == [0, 1024, 9000]
    assert gets[0].queue == "sniff_fixture_q"
    # (recorded without sniff: only the application's own traceparent comes back)
    assert [g.traceparent for g in gets] == [None, None, pubs[2].traceparent]
    delivers = [e for e in events if isinstance(e, AmqpDeliver)]
    assert len(delivers) == 2 and delivers[1].redelivered and delivers[0].queue == "sniff_fixture_q"
    settles = [(s.op, s.requeue) for s in events if isinstance(s, AmqpSettle)]
    assert ("nack", True) in settles and settles.count(("ack", None)) == 4
    assert gets[2].body_head == b"y" * 4096


def test_rpc_reply_continues_the_request_trace() -> None:
    events, _ = run(merged(RPC))
    pubs = [e for e in events if isinstance(e, AmqpPublish)]
    delivers = [e for e in events if isinstance(e, AmqpDeliver)]
    request, reply = pubs
    served = next(d for d in delivers if d.properties.get("reply_to"))
    assert request.injected and reply.injected
    # the reply's injected traceparent continues the served request's consumer span
    assert reply.rpc_reply_to == served.span_id
    assert reply.trace_id == served.trace_id and reply.parent_span_id == served.span_id
    assert reply.traceparent == f"00-{served.trace_id}-{reply.span_id}-01"


def test_garbage_first_bytes_are_passed_through() -> None:
    events, out = run([(0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")])
    assert out == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert len(events) == 1 and isinstance(events[0], ProtocolError)


def test_frame_max_too_small_skips_injection() -> None:
    # shrink the negotiated frame_max so that the 1 KiB message's header cannot grow
    events: list[Any] = []
    dec = AmqpDecoder(1, events.append)
    for d, data in merged(PIKA):
        if d == 0:
            dec.feed_client(data)
            if dec.frame_max:
                dec.frame_max = 150  # the 1 KiB message header is 110 bytes; +72 does not fit
        else:
            dec.feed_server(data)
    pubs = [e for e in events if isinstance(e, AmqpPublish)]
    big = pubs[1]  # its header already carries many properties
    assert not big.injected and "frame_max" in (big.inject_note or "")


def _outcome(chunks: Chunks) -> None:
    events, out = run(chunks, inject=False)
    assert out == stream(chunks, 0)
    errors = [i for i, e in enumerate(events) if isinstance(e, ProtocolError)]
    assert len(errors) <= 1
    if errors:
        assert errors[0] == len(events) - 1  # passthrough: nothing decoded afterwards


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.booleans())
def test_fuzz_random_streams(data: bytes, with_header: bool) -> None:
    prefix = b"AMQP\x00\x00\x09\x01" if with_header else b""
    _outcome([(0, prefix + data), (1, data[::-1])])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**32),
    st.integers(1, 8),
    st.sampled_from(["flip", "drop", "insert", "truncate"]),
)
def test_fuzz_mutated_sessions(seed: int, n: int, how: str) -> None:
    rnd = random.Random(seed)
    chunks = [(d, bytearray(data)) for d, data in merged(RPC)]
    for _ in range(n):
        i = rnd.randrange(len(chunks))
        buf = chunks[i][1]
        if not buf:
            continue
        j = rnd.randrange(len(buf))
        if how == "flip":
            buf[j] ^= 1 << rnd.randrange(8)
        elif how == "drop":
            del buf[j]
        elif how == "insert":
            buf.insert(j, rnd.randrange(256))
        else:
            del buf[j:]
    _outcome([(d, bytes(b)) for d, b in chunks])


# --- the relay side of decode = "capture": the lean tagger ---------------------------------


def run_lean(chunks: Chunks) -> tuple[bytes, list[str]]:
    """The client stream through the lean tagger: (bytes forwarded, span ids it injected)."""
    counter = itertools.count(1)
    dec = AmqpDecoder(
        7,
        lambda ev: None,
        inject=True,
        lean=True,
        new_span_id=lambda: f"{next(counter):016x}",
        new_trace_id=lambda: f"{next(counter):032x}",
        emit_fields=lambda cls, values: None,
    )
    out: list[bytes] = []
    injected: list[str] = []
    for direction, data in chunks:
        if direction == 0:
            out.append(dec.feed_client(data))
            injected.extend(dec.take_injected() or [])
    out.append(dec.flush_client())
    assert not dec.passthrough
    return b"".join(out), injected


@pytest.mark.parametrize("name,chunks", [("pika", PIKA), ("aio_pika_rpc", RPC)])
def test_lean_tagger_tags_like_the_decoder(name: str, chunks: Chunks) -> None:
    whole = merged(chunks)
    out, injected = run_lean(whole)
    # the same frames as the full decoder's injection, each publish without a
    # traceparent gaining exactly one (ids differ: the full decoder also draws ids
    # for deliveries)
    full_events, full_out = run(whole)
    a, b = _frames(full_out), _frames(out)
    assert [(ch, f.name) for ch, f in a] == [(ch, f.name) for ch, f in b]
    for (_, f1), (_, f2) in zip(a, b, strict=True):
        if f1.name == "ContentHeader":
            h1 = dict(f1.properties.headers or {})
            h2 = dict(f2.properties.headers or {})
            assert h1.keys() == h2.keys()
            h1.pop("traceparent", None)
            h2.pop("traceparent", None)
            assert h1 == h2
    n_injected = sum(1 for e in full_events if isinstance(e, AmqpPublish) and e.injected)
    assert len(injected) == n_injected > 0
    # split anywhere, or one byte at a time: the same bytes, the same tags
    assert run_lean(bytewise(chunks)) == (out, injected)
    for k in range(1, len(stream(whole, 0))):
        assert run_lean(split_at(whole, 0, k)) == (out, injected), k
    # the capture process, fed that output and the injected ids, knows its own tags
    events: list[Any] = []
    cap = AmqpRawDecoder(AmqpDecoder(7, events.append, inject=False))
    cap.feed(0, out, injected)
    for d, data in whole:
        if d == 1:
            cap.feed(1, data, None)
    pubs = [e for e in events if isinstance(e, AmqpPublish)]
    assert [p.span_id for p in pubs if p.injected] == injected
    assert not any(isinstance(e, ProtocolError) for e in events)


def test_lean_tagger_respects_frame_max() -> None:
    dec = AmqpDecoder(1, lambda ev: None, inject=True, lean=True, emit_fields=lambda c, v: None)
    out = []
    for d, data in merged(PIKA):
        if d == 0:
            out.append(dec.feed_client(data))
            if dec.frame_max:
                dec.frame_max = 150  # the 1 KiB message's header cannot grow by 72 bytes
    frames = _frames(b"".join(out))
    headers = [f for _, f in frames if f.name == "ContentHeader"]
    big = headers[1]
    assert "traceparent" not in (big.properties.headers or {})


def test_lean_tagger_passes_garbage_through() -> None:
    dec = AmqpDecoder(1, lambda ev: None, inject=True, lean=True, emit_fields=lambda c, v: None)
    data = b"AMQP\x00\x00\x09\x01" + b"\x09\x00\x00\x00\x00\x00\x00\xce" + b"rest"
    assert dec.feed_client(data) == data
    assert dec.passthrough
    assert dec.feed_client(b"more") == b"more"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 8), st.integers(1, 64))
def test_fuzz_lean_tagger(seed: int, n: int, chunk: int) -> None:
    """Corrupted client streams, in chunks of any size: the tagger never raises and
    changes nothing but the tags it adds (72 bytes each, 76 with a new table)."""
    rnd = random.Random(seed)
    data = bytearray(stream(RPC, 0))
    for _ in range(n):
        j = rnd.randrange(len(data))
        data[j] ^= 1 << rnd.randrange(8)
    chunks = [(0, bytes(data[i : i + chunk])) for i in range(0, len(data), chunk)]
    dec = AmqpDecoder(1, lambda ev: None, inject=True, lean=True, emit_fields=lambda c, v: None)
    out = b"".join(dec.feed_client(c) for _, c in chunks) + dec.flush_client()
    k = len(dec.take_injected() or [])
    assert 72 * k <= len(out) - len(data) <= 76 * k


def test_a_bad_content_header_is_reported_at_its_own_offset() -> None:
    """A message decoded whole (all its frames in one chunk) and one decoded frame by
    frame report a bad content header at the same stream offset: the header's."""
    data = bytearray(stream(PIKA, 0))
    frames = []
    pos = 8  # after the protocol header
    while pos < len(data):
        size = int.from_bytes(data[pos + 3 : pos + 7], "big")
        frames.append((data[pos], pos))
        pos += 8 + size
    header_at = next(p for t, p in frames if t == 2)
    data[header_at + 7 : header_at + 9] = (61).to_bytes(2, "big")  # class 61, not Basic
    for chunks in ([(0, bytes(data))], bytewise([(0, bytes(data))])):
        events, out = run(chunks, inject=False)
        errors = [e for e in events if isinstance(e, ProtocolError)]
        assert len(errors) == 1 and "class 61" in errors[0].reason
        assert errors[0].offset == header_at
        assert out == bytes(data)


def relay_then_capture(chunks: Chunks) -> tuple[list[Any], bytes]:
    """decode = "capture" end to end: the relay's lean tagger and broker scan, then the
    capture process's decoder fed what the relay forwarded and shipped with it."""
    counter = itertools.count(1)
    relay = AmqpDecoder(
        7,
        lambda ev: None,
        inject=True,
        lean=True,
        shared=AmqpShared(),
        new_span_id=lambda: f"{next(counter):016x}",
        new_trace_id=lambda: f"{next(counter):032x}",
        emit_fields=lambda cls, values: None,
    )
    events: list[Any] = []
    ids = itertools.count(1 << 40)  # the capture side's own ids (other deliveries)
    cap = AmqpRawDecoder(
        AmqpDecoder(
            7,
            events.append,
            inject=False,
            clock=lambda: 1000,
            new_span_id=lambda: f"{next(ids):016x}",
            new_trace_id=lambda: f"{next(ids):032x}",
        )
    )
    wire: list[bytes] = []
    for direction, data in chunks:
        if direction == 0:
            out = relay.feed_client(data)
            cap.feed(0, out, relay.take_injected())
            wire.append(out)
        else:
            relay.scan_server(data)
            cap.feed(1, data, relay.take_assigned())
    return events, b"".join(wire)


def test_capture_mode_tags_an_rpc_reply_with_its_request_trace() -> None:
    events, wire = relay_then_capture(merged(RPC))
    pubs = [e for e in events if isinstance(e, AmqpPublish)]
    served = next(d for d in events if isinstance(d, AmqpDeliver) and d.properties.get("reply_to"))
    request, reply = pubs
    assert request.injected and reply.injected
    assert reply.rpc_reply_to == served.span_id and reply.parent_span_id == served.span_id
    assert reply.trace_id == served.trace_id
    assert reply.traceparent == f"00-{served.trace_id}-{reply.span_id}-01"
    assert reply.traceparent.encode() in wire  # what the broker got
    assert not any(isinstance(e, ProtocolError) for e in events)
    # however the streams are cut, the relay and the capture process agree
    ref = fingerprint(events)
    assert fingerprint(relay_then_capture(bytewise(RPC))[0]) == ref
    for direction in (0, 1):
        for k in range(1, len(stream(merged(RPC), direction)), 7):
            assert fingerprint(relay_then_capture(split_at(merged(RPC), direction, k))[0]) == ref


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 8), st.integers(1, 64))
def test_fuzz_broker_scan(seed: int, n: int, chunk: int) -> None:
    """Corrupted broker streams through the relay's scan: it never raises, and once it
    gives up (passthrough) the client stream is forwarded untouched."""
    rnd = random.Random(seed)
    chunks = [(d, bytearray(data)) for d, data in merged(RPC)]
    for _ in range(n):
        d, buf = chunks[rnd.randrange(len(chunks))]
        if d == 1 and buf:
            buf[rnd.randrange(len(buf))] ^= 1 << rnd.randrange(8)
    dec = AmqpDecoder(1, lambda ev: None, inject=True, lean=True, emit_fields=lambda c, v: None)
    for d, data in chunks:
        for i in range(0, len(data), chunk):
            part = bytes(data[i : i + chunk])
            if d == 0:
                out = dec.feed_client(part)
                if dec.passthrough:
                    assert out.endswith(part)
            else:
                dec.scan_server(part)
                assert all(len(a) == 2 for a in dec.take_assigned() or [])


def _lean_both_ways(chunks: list[tuple[int, bytes]]) -> tuple[Any, ...]:
    """What the relay's lean loop does with ``chunks``: forwarded client bytes, tags,
    RPC ids assigned, errors, final state. Deterministic ids, a fresh shared map."""
    counter = itertools.count(1)
    events: list[Any] = []
    dec = AmqpDecoder(
        1, events.append, inject=True, lean=True, shared=AmqpShared(),
        new_span_id=lambda: f"{next(counter):016x}",
        new_trace_id=lambda: f"{next(counter):032x}",
        emit_fields=lambda cls, values: None,
    )  # fmt: skip
    out, tags, assigned = [], [], []
    for d, data in chunks:
        if d == 0:
            out.append(dec.feed_client(data))
            tags.append(dec.take_injected())
        else:
            dec.scan_server(data)
            assigned.append(dec.take_assigned())
    out.append(dec.flush_client())
    errors = [  # (pamqp's messages name objects by address)
        (e.direction, e.offset, re.sub(r" at 0x[0-9a-f]+", "", e.reason))
        for e in events
        if isinstance(e, ProtocolError)
    ]
    return b"".join(out), tags, assigned, errors, dec.passthrough, dec.frames, dec.heartbeats


def _in_c_and_python(run: Any, *args: Any) -> tuple[Any, Any]:
    """``run(*args)`` with the C lean loop, then with its Python reference."""
    import proxies.amqp.decoder as mod

    in_c = run(*args)
    saved = mod._lean_feed
    mod._lean_feed = None
    try:
        return in_c, run(*args)
    finally:
        mod._lean_feed = saved


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(0, 6), st.integers(1, 97))
def test_fuzz_lean_loop_in_c_matches_python(seed: int, n: int, chunk: int) -> None:
    """The C lean loop (sniff._shipper.lean_feed) and its Python reference agree on every
    byte forwarded, every tag and id, every error and its offset, however the streams of
    a recorded RPC session (corrupted or not) are cut."""
    import proxies.amqp.decoder as mod

    if mod._lean_feed is None:
        pytest.skip("sniff._shipper is not built (no C compiler at install)")
    rnd = random.Random(seed)
    chunks = [(d, bytearray(data)) for d, data in merged(RPC)]
    for _ in range(n):
        _, buf = chunks[rnd.randrange(len(chunks))]
        if buf:
            buf[rnd.randrange(len(buf))] ^= 1 << rnd.randrange(8)
    cut = [(d, bytes(b[i : i + chunk])) for d, b in chunks for i in range(0, len(b), chunk)]
    in_c, in_python = _in_c_and_python(_lean_both_ways, cut)
    assert in_c == in_python


# --- the C lean loop's own content-header paths (tag and RPC note) ----------------------

_HEADER_KEYS = ["x-a", "traceparent", "x-count", "tracestate", "x-retry"]


def _random_props(rnd: random.Random, rpc: tuple[str, str] | None = None) -> Any:
    """Basic properties of every shape the C path accepts or hands back to Python: any
    subset of properties, headers absent/empty/full, a traceparent first or later, valid
    (sniff's canonical form), upper case, all-zero, of another version or not a string."""
    from pamqp import commands

    kw: dict[str, Any] = {}
    for name, make in (
        ("content_type", lambda: "application/json"),
        ("content_encoding", lambda: "utf-8"),
        ("delivery_mode", lambda: rnd.choice([1, 2])),
        ("priority", lambda: rnd.randrange(10)),
        ("correlation_id", lambda: rnd.choice(["", "c1", "é" * 3])),
        ("reply_to", lambda: rnd.choice(["", "amq.gen-1", "q2"])),
        ("expiration", lambda: "60000"),
        ("message_id", lambda: "m" * rnd.randrange(40)),
        ("timestamp", lambda: __import__("datetime").datetime(2026, 11, 22, 5, 0, 0)),
        ("message_type", lambda: "t"),
        ("user_id", lambda: "guest"),
        ("app_id", lambda: "app"),
    ):
        if rnd.random() < 0.4:
            kw[name] = make()
    if rpc is not None:
        kw["reply_to"], kw["correlation_id"] = rpc
    if rnd.random() < 0.6:
        headers: dict[str, Any] = {}
        for key in rnd.sample(_HEADER_KEYS, rnd.randrange(len(_HEADER_KEYS) + 1)):
            if key == "traceparent":
                tid, sid = f"{rnd.getrandbits(128):032x}", f"{rnd.getrandbits(64):016x}"
                headers[key] = rnd.choice(
                    [
                        f"00-{tid}-{sid}-01",
                        f"00-{tid.upper()}-{sid}-01",
                        f"00-{'0' * 32}-{sid}-01",
                        f"01-{tid}-{sid}-01-extra",
                        f"00-{tid}-{sid}",
                        7,
                    ]
                )
            else:
                headers[key] = rnd.choice(["v", 3, True, "x" * 300])
        kw["headers"] = headers
    return commands.Basic.Properties(**kw)


def _content(ch: int, method: Any, props: Any, body: bytes) -> bytes:
    from pamqp import body as pbody
    from pamqp import frame, header

    return (
        frame.marshal(method, ch)
        + frame.marshal(header.ContentHeader(0, len(body), props), ch)
        + frame.marshal(pbody.ContentBody(body), ch)
    )


def _rpc_session(seed: int) -> list[tuple[int, bytes]]:
    """A broker delivering RPC requests (some already traced) and a client publishing
    replies to their reply_to (right or wrong correlation id) and other messages."""
    from pamqp import commands, frame

    rnd = random.Random(seed)
    out: list[tuple[int, bytes]] = [(0, b"AMQP\x00\x00\x09\x01")]
    if rnd.random() < 0.3:  # a small frame_max: some tags would outgrow it
        tune = commands.Connection.TuneOk(channel_max=0, frame_max=rnd.randrange(200, 600))
        out.append((0, frame.marshal(tune, 0)))
    pending: list[tuple[str, str]] = []
    for i in range(rnd.randrange(1, 12)):
        ch = rnd.randrange(1, 3)
        if rnd.random() < 0.5:
            rpc = (rnd.choice(["amq.gen-1", "q2"]), f"corr-{i}") if rnd.random() < 0.7 else None
            if rpc:
                pending.append(rpc)
            deliver = commands.Basic.Deliver("ctag", i + 1, False, "", "work")
            out.append((1, _content(ch, deliver, _random_props(rnd, rpc), b"x" * i)))
        else:
            rk, rpc = "work", None
            if pending and rnd.random() < 0.7:
                rk, corr = pending.pop(rnd.randrange(len(pending)))
                rpc = (rk, corr if rnd.random() < 0.8 else "other")
            exchange = "" if rpc or rnd.random() < 0.5 else "ex"
            publish = commands.Basic.Publish(exchange=exchange, routing_key=rk)
            out.append((0, _content(ch, publish, _random_props(rnd, rpc), b"y" * i)))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 200))
def test_fuzz_c_header_paths_match_python(seed: int, chunk: int) -> None:
    """Headers of every shape through the C lean loop's tag and RPC note (or their hand-
    back to Python) and through the Python callbacks: the same bytes, tags, RPC ids."""
    import proxies.amqp.decoder as mod

    if mod._lean_feed is None:
        pytest.skip("sniff._shipper is not built (no C compiler at install)")
    session = _rpc_session(seed)
    cut = [(d, b[i : i + chunk]) for d, b in session for i in range(0, len(b), chunk)]
    in_c, in_python = _in_c_and_python(_lean_both_ways, cut)
    assert in_c == in_python
    # every header here is well formed: the only errors are frames past a small frame_max
    assert all("exceeds frame_max" in reason for _, _, reason in in_c[3])


def test_c_ids_tag_and_continue_rpc_traces() -> None:
    """With the default id functions the C loop draws its own ids: each untraced publish
    gains one valid traceparent whose span id is reported, every other byte unchanged;
    a reply continues its request's trace."""
    from pamqp import commands, frame

    import proxies.amqp.decoder as mod

    if mod._lean_feed is None:
        pytest.skip("sniff._shipper is not built (no C compiler at install)")
    dec = AmqpDecoder(1, lambda ev: None, inject=True, lean=True, shared=AmqpShared(),
                      emit_fields=lambda c, v: None)  # fmt: skip
    assert dec._c_ids
    props = commands.Basic.Properties(
        content_type="text/plain", headers={"x-a": "v"}, reply_to="rq", correlation_id="7"
    )
    req = _content(1, commands.Basic.Publish(exchange="", routing_key="work"), props, b"hi")
    out = dec.feed_client(b"AMQP\x00\x00\x09\x01" + req)
    (span,) = dec.take_injected() or []
    got = _frames(out[8:])
    h = got[1][1].properties
    tp = h.headers.pop("traceparent")
    assert tp.startswith("00-") and tp.endswith(f"-{span}-01") and len(tp) == 55
    assert ids.parse_traceparent(tp) is not None
    assert h.headers == {"x-a": "v"} and h.reply_to == "rq" and h.correlation_id == "7"
    # the broker delivers it (with the tag) to a worker on another connection...
    worker = AmqpDecoder(2, lambda ev: None, inject=True, lean=True, shared=dec._shared,
                         emit_fields=lambda c, v: None)  # fmt: skip
    worker.feed_client(b"AMQP\x00\x00\x09\x01")
    delivered = (
        frame.marshal(commands.Basic.Deliver("c", 1, False, "", "work"), 1)
        + out[8:][len(frame.marshal(commands.Basic.Publish(exchange="", routing_key="work"), 1)) :]
    )
    worker.scan_server(delivered)
    ((trace, consumer_span),) = worker.take_assigned() or []
    assert trace == tp[3:35] and len(consumer_span) == 16
    # ...which replies to reply_to with the same correlation id: the same trace, parented
    # by the consumer span
    reply = commands.Basic.Properties(correlation_id="7")
    rep = _content(1, commands.Basic.Publish(exchange="", routing_key="rq"), reply, b"ok")
    out2 = worker.feed_client(rep)
    ((reply_span, parent),) = worker.take_injected() or []
    assert parent == consumer_span
    tp2 = _frames(out2)[1][1].properties.headers["traceparent"]
    assert tp2 == f"00-{trace}-{reply_span}-01"


def _rpc_map_run() -> tuple[Any, ...]:
    """RPC requests delivered past the shared map's bound, then replies: one evicted, one
    past the TTL by the decoder's own clock, one still known (through the C loop's rpc_take
    and rpc_remember, or the Python callbacks: see _in_c_and_python)."""
    from pamqp import commands

    now = [1_000]
    counter = itertools.count(1)
    shared = AmqpShared(max_entries=2, ttl_ns=500)
    dec = AmqpDecoder(1, lambda ev: None, inject=True, lean=True, shared=shared,
                      clock=lambda: now[0], emit_fields=lambda c, v: None,
                      new_span_id=lambda: f"{next(counter):016x}",
                      new_trace_id=lambda: f"{next(counter):032x}")  # fmt: skip
    dec.feed_client(b"AMQP\x00\x00\x09\x01")
    for i in range(3):  # three requests for a map of two: the first is evicted
        props = commands.Basic.Properties(reply_to="rq", correlation_id=f"c{i}")
        deliver = commands.Basic.Deliver("ctag", i + 1, False, "", "work")
        dec.scan_server(_content(1, deliver, props, b"x"))
        now[0] += 300
    assigned = dec.take_assigned()
    tags = []
    for i in range(3):  # c0: evicted; c1: 600 ns old, past the TTL; c2: known
        props = commands.Basic.Properties(correlation_id=f"c{i}")
        publish = commands.Basic.Publish(exchange="", routing_key="rq")
        dec.feed_client(_content(1, publish, props, b"ok"))
        tags.append(dec.take_injected())
    return assigned, tags, shared.evicted, dict(shared.rpc)


def test_rpc_map_bound_and_ttl_in_c_match_python() -> None:
    import proxies.amqp.decoder as mod

    if mod._lean_feed is None:
        pytest.skip("sniff._shipper is not built (no C compiler at install)")
    in_c, in_python = _in_c_and_python(_rpc_map_run)
    assert in_c == in_python
    assigned, tags, evicted, left = in_c
    assert len(assigned) == 3 and evicted == 1 and not left
    # only the last reply continues its request's trace, as a child of its consumer span
    assert [isinstance(t[0], tuple) for t in tags] == [False, False, True]
    assert tags[2][0][1] == assigned[2][1]
