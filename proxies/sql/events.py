"""The statement event both SQL proxies emit (``mysql.query``, ``postgres.query``).

One event per statement execution, emitted when its response is complete, so
the correlator turns each into one CLIENT span without pairing. The hot path
fills the wire facts; :meth:`SqlStatement.prepare` (run by the capture writer's
thread, never on the event loop) adds the analysis and, unless
``keep_literals``, replaces the text by its normalised form (literals -> ``?``)
so the capture never holds literal values by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from sniff.events import Event, event


@dataclass(slots=True)
class SqlStatement(Event):
    needs_prepare: ClassVar[bool] = True

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
    # filled by prepare()
    operation: str = ""  # SELECT, INSERT, UPDATE, DELETE, REPLACE, BEGIN, COMMIT...
    tables: list[str] = field(default_factory=list)
    summary: str = ""  # db.query.summary, e.g. "SELECT instances"
    parsed: bool = False  # sqlglot parsed it (False: first-keyword fallback)

    def prepare(self) -> None:
        from proxies.sql.analysis import analyze, normalize

        info = analyze(self.text)
        self.operation = info.operation
        self.tables = list(info.tables)
        self.summary = info.summary
        self.parsed = info.parsed
        if not self.keep_literals:
            self.text = normalize(self.text)
            self.keep_literals = True  # idempotent: the text is final now


@event("mysql.query")
class MysqlQuery(SqlStatement):
    pass


@event("postgres.query")
class PostgresQuery(SqlStatement):
    pass
