#!/usr/bin/env bash
# check-deploy-files.sh: the checks of deploy/ (images, compose, dashboard, alerts), in seconds, offline.
#   - hadolint on every Dockerfile under deploy/docker
#   - scripts/check_deploy_files.py: Dockerfile conventions (multi-stage, dependency layer, --locked,
#     pinned bases, bookworm-slim runtime, USER 10001, exec-form ENTRYPOINT, no ADD), .dockerignore, the
#     compose file (structure, depends_on, volumes, only the router published, drain vs. stop grace, and
#     every specd command parsed by `$SPECD <role> ... --check-config` with the service's environment,
#     for the smollm and qwen presets), the compose Prometheus config against the services, the Grafana
#     dashboard (structure, data source variable, PromQL parsed by promtool), and every metric and
#     label name of the dashboard and the alert rules against the Rust sources
#   - promtool check rules / test rules on deploy/prometheus, promtool check config on the compose
#     Prometheus config
# Tools come from scripts/setup-deploy-tools.sh (in $HOME/.cache/specd/tools/bin, first on PATH here).
# SPECD: the binary whose flags are checked (default $HOME/.cache/specd/target/release/specd).
# Prints one ok/FAIL line per check and what failed; exits non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
TOOLS_BIN="${SPECD_TOOLS:-$HOME/.cache/specd/tools}/bin"
export PATH="$TOOLS_BIN:$PATH"
SPECD="${SPECD:-$HOME/.cache/specd/target/release/specd}"

failed=0
fail() { echo "FAIL $1"; shift; for line in "$@"; do printf '%s\n' "$line" | sed 's/^/     /'; done; failed=1; }
# step TITLE CMD...: runs CMD, ok on success, else FAIL with its output.
step() {
  local title=$1; shift
  local out
  if out=$("$@" 2>&1); then echo "ok   $title"; else fail "$title" "$out"; fi
}
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  fail "$1 not found" "run scripts/setup-deploy-tools.sh (installs it into $TOOLS_BIN)"
  return 1
}

# Python with PyYAML: the tools venv's, else the system's.
PY=python3
if command -v specd-tools-python >/dev/null 2>&1; then PY=specd-tools-python; fi
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  fail "PyYAML" "$PY has no yaml module; run scripts/setup-deploy-tools.sh"
  exit 1
fi

if need hadolint; then
  for f in deploy/docker/Dockerfile*; do
    step "hadolint $f" hadolint "$f"
  done
fi

"$PY" scripts/check_deploy_files.py --specd "$SPECD" || failed=1

if need promtool; then
  step "promtool check rules deploy/prometheus/alerts.yaml" promtool check rules deploy/prometheus/alerts.yaml
  step "promtool test rules deploy/prometheus/tests/alerts_test.yaml" \
    promtool test rules deploy/prometheus/tests/alerts_test.yaml
  # The compose Prometheus mounts deploy/prometheus at rules/ next to its config: check it laid out so.
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  cp deploy/compose/prometheus.yml "$tmp/prometheus.yml"
  ln -s "$PWD/deploy/prometheus" "$tmp/rules"
  step "promtool check config deploy/compose/prometheus.yml" promtool check config "$tmp/prometheus.yml"
fi

if [ "$failed" = 0 ]; then echo "check-deploy-files: all passed"; else echo "check-deploy-files: FAILED"; fi
exit "$failed"
