"""Did sniff's capture keep up during a benchmark? (shared by bench/mysql.py, bench/postgres.py)

With ``decode = "capture"`` the proxy ships copies of the bytes it relays to the
capture process (nice +10), which decodes them there. Under CPU saturation that
process can fall behind: events dropped at the shipper are counted in the capture's
``dropped_events``; bytes refused by a full queue stop that connection's decoding and
leave a ``capture.gap`` note. This reads both, and the count of statement events of
one kind, so that a benchmark can say whether decoding kept up with the traffic.
"""

from __future__ import annotations

from collections import Counter


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
