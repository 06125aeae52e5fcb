"""OTLP export against real receivers (opentelemetry-proto over HTTP and gRPC),
live from ``sniff run`` and offline with ``sniff export``; Jaeger JSON files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pika

from tests.conftest import require_server
from tests.helpers import ROOT
from tests.integration.amqp.conftest import qname
from tests.otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver


def _traffic(port: int) -> list[str]:
    """An RPC round trip plus a plain publish; returns the traceparents consumers saw."""
    q = qname("export")
    conn = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1", port, heartbeat=0, client_properties={"connection_name": "exporter-test"}
        )
    )
    ch = conn.channel()
    ch.queue_declare(q, auto_delete=True)
    ch.confirm_delivery()
    ch.basic_publish(
        "", q, b"payload", pika.BasicProperties(message_id="m-42", correlation_id="c-42")
    )
    m, props, _ = ch.basic_get(q)
    ch.basic_ack(m.delivery_tag)
    conn.close()
    return [props.headers["traceparent"]]


def _check_tree(spans: list[dict[str, Any]], tps: list[str]) -> None:
    assert spans, "the receiver got no spans"
    for tp in tps:
        _, trace_id, span_id, _ = tp.split("-")
        prod = next(s for s in spans if s["span_id"] == span_id)
        assert prod["kind"] == "PRODUCER" and prod["trace_id"] == trace_id
        assert prod["resource"]["service.name"] == "exporter-test"
        assert prod["scope"] == "sniff"
        a = prod["attrs"]
        assert a["messaging.system"] == "rabbitmq"
        assert (
            a["messaging.operation.type"] == "send" and a["messaging.operation.name"] == "publish"
        )
        assert (
            a["messaging.message.id"] == "m-42" and a["messaging.message.conversation_id"] == "c-42"
        )
        assert a["messaging.message.body.size"] == 7
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == 5672
        assert prod["end"] >= prod["start"] > 0
        cons = [s for s in spans if s["parent_id"] == span_id]
        assert len(cons) == 1
        c = cons[0]
        assert c["kind"] == "CONSUMER" and c["trace_id"] == trace_id
        assert (trace_id, span_id) in c["links"]
        assert c["attrs"]["messaging.rabbitmq.message.delivery_tag"] == 1
        assert c["attrs"]["messaging.operation.type"] == "receive"


def test_live_otlp_http_export(sniff_run: Any) -> None:
    require_server("rabbitmq")
    with OtlpHttpReceiver() as recv:
        proc = sniff_run(
            [{"protocol": "amqp", "upstream": "127.0.0.1:5672"}], export={"otlp": recv.url}
        )
        assert f"live OTLP export to {recv.url}" in proc.text()
        tps = _traffic(proc.port())
        assert proc.stop() == 0
        deadline = time.time() + 10
        while len(recv.spans()) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert recv.paths and all(p == "/v1/traces" for p in recv.paths)
        _check_tree(recv.spans(), tps)


def _export(capture: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sniff", "export", capture, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_offline_export_http_grpc_and_jaeger_json(sniff_run: Any, tmp_path: Path) -> None:
    require_server("rabbitmq")
    proc = sniff_run([{"protocol": "amqp", "upstream": "127.0.0.1:5672"}])
    tps = _traffic(proc.port())
    proc.stop()
    with OtlpHttpReceiver() as recv:
        r = _export(proc.capture, "--otlp", recv.url)
        assert r.returncode == 0, r.stderr
        assert "exported 2 spans in 1 traces" in r.stdout
        _check_tree(recv.spans(), tps)
    with OtlpGrpcReceiver() as grecv:
        r = _export(proc.capture, "--otlp", grecv.url)
        assert r.returncode == 0, r.stderr
        _check_tree(grecv.spans(), tps)
    out = tmp_path / "traces.json"
    r = _export(proc.capture, "--jaeger-json", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    (trace,) = doc["data"]
    _, trace_id, span_id, _ = tps[0].split("-")
    assert trace["traceID"] == trace_id
    spans = {s["spanID"]: s for s in trace["spans"]}
    consumer = next(s for s in trace["spans"] if s["references"])
    assert {"refType": "CHILD_OF", "traceID": trace_id, "spanID": span_id} in consumer["references"]
    assert trace["processes"][spans[span_id]["processID"]]["serviceName"] == "exporter-test"
    tags = {t["key"]: t for t in spans[span_id]["tags"]}
    assert tags["span.kind"]["value"] == "producer"
    assert tags["messaging.message.body.size"] == {
        "key": "messaging.message.body.size",
        "type": "int64",
        "value": 7,
    }
    assert isinstance(spans[span_id]["startTime"], int) and spans[span_id]["duration"] >= 0


def test_export_to_unreachable_receiver_fails_clearly(sniff_run: Any) -> None:
    require_server("rabbitmq")
    proc = sniff_run([{"protocol": "amqp", "upstream": "127.0.0.1:5672"}])
    _traffic(proc.port())
    proc.stop()
    from tests.helpers import free_port

    port = free_port()
    t0 = time.monotonic()
    r = _export(proc.capture, "--otlp", f"http://127.0.0.1:{port}")
    assert r.returncode == 1
    # at once, naming the receiver and the reason, without the SDK's retries
    assert time.monotonic() - t0 < 5
    assert f"cannot reach the OTLP receiver at http://127.0.0.1:{port}" in r.stderr
    assert "Connection refused" in r.stderr and "retrying" not in r.stderr
