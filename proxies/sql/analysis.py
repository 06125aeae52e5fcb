"""Statement analysis: operation, tables, summary, normalised text.

Strategy. Analysis runs in the capture writer's thread (``SqlStatement.prepare``),
never on the proxy's event loop, but it must still keep up with a busy control
plane, so it is layered from cheap to expensive:

1. *First keyword*. An anchored regex skips leading comments and parentheses and
   reads the first keyword (about 1 us). Statements that touch no table or whose
   tables do not matter (BEGIN, COMMIT, ROLLBACK, SET, SHOW, USE, SAVEPOINT, XA...)
   stop here: no parse at all.
2. *Shape cache*. For everything else the text is normalised (string and number
   literals become ``?``; then, for the cache key only, ``IN (?, ?, ?)`` lists and
   multi-row ``VALUES (?, ?), (?, ?)`` collapse to one element) and the answer is
   looked up by that shape. A workload is a few hundred shapes repeated with
   different literals, so almost every statement is a dictionary hit.
3. *sqlglot*, on a cache miss only, parses the shape (about 0.5 ms): operation for
   ``WITH`` statements, tables in order of appearance (CTE names and ``dual``
   excluded), and a ``db.query.summary`` built the way the OpenTelemetry
   conventions describe (operations and tables in query order, e.g.
   ``INSERT shipping_details SELECT orders``).
4. Statements sqlglot cannot parse (``LOAD DATA``, ``REPLACE``, vendor syntax, a
   truncated text) fall back to a keyword regex for the tables; they still get an
   operation and therefore a span (``parsed`` is False).

Normalisation is regex based and dialect aware: MySQL strings may use backslash
escapes and double quotes; PostgreSQL double quotes are identifiers, strings use
``''`` (or backslashes in ``E''``) and ``$tag$...$tag$`` dollar quoting. Numbers are
replaced only where they start a token (``t1``, ``anon_1`` and ``$1`` stay): the
pattern begins with a digit so the regex engine skips to digits in C, and a
look-behind rejects digits inside identifiers. Comments are kept verbatim.

The regexes are tuned for CPython's ``re``: every alternative starts with a
character class, which lets the engine skip to candidate positions in C; this is
what makes ~2 KB SQLAlchemy statements cost a few microseconds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from typing import Any

from sniff.ids import parse_traceparent


@dataclass(frozen=True, slots=True)
class StatementInfo:
    operation: str  # upper-case keyword: SELECT, INSERT, ... ("" if none)
    tables: tuple[str, ...]  # tables touched, in order of appearance, deduplicated
    summary: str  # db.query.summary: "SELECT instances" / "INSERT instances"
    parsed: bool  # True when a full parse produced the tables


# --- first keyword -----------------------------------------------------------------------

_FIRST = re.compile(
    r"(?:\s+|/\*(?![!M]).*?\*/|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|\()*"
    r"(?:/\*M?!\d*\s*)?([A-Za-z]+)(?:\s+([A-Za-z]+))?",
    re.S,
)

# operations whose tables we do not extract: answered from the first keyword alone
_NO_PARSE = frozenset(
    {
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "SET",
        "SHOW",
        "USE",
        "XA",
        "DO",
        "FLUSH",
        "KILL",
        "GRANT",
        "REVOKE",
        "RESET",
        "PURGE",
        "CHECKSUM",
        "HELP",
        "PREPARE",
        "EXECUTE",
        "DEALLOCATE",
        "UNLOCK",
        "DISCARD",
        "LISTEN",
        "NOTIFY",
        "UNLISTEN",
        "VACUUM",
        "CHECKPOINT",
        "FETCH",
        "CLOSE",
        "DECLARE",
        "MOVE",
        "ABORT",
        "END",
        "SIGNAL",
        "RESIGNAL",
        "BINLOG",
        "SHUTDOWN",
        "INSTALL",
        "UNINSTALL",
        "CACHE",
        "VALUES",
    }
)

# first keyword -> operation name, where they differ
_OP_ALIAS = {
    "DESC": "DESCRIBE",
    "EXPLAIN": "EXPLAIN",
    "ABORT": "ROLLBACK",
    "END": "COMMIT",
}


def first_keyword(sql: str) -> str:
    """The statement's operation keyword, upper case ("" when there is none).

    ``START TRANSACTION`` is reported as ``BEGIN`` so transaction counts add up;
    MySQL executable comments (``/*!40101 SET ... */``) are looked into.
    """
    m = _FIRST.match(sql)
    if m is None:
        return ""
    kw = m.group(1).upper()
    if kw == "START":
        nxt = (m.group(2) or "").upper()
        if nxt == "TRANSACTION":
            return "BEGIN"
        return "START"
    return _OP_ALIAS.get(kw, kw)


# --- normalisation -----------------------------------------------------------------------

# numbers: start with a digit (fast skip in C), reject digits glued to identifiers
_NUM = r"\d(?<![\w$.]\d)(?:[xX][0-9a-fA-F]+|[\d.]*(?:[eE][-+]?\d+)?)"
_SQ_BACKSLASH = r"'(?:[^'\\]|\\.|'')*'"
_DQ_BACKSLASH = r"\"(?:[^\"\\]|\\.|\"\")*\""
_SQ_STANDARD = r"'(?:[^']|'')*'"
_E_STRING = r"[eE]'(?:[^'\\]|\\.|'')*'"
_DOLLAR = r"\$(?P<dq>[A-Za-z_]\w*|)\$.*?\$(?P=dq)\$"  # $$...$$ and $tag$...$tag$
_COMMENTS_MY = r"/\*.*?\*/|--[^\n]*|\#[^\n]*"
_COMMENTS_PG = r"/\*.*?\*/|--[^\n]*"

_DIALECTS = ("mysql", "postgres", "generic")


def _compile(dialect: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(fast pattern without comments, full pattern with comments captured as group ``c``)."""
    if dialect == "mysql":
        lits = [_SQ_BACKSLASH, _DQ_BACKSLASH, _NUM]
        comments = _COMMENTS_MY
    elif dialect == "postgres":
        lits = [_E_STRING, _SQ_STANDARD, _DOLLAR, _NUM]
        comments = _COMMENTS_PG
    else:
        lits = [_SQ_BACKSLASH, _NUM]
        comments = _COMMENTS_MY
    fast = re.compile("|".join(lits), re.S)
    full = re.compile(f"(?P<c>{comments})|" + "|".join(lits), re.S)
    return fast, full


