"""Statement analysis: operation, tables, summary, normalised text.

PLACEHOLDER (first-keyword only) -- the SQL helper replaces this with the real
implementation (sqlglot behind a shape-keyed cache, fast first-keyword path).
The API below is the contract both SQL proxies and the correlator rely on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StatementInfo:
    operation: str  # upper-case keyword: SELECT, INSERT, ... ("" if none)
    tables: tuple[str, ...]  # tables touched, in order of appearance, deduplicated
    summary: str  # db.query.summary: "SELECT instances" / "INSERT instances"
    parsed: bool  # True when a full parse produced the tables


_FIRST = re.compile(r"^\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*|#[^\n]*\n\s*)*([A-Za-z]+)", re.S)
_LITERALS = re.compile(r"'(?:[^'\\]|\\.|'')*'|\b\d+(?:\.\d+)?\b")


def analyze(sql: str) -> StatementInfo:
    m = _FIRST.match(sql)
    op = m.group(1).upper() if m else ""
    return StatementInfo(op, (), op, False)


def normalize(sql: str) -> str:
    return _LITERALS.sub("?", sql)
