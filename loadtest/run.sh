#!/usr/bin/env bash
# loadtest/run.sh: closed-loop load against a specd router's public gRPC API.
#
# With ADDR set, loads that router. Without it, starts `specd up` for MODEL_PRESET on free loopback
# ports, waits until it serves, loads it, and stops it. Extra arguments go to `specd loadtest`
# (for example --concurrency 1,2,4,8 --requests 32 --max-new-tokens 64 --drafter none --json).
set -euo pipefail
SPECD=${SPECD:-${CARGO_TARGET_DIR:-$HOME/.cache/specd/target}/release/specd}
MODEL_PRESET=${MODEL_PRESET:-qwen}
[ -x "$SPECD" ] || { echo "loadtest: $SPECD not built (make build)" >&2; exit 1; }
if [ -z "${ADDR:-}" ]; then
  log=$(mktemp)
  port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  GRPC=127.0.0.1:$(port); HTTP=127.0.0.1:$(port)
  # UP_ARGS: extra arguments for `specd up` (for example "--trainer --sample-rate 1").
  # shellcheck disable=SC2086
  "$SPECD" up --model-preset "$MODEL_PRESET" --grpc-addr "$GRPC" --http-addr "$HTTP" ${UP_ARGS:-} >"$log" 2>&1 &
  pid=$!
  trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT
  for _ in $(seq 1 120); do
    if curl -sf "http://$HTTP/health" >/dev/null 2>&1; then break; fi
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.5
  done
  ADDR=$GRPC
fi
"$SPECD" loadtest --addr "$ADDR" "$@"
