"""The API service: a threaded HTTP server (one process, a thread per client
connection) that, per ``POST /v2.1/servers``: records the instance in one
transaction, makes an RPC call to the scheduler, updates the instance with the
chosen host, casts a build to the workers, and answers 202."""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pika

from demo.system.common import GroundTruth, db, oslo_envelope, oslo_open, token

args: Any = None
gt: GroundTruth
local = threading.local()


def resources() -> Any:
    if not hasattr(local, "db"):
        local.db = db(args.db_port, "api", args.database)
        local.amqp = pika.BlockingConnection(
            pika.ConnectionParameters(
                "127.0.0.1",
                args.amqp_port,
                heartbeat=0,
                client_properties={"connection_name": "api"},
            )
        )
        local.ch = local.amqp.channel()
        local.reply_q = local.ch.queue_declare("", exclusive=True).method.queue
        local.replies = {}

        def on_reply(ch: Any, method: Any, props: Any, body: bytes) -> None:
            local.replies[props.correlation_id] = oslo_open(body)

        local.ch.basic_consume(local.reply_q, on_reply, auto_ack=True)
    return local


def sql(r: Any, unit: str, text: str, params: tuple[Any, ...] = ()) -> list[Any]:
    tok = token()
    with r.db.cursor() as c:
        c.execute(text.replace("{gt}", f"'{tok}'"), params)
        rows = list(c.fetchall())
    gt.call(f"sql:{tok}", unit)
    return rows


def create_server(rid: str, unit: str, body: dict[str, Any]) -> str:
    r = resources()
    inst = str(uuid.uuid4())
    tok = token()
    sql(r, unit, "START TRANSACTION /* {gt} */")
    sql(
        r,
        unit,
        "INSERT INTO instances (uuid, name, image, state, gt) VALUES (%s, %s, %s, 'building', {gt})",
        (inst, body.get("name", "vm"), body["image"]),
    )
    sql(
        r,
        unit,
        "INSERT INTO instance_actions (instance_uuid, action, request_id, gt) "
        "VALUES (%s, 'create', %s, {gt})",
        (inst, rid),
    )
    sql(r, unit, "COMMIT /* {gt} */")
    # RPC call: select_destinations (oslo.messaging-style message)
    msg_id = uuid.uuid4().hex
    tok = token()
    r.ch.basic_publish(
        "",
        f"scheduler-{args.suffix}",
        oslo_envelope(
            {
                "method": "select_destinations",
                "args": {"instance_uuid": inst},
                "_context_request_id": rid,
                "_msg_id": msg_id,
                "_reply_q": r.reply_q,
                "_unique_id": uuid.uuid4().hex,
            }
        ),
        pika.BasicProperties(reply_to=r.reply_q, correlation_id=msg_id, message_id=tok),
    )
    gt.call(f"amqp:{tok}", unit)
    deadline = time.time() + 20
    while msg_id not in r.replies and time.time() < deadline:
        r.amqp.process_data_events(time_limit=0.05)
    host = r.replies.pop(msg_id)["result"]
    sql(r, unit, "UPDATE instances SET host = %s, gt = {gt} WHERE uuid = %s", (host, inst))
    tok = token()
    r.ch.basic_publish(
        "",
        f"compute-{args.suffix}",
        oslo_envelope(
            {
                "method": "build_and_run_instance",
                "args": {"instance_uuid": inst, "image": body["image"]},
                "_context_request_id": rid,
                "_unique_id": uuid.uuid4().hex,
            }
        ),
        pika.BasicProperties(message_id=tok),
    )
    gt.call(f"amqp:{tok}", unit)
    return inst


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a: Any) -> None:
        pass

    def do_POST(self) -> None:
        q = parse_qs(urlsplit(self.path).query)
        unit = f"http:{q['gt'][0]}"
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        rid = self.headers.get("X-Request-ID", "req-" + str(uuid.uuid4()))
        inst = create_server(rid, unit, body)
        out = json.dumps({"server": {"id": inst}}).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Openstack-Request-Id", rid)
        self.end_headers()
        self.wfile.write(out)
        gt.unit_done(unit)


def main() -> None:
    global args, gt
    ap = argparse.ArgumentParser()
    for a in ("--port", "--db-port", "--amqp-port"):
        ap.add_argument(a, type=int, required=True)
    ap.add_argument("--database", required=True)
    ap.add_argument("--suffix", required=True, help="queue name suffix: runs never share queues")
    ap.add_argument("--gt", required=True)
    args = ap.parse_args()
    gt = GroundTruth(args.gt, "api")
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
