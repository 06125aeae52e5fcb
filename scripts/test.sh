#!/usr/bin/env bash
# Set everything up and run the whole test suite (unit + integration against the
# real RabbitMQ, MariaDB and PostgreSQL on this machine). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
