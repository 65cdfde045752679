#!/usr/bin/env bash
# setup.sh: installs what building and testing specd needs on a fresh Debian machine, idempotently.
# - protoc (Debian protobuf-compiler): the proto crate and etcd-client's build scripts call it.
# - etcd 3.4 (Debian etcd-server, etcd-client): specd-coord's and the cluster tests start a real etcd.
# - the `openai` Python client (pinned, from PyPI): the cluster test of the OpenAI-compatible HTTP API.
# Nothing here downloads at run time; models come from scripts/fetch-models.sh.
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server etcd-client)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "setup: installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The OpenAI-compatibility test drives the HTTP API with the unmodified `openai` Python client.
OPENAI_VERSION=2.8.1
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "setup: installing openai==$OPENAI_VERSION (Python client, for the HTTP API test)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION" >/dev/null 2>&1 \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "openai==$OPENAI_VERSION"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
