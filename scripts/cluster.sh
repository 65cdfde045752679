#!/usr/bin/env bash
# cluster.sh up|down|status: a real multi-process specd cluster on loopback, without Kubernetes.
#
# `up` starts a three-member etcd, two targets, two drafters, a trainer and a router (one process each,
# every log under $CLUSTER_DIR/logs), waits until the router serves, and prints its addresses.
# `down` stops exactly the processes `up` recorded in $CLUSTER_DIR/pids (SIGTERM, then SIGKILL after
# the drain), nothing else. Settings (environment):
#   CLUSTER_DIR   state, logs and etcd data (default ~/.cache/specd/cluster)
#   CLUSTER_PORT  first port of the block it uses (default 52000; it uses the next 100)
#   MODEL_PRESET  smollm (default) or qwen;  MODELS_DIR (default models);  SPECD (the binary)
#   THREADS       kernel threads per worker process (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
SPECD=${SPECD:-${CARGO_TARGET_DIR:-$HOME/.cache/specd/target}/release/specd}
DIR=${CLUSTER_DIR:-$HOME/.cache/specd/cluster}
BASE=${CLUSTER_PORT:-52000}
PRESET=${MODEL_PRESET:-smollm}
MODELS=${MODELS_DIR:-models}
THREADS=${THREADS:-1}
H=127.0.0.1

etcd_client() { echo "http://$H:$((BASE + 10 + 2 * $1))"; }
etcd_peer() { echo "http://$H:$((BASE + 11 + 2 * $1))"; }
ETCD="$(etcd_client 0),$(etcd_client 1),$(etcd_client 2)"
ROUTER_GRPC=$H:$((BASE + 1))
ROUTER_HTTP=$H:$((BASE + 2))

start() { # name command...: runs in the background, logs to logs/NAME.log, records the pid
  local name=$1; shift
  "$@" >"$DIR/logs/$name.log" 2>&1 &
  echo "$! $name" >>"$DIR/pids"
}

alive() { [ -f "$DIR/pids" ] && while read -r pid _; do kill -0 "$pid" 2>/dev/null && return 0; done <"$DIR/pids"; return 1; }

up() {
  [ -x "$SPECD" ] || { echo "cluster: $SPECD not built (make build)" >&2; exit 1; }
  command -v etcd >/dev/null || { echo "cluster: etcd not installed (scripts/setup.sh)" >&2; exit 1; }
  if alive; then echo "cluster: already running (scripts/cluster.sh down first)" >&2; exit 1; fi
  rm -rf "$DIR/etcd" "$DIR/logs" "$DIR/pids" "$DIR/weights"
  mkdir -p "$DIR/logs" "$DIR/etcd" "$DIR/weights"
  local initial="e0=$(etcd_peer 0),e1=$(etcd_peer 1),e2=$(etcd_peer 2)"
  for i in 0 1 2; do
    start "etcd-$i" etcd --name "e$i" --data-dir "$DIR/etcd/e$i" \
      --listen-client-urls "$(etcd_client $i)" --advertise-client-urls "$(etcd_client $i)" \
      --listen-peer-urls "$(etcd_peer $i)" --initial-advertise-peer-urls "$(etcd_peer $i)" \
      --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token specd-local
  done
  for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "$ETCD" endpoint health >/dev/null 2>&1 && break
    sleep 0.2
  done
  local common=(--etcd "$ETCD" --model-preset "$PRESET" --models-dir "$MODELS" --threads "$THREADS"
    --lease-ttl 3 --drain-secs 10)
  for i in 1 2; do
    start "target-$i" "$SPECD" target "${common[@]}" --instance-id "target-$i" \
      --grpc-addr "$H:$((BASE + 20 + i))" --metrics-addr "$H:$((BASE + 40 + i))"
    start "drafter-$i" "$SPECD" drafter "${common[@]}" --instance-id "drafter-$i" \
      --grpc-addr "$H:$((BASE + 30 + i))" --metrics-addr "$H:$((BASE + 50 + i))"
  done
  start trainer "$SPECD" trainer "${common[@]}" --instance-id trainer-1 --weights-dir "$DIR/weights" \
    --grpc-addr "$H:$((BASE + 60))" --metrics-addr "$H:$((BASE + 61))"
  start router "$SPECD" router "${common[@]}" --instance-id router-1 \
    --grpc-addr "$ROUTER_GRPC" --http-addr "$ROUTER_HTTP"
  for _ in $(seq 1 240); do
    if curl -sf "http://$ROUTER_HTTP/v1/models" 2>/dev/null | grep -q '"id"' \
      && [ "$(ETCDCTL_API=3 etcdctl --endpoints "$ETCD" get --prefix /specd/v1/instances/ --keys-only 2>/dev/null | grep -c target)" -ge 2 ]; then
      echo "cluster up: router gRPC $ROUTER_GRPC, HTTP http://$ROUTER_HTTP; etcd $ETCD; logs $DIR/logs"
      return 0
    fi
    while read -r pid name; do
      kill -0 "$pid" 2>/dev/null || { echo "cluster: $name exited; its log:" >&2; tail -20 "$DIR/logs/$name.log" >&2; down; exit 1; }
    done <"$DIR/pids"
    sleep 0.5
  done
  echo "cluster: not serving after 120 s (logs in $DIR/logs)" >&2
  down
  exit 1
}

down() {
  [ -f "$DIR/pids" ] || { echo "cluster: nothing recorded in $DIR/pids"; return 0; }
  # The router first (it drains its requests), then the workers, etcd last.
  for group in router "trainer drafter target" etcd; do
    local pids=()
    while read -r pid name; do
      for g in $group; do
        case $name in "$g"*) kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" && pids+=("$pid") ;; esac
      done
    done <"$DIR/pids"
    for _ in $(seq 1 60); do
      local left=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
      [ $left = 0 ] && break
      sleep 0.25
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  done
  rm -f "$DIR/pids"
  echo "cluster down (logs kept in $DIR/logs)"
}

status() {
  [ -f "$DIR/pids" ] || { echo "cluster: not running"; return 0; }
  while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null; then echo "$name $pid running"; else echo "$name $pid exited"; fi
  done <"$DIR/pids"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: scripts/cluster.sh up|down|status" >&2; exit 2 ;;
esac
