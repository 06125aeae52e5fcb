#!/usr/bin/env bash
# Start RabbitMQ, MariaDB and PostgreSQL on this machine if they are down, then
# wait until each accepts connections. Idempotent; needs root (as on the CI machine).
set -uo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- 3<&-; }

wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    if port_open "$2"; then echo "services: $1 is up on 127.0.0.1:$2"; return 0; fi
    sleep 0.1
  done
  echo "services: $1 did not come up on 127.0.0.1:$2 within $3 s" >&2
  return 1
}

status=0
if ! port_open 5672; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port RabbitMQ 5672 90 || status=1
  rabbitmqctl await_startup >/dev/null 2>&1 || true
else
  echo "services: RabbitMQ is up on 127.0.0.1:5672"
fi
if ! port_open 3306; then
  echo "services: starting MariaDB"
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd >/dev/null 2>&1 || true
  wait_port MariaDB 3306 60 || status=1
else
  echo "services: MariaDB is up on 127.0.0.1:3306"
fi
if ! port_open 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start >/dev/null 2>&1 || true
  wait_port PostgreSQL 5432 60 || status=1
else
  echo "services: PostgreSQL is up on 127.0.0.1:5432"
fi
exit $status
