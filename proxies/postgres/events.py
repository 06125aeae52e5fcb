"""PostgreSQL events besides the shared statement event.

Statements are :class:`proxies.sql.events.PostgresQuery` (``postgres.query``),
owned by the shared SQL contract and re-exported here. The events below are
what only PostgreSQL has: the session handshake outcome, cancel requests (a
separate connection naming a backend pid) and asynchronous LISTEN/NOTIFY
deliveries. None of them ever holds a credential: no password, md5 hash,
SASL exchange data or cancel secret key is read into an event.
"""

from __future__ import annotations

from proxies.sql.events import PostgresQuery
from sniff.events import Event, event

__all__ = ["PostgresCancel", "PostgresNotification", "PostgresQuery", "PostgresSession"]


@event("postgres.session")
class PostgresSession(Event):
    """The startup handshake finished (first ReadyForQuery) or failed (ErrorResponse).

    ``ts`` is when the StartupMessage was sent; ``ts_end`` when the answer came.
    ``auth`` names the method the server asked for (trust, password, md5, gss,
    sspi, or the SASL mechanism the client chose, e.g. scram-sha-256).
    """

    database: str | None
    user: str | None
    application_name: str | None
    auth: str
    protocol_version: str  # "3.0", "3.2"... as negotiated
    server_version: str | None
    backend_pid: int | None
    client_tls: bool  # the client spoke TLS to sniff (terminated by sniff)
    upstream_tls: bool  # sniff spoke TLS to the server
    ts_end: int
    status: str  # ok | error
    error_code: str | None = None  # SQLSTATE
    error_message: str | None = None


@event("postgres.cancel")
class PostgresCancel(Event):
    """A CancelRequest (its own connection) for the query running on ``backend_pid``.

    ``target_conn`` is the sniff connection whose BackendKeyData named that pid,
    when it went through the same proxy. The secret key is never recorded.
    """

    backend_pid: int
    target_conn: int | None


@event("postgres.notification")
class PostgresNotification(Event):
    """A NOTIFY delivered to a listening client (NotificationResponse)."""

    channel: str
    sender_pid: int
    payload_size: int
    payload: str | None = None  # kept only with capture_sql_literals = true
