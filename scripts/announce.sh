#!/usr/bin/env bash
# `make run`: once the API answers, say where to look. Gives up quietly after 60 s
# (the API's own log says why it did not start).
set -uo pipefail
port="${HTTP_PORT:-8080}"
base="http://127.0.0.1:${port}"
for _ in $(seq 1 120); do
  if python3 -c "import urllib.request; urllib.request.urlopen('${base}/healthz', timeout=1)" \
      2>/dev/null; then
    printf '\n  API          %s/v1.0/session/close  (POST)\n' "$base"
    printf '  API docs     %s/docs\n' "$base"
    printf '  metrics      %s/metrics\n' "$base"
    printf '  OpenAPI      %s/openapi.json\n' "$base"
    printf '  readiness    %s/readyz\n' "$base"
    printf '  signals      http://127.0.0.1:%s/.well-known/ssf-configuration\n' \
      "${SIGNALS_HTTP_PORT:-8090}"
    if [ -n "${WORKER_METRICS_PORT:-}" ]; then
      printf '  workers      http://127.0.0.1:%s/metrics\n' "$WORKER_METRICS_PORT"
    fi
    printf '  Ctrl-C stops the API, the workers and the transmitter.\n\n'
    exit 0
  fi
  sleep 0.5
done
exit 0
