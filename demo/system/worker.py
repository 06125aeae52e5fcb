"""A compute worker: consumes casts one at a time (prefetch 1), updates the
instance, fetches its image from the image service over HTTP, records the action."""

from __future__ import annotations

import argparse
import http.client
from typing import Any

import pika

from demo.system.common import GroundTruth, db, oslo_open, token


def main() -> None:
    ap = argparse.ArgumentParser()
    for a in ("--db-port", "--amqp-port", "--image-port"):
        ap.add_argument(a, type=int, required=True)
    ap.add_argument("--database", required=True)
    ap.add_argument("--suffix", required=True, help="queue name suffix: runs never share queues")
    ap.add_argument("--gt", required=True)
    args = ap.parse_args()
    gt = GroundTruth(args.gt, "worker")
    conn = db(args.db_port, "worker", args.database)
    images = http.client.HTTPConnection("127.0.0.1", args.image_port, timeout=20)
    amqp = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            args.amqp_port,
            heartbeat=0,
            client_properties={"connection_name": "worker"},
        )
    )
    ch = amqp.channel()
    ch.queue_declare(f"compute-{args.suffix}", auto_delete=True)
    ch.basic_qos(prefetch_count=1)

    def on_cast(c: Any, method: Any, props: Any, body: bytes) -> None:
        unit = f"amqp:{props.message_id}"
        msg = oslo_open(body)["args"]
        with conn.cursor() as cur:
            tok = token()
            cur.execute(
                "UPDATE instances SET state = 'spawning', gt = %s WHERE uuid = %s",
                (tok, msg["instance_uuid"]),
            )
            gt.call(f"sql:{tok}", unit)
        tok = token()
        images.request("GET", f"/v2/images/{msg['image']}?gt={tok}")
        resp = images.getresponse()
        resp.read()
        gt.call(f"http:{tok}", unit)
        with conn.cursor() as cur:
            tok = token()
            cur.execute(
                "INSERT INTO instance_actions (instance_uuid, action, gt) VALUES (%s, 'spawn', %s)",
                (msg["instance_uuid"], tok),
            )
            gt.call(f"sql:{tok}", unit)
        c.basic_ack(method.delivery_tag)
        gt.unit_done(unit)

    ch.basic_consume(f"compute-{args.suffix}", on_cast)
    print("ready", flush=True)
    ch.start_consuming()


if __name__ == "__main__":
    main()
