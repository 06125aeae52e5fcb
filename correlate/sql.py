"""SQL events (MySQL/MariaDB and PostgreSQL) -> CLIENT spans.

A ``mysql.query`` / ``postgres.query`` event is one statement execution with
its response already complete, so each becomes one CLIENT span at once, from
the command to the end of the response; no pairing state is kept here. Other
MySQL commands (``mysql.command``: COM_PING, COM_INIT_DB, COM_STMT_PREPARE,
COM_STMT_FETCH, COM_CHANGE_USER...) become CLIENT spans too, except the ones
the server never answers (COM_QUIT, COM_STMT_CLOSE). ``mysql.connect`` (the
login) is not a span: a failed login shows in ``sniff stats``.

Names and attributes follow the stable OpenTelemetry database conventions:
the span is named by ``db.query.summary`` (``SELECT instances``), and carries
``db.system.name``, ``db.namespace``, ``db.operation.name``,
``db.collection.name`` (only when the statement touches exactly one table, as
the conventions ask), ``db.query.text`` (literals replaced by ``?`` unless the
proxy keeps them), ``db.query.summary``, ``db.response.status_code`` (the
MySQL error number or PostgreSQL SQLSTATE, set on errors),
``db.response.returned_rows``, ``db.operation.batch.size`` for multi-statement
packets, ``server.*``, ``network.peer.*``, plus sniff's own
``sniff.db.rows_affected``, ``sniff.db.tables`` and the client's identity
(``sniff.db.user``; the component itself is the span's service). An error sets
the span status to ERROR with the server's message.

Trace and parent. A statement that carries an application's ``traceparent``
(its own sqlcommenter comment) is that span's child (``propagated``). A
statement sniff tagged itself (``sqlcommenter = true``) keeps the trace id it
put on the wire, so the database's logs name the right trace. Otherwise the
trace id is derived from the span id, so the same capture always gives the
same traces. Every statement is then reported to the causal stage as a *call*
of its client component (with the shared ids found in its text, such as
UUIDs), which attaches it to the unit of work that caused it when it can tell;
the statements of one transaction are decided together (``transaction`` on
the event, from the server's in-transaction status).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from correlate import shared_ids
from correlate.model import Span
from exporters import semconv as sc
from exporters.semconv import (
    DB_COLLECTION_NAME,
    DB_OPERATION_BATCH_SIZE,
    DB_OPERATION_NAME,
    DB_QUERY_PARAMETER_PREFIX,
    DB_QUERY_SUMMARY,
    DB_QUERY_TEXT,
    DB_RESPONSE_RETURNED_ROWS,
    DB_RESPONSE_STATUS_CODE,
    ERROR_TYPE,
    SNIFF_CORRELATION_CONFIDENCE,
    SNIFF_CORRELATION_METHOD,
    SNIFF_DB_BATCH_INDEX,
    SNIFF_DB_COMMAND,
    SNIFF_DB_INFILE_BYTES,
    SNIFF_DB_QUERY_TRUNCATED,
    SNIFF_DB_ROWS_AFFECTED,
    SNIFF_DB_STATEMENT_ID,
    SNIFF_DB_TABLES,
    SNIFF_DB_WARNINGS,
    SNIFF_INJECTED,
)
from proxies.sql.events import SqlStatement
from sniff.events import Event
from sniff.ids import parse_traceparent

if TYPE_CHECKING:
    from correlate.engine import Correlator
    from correlate.identity import ConnInfo

# a transaction that never ends (an idle-in-transaction pooled connection) is
# decided in slices, so its statements' spans are not held back indefinitely
TXN_MAX_NS = 30 * 10**9
TXN_MAX_STATEMENTS = 500
_NO_SPAN = frozenset({"COM_QUIT", "COM_STMT_CLOSE", "COM_STMT_SEND_LONG_DATA"})
_TEXT_MAX = 32 * 1024  # db.query.text longer than this is cut (exporters reject huge attributes)


def derived_trace_id(span_id: str) -> str:
    """A stable trace id for a root span that has none on the wire: its span id,
    widened (unique as the span id is, and the same on every replay of a capture)."""
    return "5e1ff000" + span_id.rjust(16, "0")[:16] + "00000000"


# what _values reads of a statement, in its order ("kind" first: row[0] of a stored row)
_STMT_FIELDS = (
    "kind",
    "ts",
    "conn",
    "db_system",
    "database",
    "command",
    "text",
    "ts_end",
    "status",
    "error_code",
    "error_message",
    "rows_returned",
    "rows_affected",
    "span_id",
    "statement_id",
    "traceparent",
    "warnings",
    "batch",
    "batch_size",
    "trace_id",
    "injected",
    "truncated",
    "params",
    "transaction",
    "transaction_end",
    "ids",
    "operation",
    "tables",
    "summary",
)
_STMT_GET = operator.attrgetter(*_STMT_FIELDS)
_AT_OPERATION = _STMT_FIELDS.index("operation")
_AT_TS_END = _STMT_FIELDS.index("ts_end")


class _Txn:
    __slots__ = ("key", "last", "n", "start")

    def __init__(self, key: tuple[int, int, int], start: int) -> None:
        self.key = key
        self.start = start
        self.last = start  # end of its latest statement
        self.n = 0


class SqlSpans:
    def __init__(self, engine: Correlator) -> None:
        self.e = engine
        # (conn, transaction number) -> the causal group its statements go to
        self.txns: dict[tuple[int, int], _Txn] = {}
        self._base: dict[tuple[Any, ...], dict[str, Any]] = {}

    # --- dispatch ------------------------------------------------------------------------

    def handler_for(self, cls: type) -> Any:
        """The method for events of ``cls`` (the engine calls it directly)."""
        if issubclass(cls, SqlStatement):
            return partial(self._values, _STMT_GET, None, 0)
        return self.feed

    def feed(self, ev: Event) -> None:
        if isinstance(ev, SqlStatement):
            self._statement(ev)
        elif ev.kind == "mysql.command":
            self._command(ev)

    # --- statements ----------------------------------------------------------------------

    def _common(self, info: ConnInfo | None, ev: Any) -> dict[str, Any]:
        a = self._base_attrs(info, ev.conn, ev.db_system, ev.protocol, ev.database).copy()
        if ev.status == "error":
            code = ev.error_code
            if code:
                a[sc.DB_RESPONSE_STATUS_CODE] = str(code)
            a[sc.ERROR_TYPE] = str(code) if code else "error"
        return a

    def _base_attrs(
        self,
        info: ConnInfo | None,
        conn: int,
        db_system: str,
        protocol: str,
        database: str | None,
    ) -> dict[str, Any]:
        """The connection's attributes, built once per (connection, system, database)."""
        system = db_system or ("postgresql" if protocol == "postgres" else "mysql")
        key = (conn, system, database, info is not None and bool(info.identity))
        base = self._base.get(key)
        if base is None:
            base = self._base[key] = self._conn_attrs(info, conn, database, system)
            if len(self._base) > 50_000:
                self._base.clear()
        return base

    def _conn_attrs(
        self, info: ConnInfo | None, conn: int, database: str | None, system: str
    ) -> dict[str, Any]:
        a: dict[str, Any] = {sc.DB_SYSTEM_NAME: system, sc.SNIFF_CONN: conn}
        if database:
            a[sc.DB_NAMESPACE] = database
        if info is not None:
            a[sc.SERVER_ADDRESS] = info.server_addr
            a[sc.SERVER_PORT] = info.server_port
            a[sc.NETWORK_PEER_ADDRESS] = info.server_addr
            a[sc.NETWORK_PEER_PORT] = info.server_port
            a[sc.CLIENT_ADDRESS] = info.client_addr
            a[sc.CLIENT_PORT] = info.client_port
            a[sc.PEER_SERVICE] = info.proxy
            login = info.identity.get("mysql.login") or info.identity.get("postgres.startup")
            if login and login.get("user"):
                a[sc.SNIFF_DB_USER] = login["user"]
        return a

    def row_handler_for(
        self, cls: type, names: list[str], ctor: Callable[..., Event]
    ) -> Callable[[list[Any]], None] | None:
        """What takes the stored rows of ``cls`` (laid out as ``names``) without building
        events (see the engine's ``_feed_rows``): :meth:`_values` reading the row."""
        if not issubclass(cls, SqlStatement):
            return None
        # row[0] is the kind; the fields follow in the order of names
        get = operator.itemgetter(0, *(names.index(n) + 1 for n in _STMT_FIELDS[1:]))
        at_infile = names.index("infile_bytes") + 1 if "infile_bytes" in names else 0
        return partial(self._values, get, ctor, at_infile)

    def _statement(self, ev: SqlStatement) -> None:
        self._values(_STMT_GET, None, 0, ev)

    def _values(
        self,
        get: Callable[[Any], tuple[Any, ...]],
        ctor: Callable[..., Event] | None,
        at_infile: int,
        src: Any,
    ) -> None:
        """One statement: ``src`` is its event (``ctor`` None) or its stored row, whose
        ``infile_bytes`` is at ``at_infile`` (0: the kind has none)."""
        # The hottest function of offline correlation (one call per statement): the
        # statement's fields are locals (read from its event or straight from its stored
        # row by one C call), names are module constants, the rare fields tested once.
        v = get(src)
        if not v[_AT_OPERATION]:  # not prepared (a hand-built event): analyse now
            if ctor is not None:
                src = ctor(*src[1:])
                ctor = None
            src.prepare()
            v = _STMT_GET(src)
        if ctor is None:
            infile_bytes = getattr(src, "infile_bytes", None)
        else:
            infile_bytes = src[at_infile] if at_infile else None
        (
            kind,
            ts,
            conn,
            db_system,
            database,
            command,
            text,
            end,
            status,
            error_code,
            error_message,
            rows_returned,
            rows_affected,
            span_id,
            statement_id,
            traceparent,
            warnings,
            batch,
            batch_size,
            wire_trace_id,
            injected,
            truncated,
            params,
            transaction,
            transaction_end,
            ids,
            operation,
            tables,
            summary,
        ) = v
        e = self.e
        info, service, resource = e.client_of(conn)
        # the connection's attributes, as _base_attrs (inlined: one call per statement less)
        system = db_system or ("postgresql" if kind.split(".", 1)[0] == "postgres" else "mysql")
        key = (conn, system, database, info is not None and bool(info.identity))
        base = self._base.get(key)
        if base is None:
            base = self._base_attrs(info, conn, db_system, kind.split(".", 1)[0], database)
        a = base.copy()
        if status == "error":
            if error_code:
                a[DB_RESPONSE_STATUS_CODE] = str(error_code)
            a[ERROR_TYPE] = str(error_code) if error_code else "error"
        op = operation or command
        a[DB_OPERATION_NAME] = op
        if tables:
            if len(tables) == 1:
                a[DB_COLLECTION_NAME] = tables[0]
            a[SNIFF_DB_TABLES] = list(tables)
        a[DB_QUERY_TEXT] = text if len(text) <= _TEXT_MAX else text[:_TEXT_MAX] + "..."
        summary = summary or op
        a[DB_QUERY_SUMMARY] = summary
        if rows_returned is not None:
            a[DB_RESPONSE_RETURNED_ROWS] = rows_returned
        if rows_affected is not None:
            a[SNIFF_DB_ROWS_AFFECTED] = rows_affected
        if batch_size and batch_size > 1:
            a[DB_OPERATION_BATCH_SIZE] = batch_size
            a[SNIFF_DB_BATCH_INDEX] = batch
        if statement_id is not None:
            a[SNIFF_DB_STATEMENT_ID] = statement_id
        if warnings:
            a[SNIFF_DB_WARNINGS] = warnings
        if truncated:
            a[SNIFF_DB_QUERY_TRUNCATED] = True
        if params:
            for i, p in enumerate(params):
                a[f"{DB_QUERY_PARAMETER_PREFIX}{i}"] = "NULL" if p is None else p
        a[SNIFF_DB_COMMAND] = command
        if infile_bytes is not None:
            a[SNIFF_DB_INFILE_BYTES] = infile_bytes
        if traceparent is None:
            if wire_trace_id:
                trace_id = wire_trace_id
            elif len(span_id) == 16:  # derived_trace_id(span_id), inlined
                trace_id = "5e1ff000" + span_id + "00000000"
            else:
                trace_id = derived_trace_id(span_id)
            parent = None
        else:
            trace_id, parent = _trace(traceparent, injected, span_id, wire_trace_id)
            if parent is not None:
                a[SNIFF_CORRELATION_METHOD] = "propagated"
                a[SNIFF_CORRELATION_CONFIDENCE] = 1.0
            if injected or parent is None:
                a[SNIFF_INJECTED] = bool(injected) or _is_own(traceparent, span_id)
        if end <= ts:
            end = ts
        span = Span(  # all positional (keywords cost a third more)
            trace_id,
            span_id,
            parent,
            summary,
            "CLIENT",
            ts,
            end,
            service,
            a,
            resource,
            "ERROR" if status == "error" else "UNSET",
            (error_message or f"error {error_code}") if status == "error" else "",
            [],
            [],
            conn,
        )
        group = (
            self._group(conn, transaction, ts, v[_AT_TS_END])
            if parent is None and transaction is not None
            else None
        )
        causal = e.causal
        # call(span, conn, ts, ids, decided, group, finished), positionally
        causal.call(
            span,
            conn,
            ts,
            shared_ids.values(ids) if ids else None,
            parent is not None,
            group,
            True,
        )
        if group is not None and transaction_end:
            self.txns.pop((conn, transaction or 0), None)
            causal.group_end(group, end)

    def _group(self, conn: int, transaction: int, ts: int, ts_end: int) -> Any:
        key = (conn, transaction)
        t = self.txns.get(key)
        if t is None:
            t = self.txns[key] = _Txn((conn, transaction, 0), ts)
        elif t.n >= TXN_MAX_STATEMENTS or ts - t.start > TXN_MAX_NS:
            self.e.causal.group_end(t.key, ts)  # decide a never-ending transaction in slices
            t = self.txns[key] = _Txn((conn, transaction, t.key[2] + 1), ts)
        t.n += 1
        t.last = max(t.last, ts_end)
        return t.key

    # --- other commands ------------------------------------------------------------------

    def _command(self, ev: Any) -> None:
        if ev.command in _NO_SPAN:
            return
        info = self.e.conn(ev.conn)
        service, resource = self.e.service(info)
        a = self._common(info, ev)
        name = ev.command[4:] if ev.command.startswith("COM_") else ev.command
        a[sc.DB_OPERATION_NAME] = name
        a[sc.SNIFF_DB_COMMAND] = ev.command
        if ev.statement_id is not None:
            a[sc.SNIFF_DB_STATEMENT_ID] = ev.statement_id
        if ev.text:
            if ev.command == "COM_STMT_PREPARE":
                a[sc.DB_QUERY_TEXT] = ev.text[:_TEXT_MAX]
            elif ev.command == "COM_FIELD_LIST":
                a[sc.DB_COLLECTION_NAME] = ev.text
            elif ev.command == "COM_INIT_DB":
                a[sc.DB_NAMESPACE] = ev.text
        if ev.rows_returned is not None:
            a[sc.DB_RESPONSE_RETURNED_ROWS] = ev.rows_returned
        span = Span(
            derived_trace_id(ev.span_id),
            ev.span_id,
            None,
            name,
            "CLIENT",
            ev.ts,
            max(ev.ts, ev.ts_end),
            service,
            a,
            resource,
            conn=ev.conn,
        )
        if ev.status == "error":
            span.status = "ERROR"
            span.status_message = ev.error_message or f"error {ev.error_code}"
        self.e.causal.call(span, ev.conn, ev.ts, None, decided=False)
        self.e.emit(span)

    # --- endings -------------------------------------------------------------------------

    def _end_txns(self, match: Any, ts: int | None = None) -> None:
        for key in [k for k in self.txns if match(k)]:
            t = self.txns.pop(key)
            self.e.causal.group_end(t.key, t.last if ts is None else max(ts, t.last))

    def conn_closed(self, info: ConnInfo, ts: int, reason: str) -> None:
        self._end_txns(lambda k: k[0] == info.conn, ts)

    def expire(self, now: int) -> None:
        if self.txns:  # decided as of their last statement, which is in the past
            limit = now - TXN_MAX_NS
            self._end_txns(lambda k: self.txns[k].last < limit)

    def flush(self, now: int) -> None:
        self._end_txns(lambda k: True, now)


def _trace(
    traceparent: str, injected: bool, span_id: str, trace_id: str | None
) -> tuple[str, str | None]:
    """(trace id, parent span id) from the statement's own wire context."""
    wire = parse_traceparent(traceparent)
    if wire is not None:
        if injected or wire[1] == span_id:  # sniff's own tag names this span
            return wire[0], None
        return wire[0], wire[1]  # the application's context: this span is its child
    if trace_id:
        return trace_id, None
    return derived_trace_id(span_id), None


def _is_own(traceparent: str | None, span_id: str) -> bool:
    wire = parse_traceparent(traceparent)
    return wire is not None and wire[1] == span_id
