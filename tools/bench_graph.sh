#!/usr/bin/env bash
# Runs a dataflow for a fixed time and reports what a control loop is tuned by: throughput,
# capture-to-action latency p50/p99, frames sent / delivered / dropped, every node's own
# counters (frames, seq gaps, transport and bytes through the host), and the per-edge
# transport plan (`turbopi graph plan`).
#
#   tools/bench_graph.sh GRAPH [SECONDS=30] [RATE_HZ=20] [START_DELAY_S=0]
#
# The graph's camera and sink must read TURBOPI_RATE_HZ, TURBOPI_MAX_FRAMES,
# TURBOPI_START_DELAY_S and TURBOPI_OUTPUT (every shipped graph does). START_DELAY_S lets
# model nodes load their weights before the first frame (about 10 s for a full-size GPU
# model). Needs the dora CLI and a release build (`cargo build --release --workspace`).
set -euo pipefail
cd "$(dirname "$0")/.."
graph=${1:?usage: tools/bench_graph.sh GRAPH [SECONDS] [RATE_HZ] [START_DELAY_S]}
secs=${2:-30}
rate=${3:-20}
delay=${4:-0}
[ -f "$graph" ] || { echo "bench_graph: no graph file $graph" >&2; exit 2; }
for v in "$secs" "$rate" "$delay"; do
    [[ "$v" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "bench_graph: \"$v\" is not a number" >&2; exit 2; }
done
frames=$(python3 -c "print(max(1, round($secs * $rate)))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./target/release/turbopi graph plan "$graph" --dot "$work/plan.dot" >"$work/plan.txt"
echo "bench_graph: $graph, $frames frames at $rate Hz ($secs s) after ${delay} s"
start=$(date +%s)
TURBOPI_RATE_HZ=$rate TURBOPI_MAX_FRAMES=$frames TURBOPI_START_DELAY_S=$delay \
    TURBOPI_OUTPUT="$work/actions.jsonl" dora run "$graph" >"$work/dora.log" 2>&1 || {
    echo "bench_graph: dora run failed; last lines:" >&2
    tail -n 30 "$work/dora.log" >&2
    exit 1
}
echo "wall time $(( $(date +%s) - start )) s"
python3 - "$work" <<'PY'
import json, re, sys
work = sys.argv[1]
summary = json.load(open(f"{work}/actions.jsonl.summary.json"))
log = open(f"{work}/dora.log", errors="replace").read()
sent = re.findall(r"camera: sent (\d+) frames", log)
sent = int(sent[-1]) if sent else None
got = summary["frames"]
def ms(v):
    return "n/a" if v is None else f"{v:.2f} ms"
print(f"frames: sent {sent}, delivered {got}, dropped {sent - got if sent is not None else 'n/a'}")
fps = summary.get("fps")
print(f"throughput: {'n/a' if fps is None else f'{fps:.1f} frames/s'} (first to last action)")
print(f"capture-to-action latency: p50 {ms(summary['latency_p50_ms'])}, p99 {ms(summary['latency_p99_ms'])}")
print("node counters:")
seen = set()
for m in re.finditer(r"stdout ([\w-]+): ([\w-]+: \d+ frames.*)", log):
    line = m.group(2).strip()
    if line not in seen:
        seen.add(line)
        print(f"  {line}")
PY
echo "edges (turbopi graph plan):"
sed -n '/^from /,/^$/p' "$work/plan.txt" | sed 's/^/  /'
grep '^note:' "$work/plan.txt" | sed 's/^/  /' || true
