"""The scheduler: consumes RPC calls one at a time (prefetch 1), picks a host
with two statements that carry no id of the request, and replies."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import pika

from demo.system.common import GroundTruth, db, oslo_envelope, oslo_open, token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db-port", type=int, required=True)
    ap.add_argument("--amqp-port", type=int, required=True)
    ap.add_argument("--database", required=True)
    ap.add_argument("--suffix", required=True, help="queue name suffix: runs never share queues")
    ap.add_argument("--gt", required=True)
    args = ap.parse_args()
    gt = GroundTruth(args.gt, "scheduler")
    conn = db(args.db_port, "scheduler", args.database)
    amqp = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            args.amqp_port,
            heartbeat=0,
            client_properties={"connection_name": "scheduler"},
        )
    )
    ch = amqp.channel()
    ch.queue_declare(f"scheduler-{args.suffix}", auto_delete=True)
    ch.basic_qos(prefetch_count=1)

    def on_call(c: Any, method: Any, props: Any, body: bytes) -> None:
        unit = f"amqp:{props.message_id}"
        msg = oslo_open(body)
        with conn.cursor() as cur:
            tok = token()
            cur.execute(
                f"SELECT id, host FROM compute_nodes WHERE free_ram_mb > 512 AND '{tok}' <> '' "
                "ORDER BY free_ram_mb DESC LIMIT 1"
            )
            node_id, host = cur.fetchone()
            gt.call(f"sql:{tok}", unit)
            tok = token()
            cur.execute(
                f"UPDATE compute_nodes SET free_ram_mb = free_ram_mb - 512, gt = '{tok}' WHERE id = %s",
                (node_id,),
            )
            gt.call(f"sql:{tok}", unit)
        tok = token()
        c.basic_publish(
            "",
            props.reply_to,
            oslo_envelope(
                {"result": host, "_msg_id": msg["_msg_id"], "_unique_id": uuid.uuid4().hex}
            ),
            pika.BasicProperties(correlation_id=props.correlation_id, message_id=tok),
        )
        gt.call(f"amqp:{tok}", unit)
        c.basic_ack(method.delivery_tag)
        gt.unit_done(unit)

    ch.basic_consume(f"scheduler-{args.suffix}", on_call)
    print("ready", flush=True)
    ch.start_consuming()


if __name__ == "__main__":
    main()
