#!/usr/bin/env bash
# The Debian packages the project uses beside Python: `prometheus` (promtool and
# prometheus, for the alert unit tests and the live scrape test) and `wrk` (the
# benchmarks). Installed only when run as root (CI); otherwise named, and the tests that
# need them are skipped with the same message, except under CI=true, where that fails.
set -euo pipefail

missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v wrk >/dev/null || missing+=(wrk)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "missing Debian packages (tests that need them are skipped): ${missing[*]}" >&2
  echo "  install with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  [ "${CI:-}" != true ] || { echo "CI=true: a missing tool fails the run" >&2; exit 1; }
  exit 0
fi

# The package would start a system Prometheus on :9090; the tests start their own on free
# ports. A policy-rc.d that refuses service starts (as Docker images ship) prevents it.
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
