"""TLS as a sans-IO layer: ``ssl.SSLObject`` over two ``MemoryBIO`` buffers.

Strategy. The relay moves bytes and knows nothing of TLS; asyncio's
``start_tls`` cannot take over a connection the relay is already reading. So
each TLS side of a PostgreSQL connection is an :class:`TlsEndpoint`: ciphertext
in (``receive``), plaintext out, and every byte the TLS engine wants to send
(handshake records, alerts, session tickets, encrypted data) returned to the
caller, who writes it with ``ConnContext.send_to_client``/``send_to_server`` or
returns it from a rewriting handler. Plaintext written before the handshake
finishes is queued and encrypted once it has.

:func:`server_context` and :func:`upstream_context` build the contexts from the
``tls`` option once per proxy (certificate loading is not per connection).
"""

from __future__ import annotations

import ssl
from typing import Any

from proxies.sql import options as sql_options

ALPN = "postgresql"  # PostgreSQL 17+ requires it for direct TLS


class TlsError(Exception):
    """The TLS session failed (handshake, certificate, corrupt record)."""


class TlsEndpoint:
    __slots__ = ("_in", "_obj", "_out", "_queued", "closed", "established")

    def __init__(
        self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self.established = False
        self.closed = False  # the peer sent close_notify
        self._queued: list[bytes] = []

    def start(self) -> bytes:
        """Begin the handshake (client side: the ClientHello to send)."""
        self._handshake()
        return self._out.read()

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Ciphertext from the peer -> (plaintext, bytes to send back to the peer)."""
        self._in.write(data)
        if not self.established:
            self._handshake()
            if not self.established:
                return b"", self._out.read()
        chunks: list[bytes] = []
        obj = self._obj
        while True:
            try:
                chunk = obj.read(262144)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            except ssl.SSLError as e:
                raise TlsError(_describe(e)) from None
            if not chunk:
                break
            chunks.append(chunk)
        plain = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return plain, self._out.read()

    def send(self, plain: bytes) -> bytes:
        """Plaintext to the peer -> ciphertext to transmit (queued until established)."""
        if not self.established:
            if plain:
                self._queued.append(plain)
            return b""
        self._write(plain)
        return self._out.read()

    def _write(self, plain: bytes) -> None:
        view = memoryview(plain)
        try:
            while view:
                n = self._obj.write(view)
                view = view[n:]
        except ssl.SSLError as e:
            raise TlsError(_describe(e)) from None

    def _handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as e:
            raise TlsError(_describe(e)) from None
        self.established = True
        queued, self._queued = self._queued, []
        for q in queued:
            self._write(q)

    def peer_certificate(self) -> bytes | None:
        return self._obj.getpeercert(binary_form=True)

    def version(self) -> str | None:
        return self._obj.version()


def _describe(e: ssl.SSLError) -> str:
    return getattr(e, "verify_message", None) or e.reason or str(e)


def server_context(tls: dict[str, Any]) -> ssl.SSLContext:
    """What sniff presents to clients when it terminates their TLS (the ``tls`` option)."""
    return sql_options.server_context(tls, ALPN)


def upstream_context(tls: dict[str, Any]) -> ssl.SSLContext:
    """What sniff uses towards the server: encryption only (libpq's sslmode=require), or
    with ``ca`` the server's chain verified (verify-ca; verify-full with ``server_hostname``)."""
    return sql_options.upstream_context(tls, ALPN)
