#!/usr/bin/env bash
# On a GPU machine without a Rust toolchain or internet: what serving adds over the policy,
# one client (tools/bench_serve.sh: openpi-client's round trip − `policy_timing.infer_ms`),
# with the policy in the server's process on the CUDA backend, for each SPIN_US given, in
# turn, ROUNDS times; then the client's floor (tools/openpi/echo_server.py, answering at once
# and after a policy-long hold: ECHO_HOLD_MS, default 16). Run from the
# repository root after tools/gpu_build.sh --wheels on the build machine (and, if packed,
# `tar xJf .gpu/pack.tar.xz -C .gpu`).
#
#   tools/gpu_serve.sh [REQUESTS=300] [ROUNDS=2] [SPIN_US values...=0 3000]
#
# The model is `turbopi bench --setting libero`'s (full-size pi0.5, action horizon 10, random
# bf16 weights), so that the policy's own time compares with `turbopi bench` (env SETTING,
# CKPT_DTYPE and TURBOPI_BACKEND override it, as tools/bench_serve.sh reads them; so do
# LOAD_CLIENTS and LOAD_SECONDS, e.g. LOAD_CLIENTS="1 2 4 8" for load.py's table after each
# one-client run). Logs and tables go to $GPU_SERVE_OUT (default .gpu/serve-out).
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-300}
rounds=${2:-2}
shift $(($# < 2 ? $# : 2))
spins=("$@")
[ ${#spins[@]} -gt 0 ] || spins=(0 3000)
out=${GPU_SERVE_OUT:-.gpu/serve-out}
mkdir -p "$out" target/release
for f in .gpu/bin/turbopi .gpu/serve/openpi-server .gpu/serve/policy; do
    [ -x "$f" ] || { echo "gpu_serve: $f missing (run tools/gpu_build.sh on the build machine)" >&2; exit 2; }
done
cp -f .gpu/bin/turbopi .gpu/serve/openpi-server .gpu/serve/policy target/release/
if ! command -v dora >/dev/null; then
    python3 -m pip install --quiet --no-index --no-deps .gpu/whl/dora_rs_cli-1.1.0-*.whl
    export PATH=$HOME/.local/bin:$PATH
fi
openpi_client=target/python/openpi-client
if ! PYTHONPATH=$openpi_client python3 -c "import openpi_client.websocket_client_policy" 2>/dev/null; then
    # The wheels tools/gpu_build.sh --wheels fetched; numpy and msgpack come from the machine
    # where they are not among them.
    python3 -m pip install --quiet --no-index --no-deps --target "$openpi_client" \
        $(ls .gpu/whl/*.whl | grep -v dora_rs_cli)
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
fi
export TURBOPI_BACKEND=${TURBOPI_BACKEND:-cuda} SETTING=${SETTING-libero} CKPT_DTYPE=${CKPT_DTYPE:-bf16}
for r in $(seq "$rounds"); do
    for s in "${spins[@]}"; do
        echo "== round $r, SPIN_US=$s"
        TURBOPI_SPIN_US=$s tools/bench_serve.sh graphs/serve_in_process.yml "$requests" \
            2>&1 | tee "$out/in_process_spin${s}_round$r.txt" |
            grep -E "round_trip|policy|added|dataflow|server|load.py|clients|^ *[0-9]+ "
    done
done
# The echo answers at once, then after a hold as long as the policy's (ECHO_HOLD_MS, default
# 16: full-size pi0.5 on an H100), so that its threads and the client idle between requests
# as they do against the real policy.
for hold in 0 "${ECHO_HOLD_MS:-16}"; do
    echo "== the client's floor: echo_server.py --hold-ms $hold, bench.py --requests $requests"
    port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    PYTHONPATH=$openpi_client python3 tools/openpi/echo_server.py --port "$port" --horizon 10 \
        --hold-ms "$hold" &
    echo_pid=$!
    trap 'kill $echo_pid 2>/dev/null || true' EXIT
    sleep 2
    PYTHONPATH=$openpi_client python3 tools/openpi/bench.py --port "$port" --requests "$requests" |
        tee "$out/echo_hold$hold.txt"
    kill $echo_pid 2>/dev/null || true
    wait $echo_pid 2>/dev/null || true
done
