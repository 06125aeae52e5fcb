"""Events of the MySQL/MariaDB decoder.

Statements (COM_QUERY, COM_STMT_EXECUTE, COM_STMT_BULK_EXECUTE) are
:class:`~proxies.sql.events.MysqlQuery` (``mysql.query``), shared with the SQL
layer; they are re-exported here so that loading a capture registers them.
Everything else a client asks of the server (ping, change of database or user,
prepare, fetch, reset...) is a :class:`MysqlCommand`; the login itself is a
:class:`MysqlConnect`. No event ever holds a password, scramble or auth token.
"""

from __future__ import annotations

from typing import ClassVar

from proxies.sql.events import MysqlQuery
from sniff.events import Event, event

__all__ = ["MysqlCommand", "MysqlConnect", "MysqlQuery"]


@event("mysql.connect")
class MysqlConnect(Event):
    """The connection phase: greeting, login (and TLS/compression decisions)."""

    ts_end: int  # when the server accepted or refused the login
    db_system: str  # mysql | mariadb
    server_version: str
    connection_id: int  # the server's thread id (SHOW PROCESSLIST Id, CONNECTION_ID())
    user: str | None
    database: str | None
    auth_plugin: str  # the plugin that finished the exchange (after any auth switch)
    status: str  # ok | error
    error_code: str | None
    error_message: str | None
    client_tls: bool  # the client side of the proxy spoke TLS
    server_tls: bool  # the server side of the proxy spoke TLS
    capabilities: list[str]  # negotiated capability names (COMPRESS, DEPRECATE_EOF...)
    span_id: str


@event("mysql.command")
class MysqlCommand(Event):
    """A command that is not a statement execution (COM_PING, COM_INIT_DB,
    COM_STMT_PREPARE, COM_STMT_FETCH, COM_CHANGE_USER, COM_RESET_CONNECTION...)."""

    needs_prepare: ClassVar[bool] = True

    db_system: str
    database: str | None
    command: str
    ts_end: int
    status: str  # ok | error | none (commands without a response)
    error_code: str | None
    error_message: str | None
    span_id: str
    statement_id: str | None = None  # COM_STMT_* statement id
    text: str | None = None  # COM_STMT_PREPARE statement; COM_INIT_DB schema; FIELD_LIST table
    keep_literals: bool = False
    rows_returned: int | None = None  # COM_STMT_FETCH
    operation: str = ""  # COM_STMT_PREPARE: the prepared statement's operation

    def prepare(self) -> None:
        if self.command != "COM_STMT_PREPARE" or self.text is None or self.operation:
            return
        from proxies.sql.analysis import analyze_normalize

        info, normalized = analyze_normalize(self.text, "mysql")
        self.operation = info.operation
        if not self.keep_literals:
            self.text = normalized
            self.keep_literals = True
