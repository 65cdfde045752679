#!/usr/bin/env bash
# make bench-anchor: specd's compute figures and llama.cpp's on the same model files, on this machine,
# one right after the other, with the ratios in one table (these machines are noisy and differ between
# sessions: only ratios taken side by side mean anything).
#
#   specd bench-kernels --json          prefill pp512, decode tg128, batched decode at 1/4/8/16 sequences
#   llama-bench -p 512 -n 128 -r 3      the peer's pp512 and tg128
#   llama-batched-bench -npp 64 -ntg 64 the peer's aggregate decode at 1/4/8/16 sequences
#
# The peer is built by the workplace tool llama-anchor (LLAMA_ANCHOR, default ../shared/tools/llama-anchor
# beside the checkout), under ANCHOR_HOME. Where llama.cpp's AMX/repacked weight path crashes (seen on
# AVX-512 machines whose VM does not grant AMX tiles: SIGSEGV in ggml_backend_amx_mul_mat), the peer is
# rerun without repacking and the table says so.
#
# Env: SPECD (binary), MODEL_PRESET (qwen|smollm|all, default all), THREADS (2), OUT (report directory).
set -euo pipefail
cd "$(dirname "$0")/.."
SPECD=${SPECD:-${CARGO_TARGET_DIR:-$HOME/.cache/specd/target}/release/specd}
ANCHOR=${LLAMA_ANCHOR:-$(cd .. && pwd)/shared/tools/llama-anchor}
ANCHOR_HOME=${ANCHOR_HOME:-$HOME/.cache/specd-anchor}
BIN=$ANCHOR_HOME/bin
THREADS=${THREADS:-2}
OUT=${OUT:-$HOME/.cache/specd/bench-anchor}
PRESETS=${MODEL_PRESET:-all}
[[ $PRESETS == all ]] && PRESETS="qwen smollm"
mkdir -p "$OUT"

[[ -x $SPECD ]] || { echo "bench-anchor: $SPECD missing (make build)" >&2; exit 1; }
if [[ ! -x $BIN/llama-bench || ! -x $BIN/llama-batched-bench ]]; then
  [[ -x $ANCHOR ]] || { echo "bench-anchor: no llama.cpp under $BIN and no llama-anchor tool at $ANCHOR" >&2; exit 1; }
  echo "bench-anchor: building llama.cpp with $ANCHOR (10-15 min on 2 cores)"
  ANCHOR_HOME=$ANCHOR_HOME "$ANCHOR" build
fi

for preset in $PRESETS; do
  echo "bench-anchor: specd bench-kernels --model-preset $preset"
  "$SPECD" bench-kernels --model-preset "$preset" --threads "$THREADS" --rows 9 --json >"$OUT/specd-$preset.json"
  for file in $(python3 -c 'import json,sys; print(" ".join(m["file"] for m in json.load(open(sys.argv[1]))["models"]))' "$OUT/specd-$preset.json"); do
    name=$(basename "$file" .gguf)
    echo "bench-anchor: llama-bench $name"
    repack=1
    if ! "$BIN"/llama-bench -m "$file" -t "$THREADS" -p 512 -n 128 -r 3 -o jsonl >"$OUT/peer-$name.jsonl" 2>"$OUT/peer-$name.err"; then
      echo "bench-anchor: llama-bench failed with repacking ($(tail -c 200 "$OUT/peer-$name.err" | tr '\n' ' ')); again with --repack 0"
      repack=0
      "$BIN"/llama-bench -m "$file" -t "$THREADS" -p 512 -n 128 -r 3 --repack 0 -o jsonl >"$OUT/peer-$name.jsonl"
    fi
    extra=()
    [[ $repack == 0 ]] && extra=(--no-repack)
    echo "bench-anchor: llama-batched-bench $name"
    "$BIN"/llama-batched-bench -m "$file" -t "$THREADS" -c 8192 -b 2048 -ub 512 -npp 64 -ntg 64 \
      -npl 1,4,8,16 "${extra[@]}" 2>&1 | grep '^|' >"$OUT/peer-$name.batched" || true
    echo "$repack" >"$OUT/peer-$name.repack"
  done
done

python3 - "$OUT" $PRESETS <<'EOF'
import json, os, sys
out, presets = sys.argv[1], sys.argv[2:]
rows = []
isa = threads = None
for preset in presets:
    rep = json.load(open(os.path.join(out, f"specd-{preset}.json")))
    isa, threads = rep["isa"], rep["threads"]
    for m in rep["models"]:
        name = os.path.basename(m["file"])[: -len(".gguf")]
        peer = {}
        for line in open(os.path.join(out, f"peer-{name}.jsonl")):
            r = json.loads(line)
            key = "pp" if r.get("n_gen", 0) == 0 else "tg"
            peer[key] = r["avg_ts"]
        batched = {}
        for line in open(os.path.join(out, f"peer-{name}.batched")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells and cells[0].isdigit():
                # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
                batched[int(cells[2])] = float(cells[7])
        repack = open(os.path.join(out, f"peer-{name}.repack")).read().strip() == "1"
        rows.append((name, m, peer, batched, repack))

def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"

print(f"\nspecd against llama.cpp, same files, {threads} threads, specd kernels {isa}")
print(f"{'model':<40} {'figure':<22} {'specd':>9} {'llama.cpp':>10} {'ratio':>6}")
for name, m, peer, batched, repack in rows:
    tag = name + ("" if repack else " (peer --repack 0)")
    pp = m["prefill"]["tok_s"] if m.get("prefill") else None
    tg = m["decode"]["tok_s"] if m.get("decode") else None
    print(f"{tag:<40} {'prefill pp512 tok/s':<22} {pp or 0:>9.1f} {peer.get('pp', 0):>10.1f} {ratio(pp, peer.get('pp')):>6}")
    print(f"{'':<40} {'decode tg128 tok/s':<22} {tg or 0:>9.1f} {peer.get('tg', 0):>10.1f} {ratio(tg, peer.get('tg')):>6}")
    for b in m.get("batched", []):
        n = b["sequences"]
        p = batched.get(n)
        print(f"{'':<40} {f'decode x{n} seqs tok/s':<22} {b['tok_s']:>9.1f} {p or 0:>10.1f} {ratio(b['tok_s'], p):>6}")
    curve = {p["rows"]: p["x_one_row"] for p in m["curve"]}
    print(f"{'':<40} {'verify cost 5 / 9 rows':<22} {curve.get(5, 0):>8.2f}x {curve.get(9, 0):>8.2f}x (x one row, specd)")
EOF
