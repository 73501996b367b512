#!/usr/bin/env bash
# On a GPU machine: the same camera stream through graphs/fused_gpu.yml and graphs/split_gpu.yml,
# their actions compared per `seq` bit for bit, and each graph's peak GPU memory (the sum over
# its processes, sampled with nvidia-smi every 100 ms). Run from the repository root with the
# node binaries built with `--features cuda` in target/release and
# the dora CLI on the PATH.
#
#   tools/gpu_graphs.sh [FRAMES=40] [CHECKPOINT=target/checkpoints/pi05]
#
# The fused graph runs first: its GEMM picks (kept in the kernel cache) are the ones the split
# stages read, which is what makes the two agree bit for bit.
set -euo pipefail
frames=${1:-40}
ckpt=$(realpath "${2:-target/checkpoints/pi05}")
out=${GPU_GRAPHS_OUT:-.gpu/graphs}
mkdir -p "$out"
out=$(realpath "$out")
[ -f "$ckpt/model.safetensors" ] || { echo "gpu_graphs: no checkpoint in $ckpt" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "gpu_graphs: nvidia-smi not found" >&2; exit 2; }

for g in fused_gpu split_gpu; do
    mem="$out/$g.mem"
    : >"$mem"
    (while true; do
        nvidia-smi --query-compute-apps=used_memory --format=csv,noheader,nounits 2>/dev/null |
            awk '{s += $1} END {print s + 0}' >>"$mem"
        sleep 0.1
    done) &
    sampler=$!
    start=$(date +%s)
    TURBOPI_CHECKPOINT=$ckpt TURBOPI_PROMPT=$ckpt/observation TURBOPI_MAX_FRAMES=$frames \
        TURBOPI_RATE_HZ=10 TURBOPI_START_DELAY_S=${START_DELAY_S:-30} \
        TURBOPI_OUTPUT=$out/$g.jsonl dora run "graphs/$g.yml" >"$out/$g.log" 2>&1 || {
        kill "$sampler" 2>/dev/null || true
        echo "gpu_graphs: dora run $g failed; last lines:" >&2
        tail -n 40 "$out/$g.log" >&2
        exit 1
    }
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    peak=$(sort -n "$mem" | tail -1)
    echo "$g: $(( $(date +%s) - start )) s, peak GPU memory over its processes ${peak} MiB"
    grep -E "stdout (policy|vision|prefix|denoise|action-sink): " "$out/$g.log" | sed 's/^.*stdout /  /' | sort -u || true
done

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def load(g):
    rows = {}
    for line in open(f"{out}/{g}.jsonl"):
        r = json.loads(line)
        rows[r["seq"]] = r["actions"]
    return rows
fused, split = load("fused_gpu"), load("split_gpu")
common = sorted(set(fused) & set(split))
same = sum(fused[s] == split[s] for s in common)
worst = 0.0
for s in common:
    for a, b in zip(sum(fused[s], []), sum(split[s], [])):
        worst = max(worst, abs(a - b))
print(f"split_gpu vs fused_gpu: {len(common)} common frames ({len(fused)} fused, {len(split)} split), "
      f"{same} bit-identical, max abs difference {worst:.3e}")
sys.exit(0 if common and same == len(common) else 1)
PY
