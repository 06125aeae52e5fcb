"""sqlcommenter: append ``/*traceparent='...'*/`` to a statement (pure, both SQL proxies).

Strategy. The comment goes at the end of the statement, as the sqlcommenter
specification asks, so that the database's own logs (general log, slow log,
``pg_stat_activity``, ``log_statement``) carry the trace id. Only the end of the
text is inspected, with C-level ``bytes`` methods, so tagging a large statement
costs no per-byte Python:

- trailing whitespace and ``;`` stay after the comment (``SELECT 1;`` becomes
  ``SELECT 1 /*traceparent='...'*/;``), so a statement terminator is never followed
  by an empty statement;
- if the last line holds a ``--`` or ``#`` line comment, the tag starts on a new
  line, otherwise it would be swallowed by that comment;
- an empty statement is not tagged.

The value is a W3C traceparent (hex and dashes only), so no URL-encoding or quote
escaping is ever needed.
"""

from __future__ import annotations

_TRAILING = b" \t\r\n\f\v;"


def comment(traceparent: str) -> str:
    """The sqlcommenter comment for a traceparent."""
    return f"/*traceparent='{traceparent}'*/"


def tag_sql_bytes(sql: bytes, traceparent: str) -> bytes | None:
    """``sql`` with the comment appended before any trailing ``;``/whitespace; None if empty."""
    end = len(sql.rstrip(_TRAILING))
    if end == 0:
        return None
    line_start = sql.rfind(b"\n", 0, end) + 1
    last_line = sql[line_start:end]
    sep = b"\n" if (b"--" in last_line or b"#" in last_line) else b" "
    return sql[:end] + sep + comment(traceparent).encode("ascii") + sql[end:]


def tag_sql(sql: str, traceparent: str) -> str:
    """The ``str`` form of :func:`tag_sql_bytes` (for PostgreSQL or offline use)."""
    out = tag_sql_bytes(sql.encode("utf-8"), traceparent)
    return sql if out is None else out.decode("utf-8")


def tag_payload(payload: bytes, traceparent: str) -> bytes | None:
    """A MySQL COM_QUERY payload (command byte first) with the tag on its text.

    The text is always the end of the payload (after MySQL 8 query attributes, if
    any), so only its tail is looked at.
    """
    if len(payload) < 2:
        return None
    return tag_sql_bytes(payload, traceparent)


def has_traceparent(sql: bytes | str) -> bool:
    return (b"traceparent" in sql) if isinstance(sql, bytes) else ("traceparent" in sql)
