#!/usr/bin/env bash
# The Debian packages the project uses beside Python: the three services it talks to
# (`redis-server`, `rabbitmq-server`, `postgresql`, started by scripts/start-services.sh),
# `prometheus` (promtool and prometheus, for the alert unit tests and the live scrape
# test), `wrk` (the benchmarks) and `chromium` (the browser test of /docs, driven by
# Playwright through this binary: Playwright never downloads a browser here). Installed
# only when run as root (CI); otherwise named, and the tests that need them are skipped
# with the same message, except under CI=true, where that fails.
set -euo pipefail

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
ls /etc/postgresql/*/main >/dev/null 2>&1 || missing+=(postgresql)
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v wrk >/dev/null || missing+=(wrk)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "missing Debian packages (tests that need them are skipped): ${missing[*]}" >&2
  echo "  install with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  [ "${CI:-}" != true ] || { echo "CI=true: a missing tool fails the run" >&2; exit 1; }
  exit 0
fi

# The packages would start their services through the init system; start-services.sh
# starts them as the project expects instead, and the tests start their own Prometheus on
# free ports. A policy-rc.d that refuses service starts (as Docker images ship) prevents it.
policy=/usr/sbin/policy-rc.d
added_policy=false
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=true
fi
trap '$added_policy && rm -f "$policy"' EXIT
echo "installing Debian packages: ${missing[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
  || { apt-get update && DEBIAN_FRONTEND=noninteractive \
       apt-get install -y --no-install-recommends "${missing[@]}"; }
# Where systemd enabled it anyway (policy-rc.d is not consulted by every init), stop it.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus
fi
# A PostgreSQL cluster installed here is a local one for development and CI: the project
# connects as `postgres` over 127.0.0.1 without a password (trust), as on its machines.
if [[ " ${missing[*]} " == *" postgresql "* ]]; then
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    sed -i -E 's/^(host +all +all +(127\.0\.0\.1\/32|::1\/128) +)[a-z0-9-]+$/\1trust/' "$hba"
    sed -i -E 's/^(local +all +(postgres|all) +)peer$/\1trust/' "$hba"
  done
fi
