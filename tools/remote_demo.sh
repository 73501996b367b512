#!/usr/bin/env bash
# The robot and the GPU as two dora daemons on this one host: starts a coordinator and the
# daemons `robot` and `gpu` on ports of their own, runs graphs/remote.yml across them until
# FRAMES actions have arrived, stops everything (no process is left behind: every process it
# starts carries a marker in its environment, and whatever still carries it at the end is
# killed by pid) and prints a summary: the sink's counts, latency and stale episodes, every
# node's own line, and the edges that crossed between the daemons.
#
#   tools/remote_demo.sh [FRAMES=20] [ENCODING=raw|jpeg]
#
# TURBOPI_REMOTE_PORT_BASE (default 16300): the coordinator's port; the daemons take the next
# four (robot and gpu local listen ports, robot and gpu zenoh listeners). The TURBOPI_* graph
# variables of graphs/remote.yml (docs/settings.md) pass through. Needs the dora CLI and a
# release build; makes the small checkpoint (target/demo/checkpoint) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
frames=${1:-20}
encoding=${2:-raw}
base=${TURBOPI_REMOTE_PORT_BASE:-16300}
fail() { echo "remote_demo: $*" >&2; exit 2; }
[[ "$frames" =~ ^[0-9]+$ ]] && [ "$frames" -gt 0 ] || fail "FRAMES must be a positive integer, got \"$frames\""
[[ "$encoding" == raw || "$encoding" == jpeg ]] || fail "ENCODING must be raw or jpeg, got \"$encoding\""
[[ "$base" =~ ^[0-9]+$ ]] && [ "$base" -ge 1024 ] && [ "$base" -le 65530 ] ||
    fail "TURBOPI_REMOTE_PORT_BASE must be a port from 1024 to 65530, got \"$base\""
command -v dora >/dev/null || fail "the dora CLI is required: pip install dora-rs-cli==1.1.0"
for b in camera decode policy postprocess action-sink turbopi; do
    [ -x "target/release/$b" ] || fail "target/release/$b is missing: run cargo build --release --workspace"
done
for port in $base $((base + 1)) $((base + 2)) $((base + 3)) $((base + 4)); do
    python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "$port" 2>/dev/null ||
        fail "port $port is in use (set TURBOPI_REMOTE_PORT_BASE)"
done
if [ ! -f target/demo/checkpoint/config.json ]; then
    ./target/release/turbopi checkpoint random --preset pi05-small --seed 0 --out target/demo/checkpoint >/dev/null
fi
./target/release/turbopi graph check graphs/remote.yml

work=$(mktemp -d)
marker="remote-demo-$$-$RANDOM"
coord_port=$base
pids=()

