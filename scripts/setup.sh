#!/usr/bin/env bash
# setup.sh: installs what building and testing specd needs on a fresh Debian machine, idempotently.
# - protoc (Debian protobuf-compiler): the proto crate and etcd-client's build scripts call it.
# - etcd 3.4 (Debian etcd-server, etcd-client): specd-coord's tests start a real etcd child process.
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
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
