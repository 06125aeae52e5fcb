"""Bad input and secrets: garbage goes to passthrough without hurting anyone
else; Start-Ok credentials (PLAIN, AMQPLAIN) never reach the capture."""

from __future__ import annotations

import glob
import socket
from typing import Any

import amqp.exceptions
import kombu
import pika
import pytest

from sniff.events import ProtocolError
from tests.integration.amqp.conftest import qname

SECRET = "s3cret-Pw-7f1e"


def _capture_bytes(capture: str) -> bytes:
    return b"".join(open(p, "rb").read() for p in glob.glob(capture + "*"))


def test_credentials_are_never_stored(sniff_amqp: Any) -> None:
    port = sniff_amqp.port()
    with pytest.raises(pika.exceptions.AMQPError):  # PLAIN, refused by the broker
        pika.BlockingConnection(
            pika.ConnectionParameters(
                "127.0.0.1", port, credentials=pika.PlainCredentials("guest", SECRET), heartbeat=0
            )
        )
    with (
        pytest.raises(amqp.exceptions.AMQPError),  # AMQPLAIN (py-amqp, as kombu uses it)
        kombu.Connection(
            f"amqp://guest:{SECRET}@127.0.0.1:{port}//", login_method="AMQPLAIN", connect_timeout=5
        ) as c,
    ):
        c.connect()
    good = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port, heartbeat=0))
    good.close()
    sniff_amqp.stop()
    starts = [e for e in sniff_amqp.events("amqp.method") if e.method == "Connection.StartOk"]
    assert {e.args["mechanism"] for e in starts} >= {"PLAIN", "AMQPLAIN"}
    assert all("response" not in e.args for e in starts)
    raw = _capture_bytes(sniff_amqp.capture)
    assert SECRET.encode() not in raw
    assert b"\\u0000guest\\u0000guest" not in raw and b"\x00guest\x00guest" not in raw


def test_garbage_client_goes_passthrough_and_others_carry_on(sniff_amqp: Any) -> None:
    port = sniff_amqp.port()
    good = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port, heartbeat=0))
    ch = good.channel()
    q = qname("robust")
    ch.queue_declare(q, auto_delete=True)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = s.recv(100)  # the broker's own answer reaches the client unchanged
    assert answer == b"AMQP\x00\x00\x09\x01"
    with socket.create_connection(("127.0.0.1", port)) as s:  # valid header, then junk frames
        s.settimeout(5)
        s.sendall(b"AMQP\x00\x00\x09\x01")
        s.recv(4096)  # Connection.Start
        s.sendall(b"\x07\x00\x00\x00\x00\x00\x03abc\xce")  # frame type 7 does not exist
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    ch.basic_publish("", q, b"still fine")
    _m, props, body = ch.basic_get(q, auto_ack=True)
    assert body == b"still fine" and "traceparent" in props.headers
    good.close()
    sniff_amqp.stop()
    errors = [e for e in sniff_amqp.events("core.protocol_error") if isinstance(e, ProtocolError)]
    assert len(errors) == 2
    assert "unsupported protocol header" in errors[0].reason or "not an AMQP" in errors[0].reason
    assert "unknown frame type 7" in errors[1].reason and errors[1].offset == 8
    assert sniff_amqp.returncode == 0