_PATTERNS = {d: _compile(d) for d in _DIALECTS}
_COMMENT_MARKS = ("/*", "--", "#")


def _keep_comments(m: re.Match[str]) -> str:
    c = m.group("c")
    return c if c is not None else "?"


def _dialect(dialect: str | None) -> str:
    if dialect in (None, ""):
        return "generic"
    d = dialect.lower()
    if d in ("mysql", "mariadb"):
        return "mysql"
    if d in ("postgres", "postgresql", "pg"):
        return "postgres"
    return "generic"


def _normalize(sql: str, d: str) -> str:
    fast, full = _PATTERNS[d]
    if "/*" in sql or "--" in sql or (d != "postgres" and "#" in sql):
        return full.sub(_keep_comments, sql)
    return fast.sub("?", sql)


def normalize(sql: str, dialect: str | None = None) -> str:
    """Replace string and number literals by ``?`` (comments and identifiers kept).

    ``dialect`` is ``mysql``/``mariadb``, ``postgres``/``postgresql``, or None for a
    conservative generic form (single-quoted strings and numbers only).
    """
    return _normalize(sql, _dialect(dialect))


_IN_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)")
_ROWS = re.compile(r"\(\?\)(?:\s*,\s*\(\?\))+")


def shape(normalized: str) -> str:
    """The cache key of a normalised statement: IN lists and VALUES rows collapsed."""
    if "?" not in normalized:
        return normalized
    s = _IN_LIST.sub("(?)", normalized)
    if "),(" in s or "), (" in s:
        s = _ROWS.sub("(?)", s)
    return s


# --- statement splitting (multi-statement packets) --------------------------------------