# Processes whose environment carries the marker: the coordinator, the daemons and every node
# they spawned (nodes inherit their daemon's environment), orphans included.
marked() {
    local e pid
    for e in /proc/[0-9]*/environ; do
        pid=${e#/proc/}
        pid=${pid%/environ}
        if grep -qxz "TURBOPI_CLUSTER_ID=$marker" "$e" 2>/dev/null; then
            echo "$pid"
        fi
    done
}

cleanup() {
    local rc=$? left
    trap - EXIT INT TERM
    dora stop --all --coordinator-port "$coord_port" --grace-duration 3s >/dev/null 2>&1 || true
    dora down --force --coordinator-port "$coord_port" >/dev/null 2>&1 || true
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 1
    left=$(marked)
    if [ -n "$left" ]; then
        echo "remote_demo: killing processes still running: $(echo $left)"
        for pid in $left; do kill -9 "$pid" 2>/dev/null || true; done
    fi
    wait 2>/dev/null || true
    [ -z "$(marked)" ] && echo "remote_demo: no process left behind (logs in $work)"
    exit $rc
}
trap cleanup EXIT INT TERM

registered() { dora cluster status --coordinator-port "$coord_port" 2>/dev/null | grep -c "^\($1\)-" || true; }
wait_for() {
    local what=$1 want=$2 i
    for i in $(seq 100); do
        [ "$(registered "$what")" -ge "$want" ] && return 0
        sleep 0.3
    done
    fail "daemon(s) $what did not register with the coordinator (logs in $work)"
}

echo "remote_demo: coordinator on 127.0.0.1:$coord_port, daemons robot and gpu"
env TURBOPI_CLUSTER_ID="$marker" dora coordinator --port "$coord_port" --store memory \
    >"$work/coordinator.log" 2>&1 &
pids+=($!)
# Each daemon runs in the repository root: graphs/remote.yml's `working_dir: ../../graphs`
# is relative to `<daemon's folder>/_work/<session>`. Their zenoh links are explicit (no
# multicast scouting): gpu dials robot, as two hosts would.
env TURBOPI_CLUSTER_ID="$marker" dora daemon --machine-id robot --coordinator-port "$coord_port" \
    --local-listen-port $((base + 1)) --zenoh-listen 127.0.0.1:$((base + 3)) --zenoh-no-multicast \
    >"$work/daemon-robot.log" 2>&1 &
pids+=($!)
wait_for robot 1
env TURBOPI_CLUSTER_ID="$marker" dora daemon --machine-id gpu --coordinator-port "$coord_port" \
    --local-listen-port $((base + 2)) --zenoh-listen 127.0.0.1:$((base + 4)) \
    --zenoh-connect tcp/127.0.0.1:$((base + 3)) --zenoh-no-multicast \
    >"$work/daemon-gpu.log" 2>&1 &
pids+=($!)
wait_for "robot\|gpu" 2

out="$work/actions.jsonl"
rate=${TURBOPI_RATE_HZ:-10}
start=$(date +%s.%N)
TURBOPI_MAX_FRAMES=$frames TURBOPI_IMAGE_ENCODING=$encoding TURBOPI_OUTPUT=$out \
    dora start graphs/remote.yml --name remote-demo --coordinator-port "$coord_port" --detach \
    >"$work/start.log" 2>&1 || { cat "$work/start.log" >&2; fail "dora start failed"; }
uuid=$(grep -o '[0-9a-f]\{8\}-[0-9a-f-]\{27\}' "$work/start.log" | head -n 1)
echo "remote_demo: dataflow $uuid, waiting for $frames actions ($encoding frames, $rate Hz)"
deadline=$(python3 -c "print(int($frames / $rate + 60))")
got=0
for i in $(seq $((deadline * 5))); do
    got=$( [ -f "$out" ] && wc -l <"$out" || echo 0)
    [ "$got" -ge "$frames" ] && break
    sleep 0.2
done
[ "$got" -ge "$frames" ] || echo "remote_demo: only $got of $frames actions after ${deadline} s" >&2
dora stop remote-demo --coordinator-port "$coord_port" --grace-duration 5s >/dev/null 2>&1 || true
for i in $(seq 50); do [ -f "$out.summary.json" ] && break; sleep 0.2; done
wall=$(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')")

echo
echo "== summary ($wall s from dora start to the last action) =="
python3 - "$out" "$root/graphs/out/$uuid" <<'PY'
import glob, json, os, sys
out, logs = sys.argv[1], sys.argv[2]
try:
    s = json.load(open(out + ".summary.json"))
except OSError:
    print("no sink summary (the sink did not stop cleanly)")
    s = None
if s:
    fps = s.get("fps")
    print(f"actions: {s['frames']} frames, {s['gaps']} seq gaps, {s['rejected']} rejected")
    print(f"capture-to-action latency: p50 {s['latency_p50_ms']:.2f} ms, p99 {s['latency_p99_ms']:.2f} ms"
          f", {'n/a' if fps is None else f'{fps:.1f}'} frames/s")
    print(f"stale episodes (STALE_MS={s.get('stale_ms')}): {s.get('stale_episodes', 0)}")
    for e in s.get("stale", []):
        print(f"  after frame {e['last_seq']}: {e['silence_ms']:.0f} ms without actions, "
              f"resumed at {e['resumed_seq']}")
print("nodes:")
for f in sorted(glob.glob(os.path.join(logs, "log_*.jsonl"))):
    for line in open(f, errors="replace"):
        try:
            msg = json.loads(line).get("msg") or ""
        except ValueError:
            continue
        if " frames" in msg or "sent " in msg:
            print(f"  {msg}")
PY
echo "edges between the daemons (turbopi graph plan):"
TURBOPI_IMAGE_ENCODING=$encoding ./target/release/turbopi graph plan graphs/remote.yml --dot "$work/plan.dot" |
    sed -n '/across the network/,/^$/p' | sed '/^$/d; s/^/  /'
