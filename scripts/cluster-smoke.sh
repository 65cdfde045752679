#!/usr/bin/env bash
# cluster-smoke.sh: `scripts/cluster.sh up` on a free port block, 16 requests through the router while
# one drafter and one target process are killed (SIGKILL); every request must complete; then down.
set -euo pipefail
cd "$(dirname "$0")/.."
SPECD=${SPECD:-${CARGO_TARGET_DIR:-$HOME/.cache/specd/target}/release/specd}
export CLUSTER_DIR=$(mktemp -d) CLUSTER_PORT=$((20000 + RANDOM % 20000)) SPECD
trap 'scripts/cluster.sh down >/dev/null; rm -rf "$CLUSTER_DIR"' EXIT
scripts/cluster.sh up
out=$(mktemp)
"$SPECD" loadtest --addr "127.0.0.1:$((CLUSTER_PORT + 1))" --concurrency 4 --requests 16 --max-new-tokens 48 --require-ok >"$out" 2>&1 &
load=$!
sleep 3
kill -KILL "$(awk '$2=="drafter-1"{print $1}' "$CLUSTER_DIR/pids")" "$(awk '$2=="target-1"{print $1}' "$CLUSTER_DIR/pids")"
rc=0; wait $load || rc=$?
cat "$out"; rm -f "$out"
[ $rc = 0 ] || { echo "cluster-smoke: requests failed after killing a drafter and a target" >&2; tail -5 "$CLUSTER_DIR"/logs/router.log >&2; exit 1; }
echo "cluster-smoke: every request completed with drafter-1 and target-1 killed"
