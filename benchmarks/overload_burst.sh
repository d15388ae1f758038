#!/usr/bin/env bash
# A burst far over capacity on the embedded router deployment (issue 17, hole 2): serve, send
# REQUESTS streamed completions at once with `tidal bench`, print how they were answered and the
# router's refusals by reason, then check that the next request is served.
#
#   bash benchmarks/overload_burst.sh [CONFIG] [REQUESTS] [OUT_DIR]
set -euo pipefail
CONFIG="${1:-examples/agg_router.yaml}"
REQUESTS="${2:-300}"
OUT="${3:-$(mktemp -d)}"
PORT="$(python -c 'from tidal.runtime.ports import free_port; print(free_port())')"
URL="http://127.0.0.1:$PORT"

tidal serve -f "$CONFIG" --port "$PORT" >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 180); do curl -sf "$URL/health" >/dev/null && break; sleep 1; done

tidal bench --url "$URL" --workload synthetic --arrival constant --rate 1000 --requests "$REQUESTS" \
    --input-len 200 --output-len 64 --timeout-s 400 --output "$OUT/bench" 2>/dev/null | grep -v WARNING
curl -s "$URL/metrics" | grep -E '^tidal_(requests_total|router_rejected_total)'
echo "next request:"
curl -s -o /dev/null -w "%{http_code} in %{time_total} s\n" "$URL/v1/completions" \
    -H 'content-type: application/json' \
    -d "{\"model\": \"$(curl -s "$URL/v1/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8}"
echo "records: $OUT/bench/records.jsonl, server log: $OUT/serve.log"
