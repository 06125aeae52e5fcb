"""The statement event both SQL proxies emit (``mysql.query``, ``postgres.query``).

One event per statement execution, emitted when its response is complete, so
the correlator turns each into one CLIENT span without pairing. The hot path
fills the wire facts; :meth:`SqlStatement.prepare` (run by the capture writer's
thread, never on the event loop) adds the analysis and, unless
``keep_literals``, replaces the text by its normalised form (literals -> ``?``)
so the capture never holds literal values by default.

A multi-statement packet (``INSERT ...; SELECT ...``) answered with several
results gives one event per result: each carries the whole packet text with its
``batch`` index and ``batch_size``, and ``prepare`` cuts out its own statement
(splitting is done off the hot path, once per packet thanks to a small cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any, ClassVar

from correlate import shared_ids
from proxies.sql.analysis import analyze_normalize, find_traceparent, split_statements
from sniff.events import Event, event


@dataclass(slots=True)
class SqlStatement(Event):
    needs_prepare: ClassVar[bool] = True
    dialect: ClassVar[str] = "generic"  # normalisation rules (see proxies.sql.analysis)

    db_system: str  # mysql | mariadb | postgresql (db.system.name)
    database: str | None  # db.namespace: current database (MySQL) / database name (PostgreSQL)
    command: str  # COM_QUERY, COM_STMT_EXECUTE, Query, Execute...
    text: str  # statement text (normalised by prepare() unless keep_literals)
    keep_literals: bool
    ts_end: int  # when the response was complete
    status: str  # ok | error
    error_code: str | None  # MySQL error number or PostgreSQL SQLSTATE
    error_message: str | None
    rows_returned: int | None
    rows_affected: int | None
    span_id: str  # sniff's CLIENT span id (made on the hot path)
    statement_id: str | None = None  # prepared statement id / name
    traceparent: str | None = None  # sqlcommenter tag added by sniff, or found in the text
    warnings: int | None = None
    batch: int | None = None  # statements in a multi-statement packet (this one's index)
    # added fields (defaults keep every producer compatible)
    batch_size: int | None = None  # results the multi-statement packet produced
    trace_id: str | None = None  # the trace of the sqlcommenter tag sniff injected
    injected: bool = False  # sniff appended the sqlcommenter comment to this statement
    truncated: bool = False  # text holds only the first max_statement_bytes of the statement
    params: list[str | None] | None = None  # bound parameter values (only with keep_literals)
    # the transaction this statement ran in (a per-connection counter, from the server's
    # in-transaction status) and whether it ended it (COMMIT, ROLLBACK, implicit commit)
    transaction: int | None = None
    transaction_end: bool = False
    # shared ids for the causal stage (UUIDs, configured regexes), found by prepare() in the
    # text and in ``id_scan`` (raw bytes such as bound parameters, dropped once scanned)
    ids: dict[str, str] | None = None
    id_scan: bytes | None = None
    # filled by prepare()
    operation: str = ""  # SELECT, INSERT, UPDATE, DELETE, REPLACE, BEGIN, COMMIT...
    tables: list[str] = field(default_factory=list)
    summary: str = ""  # db.query.summary, e.g. "SELECT instances"
    parsed: bool = False  # sqlglot parsed it (False: first-keyword fallback)

    def prepare(self) -> None:
        if self.operation:
            return  # prepared already (idempotent)
        text = self.text
        if self.batch is not None and (self.batch_size or 0) > 1:
            parts = split_statements(text, self.dialect)
            if parts:
                text = parts[_batch_index(parts, self.batch, self.batch_size or 1)]
        info, normalized, ids, tp = _text_facts(text, self.dialect)
        if self.traceparent is None:
            self.traceparent = tp
        if self.id_scan:
            ids = dict(ids or {})
            shared_ids.from_text(self.id_scan, ids, "sql.param")
            self.id_scan = None  # literal values are never stored
        if ids:
            self.ids = dict(ids)
        self.operation = info.operation or self.command
        self.tables = list(info.tables)
        self.summary = info.summary or self.operation
        self.parsed = info.parsed
        if self.keep_literals:
            self.text = text
        else:
            self.text = normalized
            self.keep_literals = True  # idempotent: the text is final now


# What prepare() derives from a statement's text alone, cached by text: a workload
# repeats many statements verbatim (pings, COMMIT, periodic queries), and then the id
# scan and the analysis cost one dictionary lookup. Bounded like the analysis caches.
_FACTS_MAX = 5_000
_FACTS_MAX_LEN = 1_024
_facts: dict[tuple[str, str, int], tuple[Any, str, dict[str, str] | None, str | None]] = {}


def _text_facts(text: str, dialect: str) -> tuple[Any, str, dict[str, str] | None, str | None]:
    sids = shared_ids
    key = (dialect, text, id(sids.settings))  # new id settings (configure()) start afresh
    hit = _facts.get(key)
    if hit is not None:
        return hit
    ids: dict[str, str] = {}
    sids.from_text(text, ids, "sql")
    info, normalized = analyze_normalize(text, dialect, exact=False)  # _facts is the exact cache
    out = (info, normalized, ids or None, find_traceparent(text))
    if len(text) <= _FACTS_MAX_LEN:
        if len(_facts) >= _FACTS_MAX:
            for k in list(islice(_facts, _FACTS_MAX // 4)):
                _facts.pop(k, None)
        _facts[key] = out
    return out


def _batch_index(parts: tuple[str, ...], batch: int, results: int) -> int:
    """Which statement of a multi-statement packet produced result number ``batch``.

    One result per statement, except that a CALL may return several result sets
    (plus its final OK): when there are more results than statements and exactly one
    CALL, that CALL absorbs the extra results.
    """
    if results == len(parts) or results < len(parts):
        return min(batch, len(parts) - 1)
    calls = [i for i, p in enumerate(parts) if p[:4].upper() == "CALL"]
    if len(calls) == 1:
        c = calls[0]
        extra = results - len(parts)
        if batch <= c:
            return batch
        if batch <= c + extra:
            return c
        return min(batch - extra, len(parts) - 1)
    return min(batch, len(parts) - 1)


@event("mysql.query")
class MysqlQuery(SqlStatement):
    dialect: ClassVar[str] = "mysql"

    last_insert_id: int | None = None
    infile_bytes: int | None = None  # LOAD DATA LOCAL INFILE: bytes the client sent


@event("postgres.query")
class PostgresQuery(SqlStatement):
    dialect: ClassVar[str] = "postgres"
