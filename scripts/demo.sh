#!/usr/bin/env bash
# Set everything up and run the demo: sniff in front of the local RabbitMQ with a
# small api/worker/conductor system, then print the capture's stats and traces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
exec .venv/bin/python demo/amqp_demo.py "$@"
