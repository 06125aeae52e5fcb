"""The one edit sniff makes to HTTP/1 bytes: a ``traceparent`` header line.

Strategy. A request head is forwarded byte for byte except that, when it
carries no ``traceparent``, the line ``traceparent: 00-<trace>-<span>-01\\r\\n``
is inserted just before the blank line that ends the head (so it is the last
header). A head that already has one, valid or not, is never edited: a valid
one makes sniff's span its child; an invalid or repeated one is left for the
upstream to judge (W3C says to restart the trace; sniff then starts a new
trace for its own span but cannot replace the header without editing it).

Header lookups here work on a lowercased copy of the head and search for
``\\r\\n<name>:``; that is exact because the head was validated first (every
header line is ``token ":" value`` with no bare CR or LF, see
:mod:`proxies.http.decoder`), so a header line can only start after a CRLF.
"""

from __future__ import annotations

TRACEPARENT_KEY = b"\r\ntraceparent:"


def header_values(lower_head: bytes, name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lowercase, bytes) in a lowercased, validated head.

    ``lower_head`` is the head from the request line up to and including the
    CRLF of the last header line.
    """
    key = b"\r\n" + name + b":"
    out: list[bytes] = []
    i = lower_head.find(key)
    while i >= 0:
        start = i + len(key)
        end = lower_head.find(b"\r\n", start)
        out.append(lower_head[start:end].strip(b" \t"))
        i = lower_head.find(key, end)
    return out


def header_value(head: bytes, lower_head: bytes, name: bytes) -> bytes | None:
    """The first value of ``name`` with its original case (``head`` and ``lower_head`` align)."""
    key = b"\r\n" + name + b":"
    i = lower_head.find(key)
    if i < 0:
        return None
    start = i + len(key)
    return head[start : lower_head.find(b"\r\n", start)].strip(b" \t")


def traceparent_line(traceparent: str) -> bytes:
    return b"traceparent: " + traceparent.encode("ascii") + b"\r\n"


def inject_traceparent(head: bytes, traceparent: str) -> bytes:
    """``head`` (ending in CRLF CRLF) with a traceparent line before the blank line."""
    if not head.endswith(b"\r\n\r\n"):
        raise ValueError("not a complete HTTP/1 head")
    return head[:-2] + traceparent_line(traceparent) + b"\r\n"


def strip_injected(data: bytes, traceparent: str) -> bytes:
    """The inverse of :func:`inject_traceparent` on a stream (for round-trip tests)."""
    return data.replace(traceparent_line(traceparent), b"", 1)
