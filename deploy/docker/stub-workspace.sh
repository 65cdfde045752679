#!/usr/bin/env bash
# stub-workspace.sh create|clean: the dependency layer of deploy/docker/Dockerfile without cargo-chef.
#
# `create` writes an empty source file for every target of every workspace member (the members are read
# from the root Cargo.toml, the targets from each member's manifest: explicit `path = ...` entries, else
# src/lib.rs; `fn main() {}` for binaries and build scripts), so that `cargo build --release --locked`
# compiles every third-party dependency while only the manifests and Cargo.lock are in the image.
#
# `clean` removes those stubs and the workspace crates' own build outputs (their fingerprints, build
# scripts and artifacts), so the next build compiles the real sources whatever their timestamps: COPY
# keeps the build context's mtimes, which may be older than the stub build.
set -euo pipefail
mode="${1:-}"
STUBS=.stub-files

members() {
  # The `members = [ ... ]` array of [workspace], one quoted path per entry.
  sed -n '/^members[[:space:]]*=/,/]/p' Cargo.toml | grep -o '"[^"]*"' | tr -d '"'
}

# Prints "KIND PATH" for every target of the manifest in $1 (KIND: bin, build or lib).
targets() {
  awk '
    /^\[\[bin\]\]/            { section = "bin"; next }
    /^\[\[(test|bench|example)\]\]/ { section = "lib"; next }
    /^\[lib\]/                { section = "lib"; has_lib = 1; next }
    /^\[package\]/            { section = "package"; next }
    /^\[/                     { section = "other"; next }
    section == "package" && /^build[[:space:]]*=/ {
      v = $0; sub(/^[^"]*"/, "", v); sub(/".*$/, "", v); print "build " v; has_build = 1
    }
    (section == "bin" || section == "lib") && /^path[[:space:]]*=/ {
      v = $0; sub(/^[^"]*"/, "", v); sub(/".*$/, "", v); print section " " v
      if (section == "bin") has_bin = 1
    }
    END { if (!has_lib && !has_bin) print "lib src/lib.rs" }
  ' "$1"
}

case "$mode" in
  create)
    : > "$STUBS"
    for m in $(members); do
      [ -f "$m/Cargo.toml" ] || { echo "stub-workspace: $m/Cargo.toml missing (COPY it in the Dockerfile)" >&2; exit 1; }
      while read -r kind path; do
        f="$m/$path"
        [ -e "$f" ] && continue
        mkdir -p "$(dirname "$f")"
        case "$kind" in
          bin | build) echo 'fn main() {}' > "$f" ;;
          *) : > "$f" ;;
        esac
        echo "$f" >> "$STUBS"
      done < <(targets "$m/Cargo.toml")
    done
    ;;
  clean)
    [ -f "$STUBS" ] && xargs -r rm -f < "$STUBS"
    rm -f "$STUBS"
    target="${CARGO_TARGET_DIR:-target}/release"
    for m in $(members); do
      name=$(sed -n 's/^name[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$m/Cargo.toml" | head -n1)
      under=${name//-/_}
      rm -rf "$target/.fingerprint/$name-"* "$target/build/$name-"* \
        "$target/deps/lib$under-"* "$target/deps/$under-"* "$target/$name" "$target/$name.d"
    done
    ;;
  *)
    echo "usage: $0 create|clean" >&2
    exit 2
    ;;
esac