_SPLIT_MY = re.compile(
    r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`|" + _COMMENTS_MY + "|;", re.S
)
_SPLIT_PG = re.compile(
    _E_STRING + "|" + _SQ_STANDARD + '|"[^"]*"|' + _DOLLAR + "|" + _COMMENTS_PG + "|;", re.S
)


@lru_cache(maxsize=256)
def split_statements(sql: str, dialect: str | None = None) -> tuple[str, ...]:
    """Split a multi-statement text at top-level ``;`` (quotes and comments respected).

    Empty statements are dropped; each statement is stripped of surrounding space.
    """
    pat = _SPLIT_PG if _dialect(dialect) == "postgres" else _SPLIT_MY
    out: list[str] = []
    start = 0
    for m in pat.finditer(sql):
        if m.group() == ";":
            part = sql[start : m.start()].strip()
            if part:
                out.append(part)
            start = m.end()
    tail = sql[start:].strip()
    if tail:
        out.append(tail)
    return tuple(out)


# --- traceparent in a comment (sqlcommenter) ---------------------------------------------

_TP = re.compile(
    r"traceparent\s*=\s*'([0-9a-fA-F]{2}-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-fA-F]{2})'"
)


def find_traceparent(sql: str) -> str | None:
    """A valid W3C traceparent carried in a sqlcommenter comment, else None."""
    if "traceparent" not in sql:
        return None
    m = _TP.search(sql)
    if m is None or parse_traceparent(m.group(1)) is None:
        return None
    return m.group(1).lower()


# --- tables: sqlglot on a cache miss, regex fallback -------------------------------------

logging.getLogger("sqlglot").setLevel(logging.ERROR)  # "falling back to Command" chatter

_FALLBACK_TABLES = re.compile(
    r"\b(?:FROM|JOIN|INTO(?:\s+TABLE)?|UPDATE|TABLE|TABLES)\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?"
    r"((?:`[^`]+`|\"[^\"]+\"|[A-Za-z_][\w$]*)(?:\.(?:`[^`]+`|\"[^\"]+\"|[A-Za-z_][\w$]*))?)",
    re.I,
)
_LOCK_LIST = re.compile(r"(?i)\bTABLES?\s+(.*)")
_IDENT = re.compile(
    r"(?:`[^`]+`|\"[^\"]+\"|[A-Za-z_][\w$]*)(?:\.(?:`[^`]+`|\"[^\"]+\"|[A-Za-z_][\w$]*))?"
)
_NOT_TABLES = frozenset({"dual", "select", "set", "values", "lateral", "unnest"})
_SUMMARY_MAX = 255


def _strip_quotes(name: str) -> str:
    return ".".join(p.strip('`"') for p in name.split("."))


def _fallback(op: str, text: str) -> StatementInfo:
    tables: list[str] = []
    names: list[str] = [m.group(1) for m in _FALLBACK_TABLES.finditer(text)]
    if op == "LOCK":  # LOCK TABLES a READ, b AS x WRITE
        lm = _LOCK_LIST.search(text)
        if lm is not None:
            names = []
            for item in lm.group(1).split(","):
                im = _IDENT.match(item.strip())
                if im is not None:
                    names.append(im.group())
    for raw in names:
        name = _strip_quotes(raw)
        if name.lower() not in _NOT_TABLES and name not in tables:
            tables.append(name)
    return StatementInfo(op, tuple(tables), _summary([op, *tables]), False)


def _summary(parts: list[str]) -> str:
    s = " ".join(p for p in parts if p)
    return s if len(s) <= _SUMMARY_MAX else s[:_SUMMARY_MAX].rsplit(" ", 1)[0]


_sqlglot: tuple[Any, Any] | None = None


def _glot() -> tuple[Any, Any]:
    global _sqlglot
    if _sqlglot is None:
        import sqlglot
        from sqlglot import exp

        _sqlglot = (sqlglot, exp)
    return _sqlglot


_OPS_BY_KEY = {
    "select": "SELECT",
    "union": "SELECT",
    "intersect": "SELECT",
    "except": "SELECT",
    "insert": "INSERT",
    "update": "UPDATE",
    "delete": "DELETE",
    "merge": "MERGE",
    "create": "CREATE",
    "drop": "DROP",
    "alter": "ALTER",
    "truncatetable": "TRUNCATE",
}
_MAX_PARSE = 20_000  # characters; beyond this the regex fallback answers


def _parse(op: str, text: str, dialect: str) -> StatementInfo:
    """Full analysis of one statement shape with sqlglot (cache misses only)."""
    if len(text) > _MAX_PARSE:
        return _fallback(op, text)
    sqlglot, exp = _glot()
    parse_text = text
    if op == "REPLACE":  # sqlglot has no REPLACE INTO; the tables are the same as INSERT's
        parse_text = re.sub(r"(?i)\bREPLACE\b", "INSERT", text, count=1)
    try:
        tree = sqlglot.parse_one(parse_text, read="postgres" if dialect == "postgres" else "mysql")
    except Exception:
        return _fallback(op, text)
    if tree is None or tree.key == "command":
        return _fallback(op, text)
    if op in ("WITH", "") or op not in _KNOWN_TABLE_OPS:
        op = _OPS_BY_KEY.get(tree.key, op or tree.key.upper())
    ctes = {c.alias_or_name for c in tree.find_all(exp.CTE)}
    tables: list[str] = []
    parts: list[str] = []
    for node in tree.dfs():
        key = node.key
        if key == "table":
            name = ".".join(p for p in (node.catalog, node.db, node.name) if p)
            if not name or name in ctes or name.lower() in _NOT_TABLES:
                continue
            if name not in tables:
                tables.append(name)
            if not parts or parts[-1] != name:
                parts.append(name)
        elif key in _OPS_BY_KEY and key in ("select", "insert", "update", "delete", "merge"):
            kw = _OPS_BY_KEY[key]
            if node is tree:
                kw = op
            parts.append(kw)
    if not parts or parts[0] != op:
        parts.insert(0, op)
    # tables in order of appearance in the text
    low = text.lower()
    tables.sort(key=lambda t: _pos(low, t))
    return StatementInfo(op, tuple(tables), _summary(parts), True)


def _pos(low: str, table: str) -> int:
    i = low.find(table.lower().split(".")[-1])
    return i if i >= 0 else len(low)


_KNOWN_TABLE_OPS = frozenset(
    {
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "REPLACE",
        "MERGE",
        "CREATE",
        "DROP",
        "ALTER",
        "TRUNCATE",
    }
)


# --- the cache and the public API --------------------------------------------------------

# Bounded caches (insertion-ordered dicts; the oldest quarter goes when full). Only the
# capture writer's thread uses them, and single dict operations are atomic anyway.
SHAPES_MAX = 10_000
EXACT_MAX = 5_000
_SHAPE_MAX_LEN = 16_384  # longer shapes are re-parsed rather than pinned in memory
_EXACT_MAX_LEN = 1_024  # longer texts are rarely repeated verbatim
_shapes: dict[tuple[str, str], StatementInfo] = {}
_exact: dict[tuple[str, str], tuple[StatementInfo, str]] = {}
stats = {"exact_hits": 0, "shape_hits": 0, "parses": 0, "keyword_only": 0}


def _bounded_put(cache: dict[Any, Any], limit: int, key: Any, value: Any) -> None:
    if len(cache) >= limit:
        for k in list(islice(cache, limit // 4)):
            cache.pop(k, None)
    cache[key] = value


def analyze_normalize(
    sql: str, dialect: str | None = None, exact: bool = True
) -> tuple[StatementInfo, str]:
    """(analysis, normalised text) in one pass: what ``SqlStatement.prepare`` needs.
    ``exact=False``: skip the exact-text cache (the caller keeps its own)."""
    d = _dialect(dialect)
    key = (d, sql)
    exact = exact and len(sql) <= _EXACT_MAX_LEN
    if exact:
        hit = _exact.get(key)
        if hit is not None:
            stats["exact_hits"] += 1
            return hit
    op = first_keyword(sql)
    norm = _normalize(sql, d)
    if op in _NO_PARSE or not op:
        stats["keyword_only"] += 1
        info = StatementInfo(op, (), op, False)
    elif op == "CALL":
        stats["keyword_only"] += 1
        m = _CALL.match(norm)
        info = StatementInfo(op, (), f"CALL {m.group(1)}" if m else op, False)
    else:
        skey = (d, shape(norm))
        info_or_none = _shapes.get(skey)
        if info_or_none is None:
            stats["parses"] += 1
            info = _parse(op, skey[1], d)
            if len(skey[1]) <= _SHAPE_MAX_LEN:
                _bounded_put(_shapes, SHAPES_MAX, skey, info)
        else:
            stats["shape_hits"] += 1
            info = info_or_none
    out = (info, norm)
    if exact:
        _bounded_put(_exact, EXACT_MAX, key, out)
    return out


_CALL = re.compile(r"(?is).*?\bCALL\s+([`\"\w$.]+)")


def analyze(sql: str, dialect: str | None = None) -> StatementInfo:
    return analyze_normalize(sql, dialect)[0]


def clear_cache() -> None:
    _shapes.clear()
    _exact.clear()
    split_statements.cache_clear()
    for k in stats:
        stats[k] = 0


# the signature both SQL proxies may rely on for a custom classifier
Analyzer = Callable[[str], StatementInfo]
