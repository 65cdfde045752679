#!/usr/bin/env bash
# check-chart.sh: the Helm chart's checks (offline, a few seconds). Exits non-zero and names what failed.
#   1. helm lint --strict with values.yaml and with each helm/specd/ci/*.yaml (values checked against
#      values.schema.json by helm)
#   2. helm template of values.yaml (golden/default.yaml) and each ci/NAME.yaml (golden/NAME.yaml), diffed
#      against the committed golden files; UPDATE_GOLDEN=1 rewrites them (and the README values table)
#   3. kubernetes-validate --strict -k 1.30 on every rendered manifest; the CRD kinds it has no schema for
#      (ServiceMonitor, PodMonitor, ScaledObject) are checked by scripts/check_chart.py against hand-written
#      expectations, along with the references inside a release (selectors, named ports, scale targets)
#   4. values.yaml and values.schema.json describe the same keys; every value file validates (jsonschema)
#   5. the README values table is current
#   6. every container that runs specd, with its env and $(VAR) expanded as the kubelet does, passes
#      `$SPECD ARGS... --check-config` (SPECD defaults to ~/.cache/specd/target/release/specd)
# Tools come from scripts/setup-deploy-tools.sh (run it first; it is idempotent).
set -uo pipefail
cd "$(dirname "$0")/.."

TOOLS="${SPECD_TOOLS:-$HOME/.cache/specd/tools}/bin"
SPECD="${SPECD:-$HOME/.cache/specd/target/release/specd}"
CHART=helm/specd
KUBE_VERSION=1.30.0
RELEASE=specd
NAMESPACE=specd

HELM="$TOOLS/helm"
KV="$TOOLS/kubernetes-validate"
PY="$TOOLS/specd-tools-python"
for t in "$HELM" "$KV" "$PY"; do
  [ -x "$t" ] || { echo "check-chart: $t is missing: run scripts/setup-deploy-tools.sh" >&2; exit 1; }
done

failed=()
# Stages: the closing "N passed, N failed" line counts them.
steps=0 bad_steps=0 cur_bad=0
close_step() { [ "$cur_bad" = 1 ] && bad_steps=$((bad_steps + 1)); cur_bad=0; }
step() { close_step; echo "== $*"; steps=$((steps + 1)); }
bad() { echo "FAIL: $*"; failed+=("$*"); cur_bad=1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/rendered" "$WORK/core"

# name:values-file pairs; "default" is values.yaml alone.
configs=("default:")
for f in "$CHART"/ci/*.yaml; do configs+=("$(basename "$f" .yaml):$f"); done
[ "${#configs[@]}" -ge 4 ] || bad "expected at least three value files in $CHART/ci"

step "helm lint"
for c in "${configs[@]}"; do
  name=${c%%:*} file=${c#*:}
  if ! out=$("$HELM" lint --strict "$CHART" ${file:+-f "$file"} --kube-version "$KUBE_VERSION" 2>&1); then
    echo "$out"; bad "helm lint ($name)"
  fi
done

step "helm template and golden files"
for c in "${configs[@]}"; do
  name=${c%%:*} file=${c#*:}
  if ! "$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" --kube-version "$KUBE_VERSION" \
      ${file:+-f "$file"} > "$WORK/rendered/$name.yaml" 2> "$WORK/err"; then
    cat "$WORK/err"; bad "helm template ($name)"; continue
  fi
  golden="$CHART/golden/$name.yaml"
  if [ "${UPDATE_GOLDEN:-}" = 1 ]; then
    mkdir -p "$CHART/golden"
    cmp -s "$WORK/rendered/$name.yaml" "$golden" || { cp "$WORK/rendered/$name.yaml" "$golden"; echo "rewrote $golden"; }
  elif [ ! -f "$golden" ]; then
    bad "$golden is missing (UPDATE_GOLDEN=1 $0 writes it)"
  elif ! diff -u "$golden" "$WORK/rendered/$name.yaml" > "$WORK/diff"; then
    head -n 60 "$WORK/diff"
    bad "$golden drifted from the chart's output ($(grep -c '^[-+][^-+]' "$WORK/diff") lines; UPDATE_GOLDEN=1 $0 rewrites it after review)"
  fi
done
for g in "$CHART"/golden/*.yaml; do
  [ -e "$g" ] || continue
  [ -f "$WORK/rendered/$(basename "$g")" ] || bad "$g has no value file any more (remove it)"
done

rendered=("$WORK"/rendered/*.yaml)
step "manifests (CRD expectations, references)"
"$PY" scripts/check_chart.py manifests "$WORK/core" "${rendered[@]}" || bad "manifest checks"

step "kubernetes-validate --strict -k ${KUBE_VERSION%.*}"
if ! "$KV" --strict -k "${KUBE_VERSION%.*}" --quiet "$WORK"/core/*.yaml; then
  bad "kubernetes-validate"
else
  echo "kubernetes-validate: $(cat "$WORK"/core/*.yaml | grep -c '^kind:') resources valid"
fi

step "values.yaml and values.schema.json in sync"
"$PY" scripts/check_chart.py sync "$CHART" || bad "values/schema sync"

step "README values table"
if [ "${UPDATE_GOLDEN:-}" = 1 ]; then
  "$PY" scripts/check_chart.py readme "$CHART" --update || bad "README values table"
else
  "$PY" scripts/check_chart.py readme "$CHART" || bad "README values table"
fi

step "container args against specd --check-config"
"$PY" scripts/check_chart.py args "$SPECD" "${rendered[@]}" || bad "args check"

close_step
if [ "${#failed[@]}" -gt 0 ]; then
  echo "check-chart: failed:"
  printf '  %s\n' "${failed[@]}"
  echo "check-chart: $((steps - bad_steps)) passed, $bad_steps failed"
  exit 1
fi
echo "check-chart: $steps passed, 0 failed"
