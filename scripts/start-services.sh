#!/usr/bin/env bash
# Start local Redis, RabbitMQ and PostgreSQL when one is not already answering.
# (Debian packages, as on the project's machines; on another machine start them your way.)
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # port name
  for _ in $(seq 1 60); do listening "$1" && return 0; sleep 1; done
  echo "$2 did not start on port $1" >&2; return 1
}

if ! listening 6379; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for 6379 Redis
fi
if ! listening 5672; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached
  wait_for 5672 RabbitMQ
fi
if ! listening 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  wait_for 5432 PostgreSQL
fi
