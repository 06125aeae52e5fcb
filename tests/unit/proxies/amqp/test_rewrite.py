"""The struct-based content-header functions against pamqp, the reference codec."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header

from proxies.amqp.rewrite import (
    HeaderError,
    find_traceparent,
    inject_traceparent,
    injected_size,
    parse_content_header,
    table_lookup,
)

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
shortstr = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
header_values = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.booleans(),
    shortstr,
    st.lists(st.integers(0, 100), max_size=3),
    st.dictionaries(shortstr.filter(bool), st.integers(0, 9), max_size=2),
)


@st.composite
def properties(draw: Any) -> commands.Basic.Properties:
    kw: dict[str, Any] = {}
    for name in (
        "content_type",
        "content_encoding",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "message_type",
        "user_id",
        "app_id",
    ):
        if draw(st.booleans()):
            kw[name] = draw(shortstr.filter(bool))
    if draw(st.booleans()):
        kw["headers"] = draw(
            st.dictionaries(
                shortstr.filter(lambda s: bool(s) and s != "traceparent"), header_values, max_size=5
            )
        )
    if draw(st.booleans()):
        kw["delivery_mode"] = draw(st.sampled_from([1, 2]))
    if draw(st.booleans()):
        kw["priority"] = draw(st.integers(0, 9))
    if draw(st.booleans()):
        import datetime

        kw["timestamp"] = datetime.datetime.fromtimestamp(draw(st.integers(0, 2**31)), datetime.UTC)
    return commands.Basic.Properties(**kw)


def _frame(props: commands.Basic.Properties, body_size: int = 10, channel: int = 3) -> bytes:
    return frame.marshal(header.ContentHeader(0, body_size, props), channel)


def _payload_bounds(f: bytes) -> tuple[int, int]:
    size = struct.unpack_from(">I", f, 3)[0]
    return 7, 7 + size


@settings(max_examples=300, deadline=None)
@given(properties(), st.integers(0, 2**40))
def test_parse_matches_pamqp(props: commands.Basic.Properties, body_size: int) -> None:
    f = _frame(props, body_size)
    start, end = _payload_bounds(f)
    h = parse_content_header(f, start, end)
    _, _, ref = frame.unmarshal(f)
    assert h.body_size == ref.body_size == body_size
    assert h.class_id == 60
    ref_props = ref.properties
    for name, value in h.props.items():
        pamqp_name = "message_type" if name == "type" else name
        ref_value = getattr(ref_props, pamqp_name)
        if name == "timestamp":
            ref_value = int(ref_value.timestamp())
        assert value == ref_value, name
    assert h.has_headers == (ref_props.headers is not None)


@settings(max_examples=300, deadline=None)
@given(properties())
def test_inject_adds_only_traceparent(props: commands.Basic.Properties) -> None:
    f = _frame(props)
    start, end = _payload_bounds(f)
    h = parse_content_header(f, start, end)
    new = inject_traceparent(f, start, end, h, TP)
    assert len(new) == injected_size(h, end - start)
    consumed, channel, ref = frame.unmarshal(new)
    assert consumed == len(new) and channel == 3
    _, _, orig = frame.unmarshal(f)
    for name in commands.Basic.Properties.__slots__:
        if name != "headers":
            assert getattr(ref.properties, name) == getattr(orig.properties, name), name
    expected = dict(orig.properties.headers or {})
    expected["traceparent"] = TP
    assert ref.properties.headers == expected
    nh = parse_content_header(new, 7, len(new) - 1)
    assert find_traceparent(new, nh) == TP
    # every original byte of the headers table survives, in order, unchanged
    if h.has_headers:
        old_entries = f[h.headers_start + 4 : h.headers_end]
        assert new[nh.headers_start + 4 : nh.headers_start + 4 + len(old_entries)] == old_entries


def test_existing_traceparent_is_found() -> None:
    f = _frame(commands.Basic.Properties(headers={"x": 1, "traceparent": TP, "y": "z"}))
    h = parse_content_header(f, *_payload_bounds(f))
    assert find_traceparent(f, h) == TP


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"traceparent": TP}, TP),  # sniff's tag alone: the first key, read without a walk
        ({"traceparent": TP, "x": "\x0btraceparentS"}, TP),
        ({"traceparent": 7}, None),  # a key, but not a string
    ],
)
def test_traceparent_as_first_key(headers: dict[str, object], expected: str | None) -> None:
    f = _frame(commands.Basic.Properties(headers=headers))
    h = parse_content_header(f, *_payload_bounds(f))
    assert find_traceparent(f, h) == expected


def test_traceparent_as_a_byte_array_is_read() -> None:
    # pamqp cannot encode a byte array value ('x'); some clients send one
    entry = b"\x0btraceparentx" + struct.pack(">I", len(TP)) + TP.encode()
    table = struct.pack(">I", len(entry)) + entry
    payload = struct.pack(">HHQH", 60, 0, 10, 1 << 13) + table
    f = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    h = parse_content_header(f, 7, len(f) - 1)
    assert find_traceparent(f, h) == TP


def test_needle_inside_a_value_is_not_a_key() -> None:
    f = _frame(commands.Basic.Properties(headers={"x": "\x0btraceparentS"}))
    h = parse_content_header(f, *_payload_bounds(f))
    assert find_traceparent(f, h) is None


@pytest.mark.parametrize(
    "bad", [b"", b"\x00" * 13, b"\x00\x3c\x00\x00" + b"\x00" * 8 + b"\x80\x00\x05ab"]
)
def test_truncated_headers_raise_header_error(bad: bytes) -> None:
    with pytest.raises(HeaderError):
        parse_content_header(bad)


def test_table_lookup_rejects_unknown_type() -> None:
    table = b"\x00\x00\x00\x04\x01aZ\x00"
    with pytest.raises(HeaderError):
        table_lookup(table, 0, len(table), b"b")
