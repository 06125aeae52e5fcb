#!/usr/bin/env bash
# Set everything up and run the demo: a small OpenStack-like system (HTTP api and
# image services, schedulers and workers over RabbitMQ, MariaDB) traced by sniff;
# prints stats, the per-operation report, a trace tree and the score against the
# services' own ground truth. Optional arguments: requests, concurrency.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
exec .venv/bin/python demo/run.py "$@"
