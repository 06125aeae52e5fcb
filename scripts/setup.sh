#!/usr/bin/env bash
# Set up everything sniff needs to run its demo, tests and benchmarks:
# Debian tools (when missing and we are root) and a virtualenv at .venv with
# sniff installed in editable mode plus its test and dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in wrk:wrk haproxy:haproxy nginx:nginx-light curl:curl mariadb:mariadb-client \
            mariadb-slap:mariadb-client pgbench:postgresql-contrib openssl:openssl \
            docker-compose:docker-compose mariadbd:mariadb-server \
            mariadb_config:libmariadb-dev gcc:gcc runuser:util-linux; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${need[@]}" >/dev/null; }
  else
    echo "setup: missing tools (${need[*]}); install them with apt-get as root" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "setup: installing sniff and its test dependencies into .venv"
.venv/bin/python -m pip install -q -e ".[test,dev]" 2>&1 | grep -v -E "^WARNING: Location|^ *$" || true
.venv/bin/python -c "import sniff, proxies, correlate, exporters" || { echo "setup: install failed" >&2; exit 1; }
if .venv/bin/python -c "import sniff._shipper" 2>/dev/null; then
  echo "setup: the C relay extension (sniff/_shipper.c) is built"
else
  echo "setup: warning: the C relay extension did not build (is gcc there?); sniff runs its slower pure-Python path" >&2
fi
if .venv/bin/python -c "import correlate, sys; sys.exit(0 if correlate.NATIVE else 1)" 2>/dev/null; then
  echo "setup: the correlator is compiled with mypyc (correlate/_native__mypyc)"
else
  echo "setup: warning: the correlator was not compiled with mypyc; it runs as Python (slower offline)" >&2
fi
echo "setup: ready (.venv/bin/sniff)"
