"""The image service: a threaded HTTP server answering ``GET /v2/images/<id>``
with one query."""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from demo.system.common import GroundTruth, db, token

args: Any = None
gt: GroundTruth
local = threading.local()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a: Any) -> None:
        pass

    def do_GET(self) -> None:
        if not hasattr(local, "db"):
            local.db = db(args.db_port, "image", args.database)
        parts = urlsplit(self.path)
        unit = f"http:{parse_qs(parts.query)['gt'][0]}"
        image_id = parts.path.rsplit("/", 1)[1]
        tok = token()
        with local.db.cursor() as c:
            c.execute(
                f"SELECT id, name, size FROM images WHERE id = %s AND '{tok}' <> ''", (image_id,)
            )
            row = c.fetchone()
        gt.call(f"sql:{tok}", unit)
        out = json.dumps({"id": row[0], "name": row[1], "size": row[2]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
        gt.unit_done(unit)


def main() -> None:
    global args, gt
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--db-port", type=int, required=True)
    ap.add_argument("--database", required=True)
    ap.add_argument("--gt", required=True)
    args = ap.parse_args()
    gt = GroundTruth(args.gt, "image")
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
