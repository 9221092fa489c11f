#!/bin/sh
# Resolve every replica behind the compose service name and start the SGLang router over them.
# Replicas speak SGLang's native API (/generate, /health, /get_model_info, /v1/*), which is all the
# router needs. Re-run (restart the container) after scaling the replicas. --cb-failure-threshold 1: a
# dead replica's breaker opens at its first failure, so retries go to a live one (see deploy/README.md).
set -eu
host="${WORKER_HOST:-replica}"
port="${WORKER_PORT:-30000}"
urls=""
for i in $(seq 1 60); do
  ips=$(getent ahostsv4 "$host" | awk '{print $1}' | sort -u)
  [ -n "$ips" ] && break
  sleep 2
done
for ip in $ips; do urls="$urls http://$ip:$port"; done
echo "router workers:$urls"
# shellcheck disable=SC2086
exec python -m sglang_router.launch_router --host 0.0.0.0 --port 30000 \
  --policy "${ROUTER_POLICY:-cache_aware}" --worker-urls $urls --cb-failure-threshold 1 \
  ${REDKNOT_API_KEY:+--api-key "$REDKNOT_API_KEY"}
