#!/usr/bin/env bash
# Latency the openpi server adds over the policy: serves a small random model with
# graphs/serve.yml (or the graph given) and drives it with openpi-client's
# WebsocketClientPolicy (tools/openpi/bench.py): client round trip, the policy's own time
# (`policy_timing.infer_ms`), their difference, and the time through the dataflow, p50/p90/p99.
#
#   tools/bench_serve.sh [GRAPH=graphs/serve.yml] [REQUESTS=300] [PRESET=pi05-small]
#
# With env SETTING=libero (or pi0) the checkpoint is `turbopi bench --setting`'s model instead
# of PRESET's (what `turbopi bench` times), and CKPT_DTYPE=bf16 writes its weights in bf16
# (default f32). The graph reads the TURBOPI_* variables of the
# environment (TURBOPI_BACKEND=cuda, TURBOPI_SPIN_US, ...). With env LOAD_CLIENTS (e.g.
# "1 2 4 8"), the same server then takes tools/openpi/load.py with each number of concurrent
# clients for LOAD_SECONDS (default 8) seconds: its table of requests/s, round trips and
# batch sizes.
#
# Writes the checkpoint (with a small tokenizer and LIBERO norm stats) to
# target/serve/checkpoint, installs openpi-client 0.1.2 into target/python/openpi-client when
# missing, and needs the dora CLI and a release build (`cargo build --release --workspace`).
set -euo pipefail
cd "$(dirname "$0")/.."
graph=${1:-graphs/serve.yml}
requests=${2:-300}
preset=${3:-pi05-small}
[ -f "$graph" ] || { echo "bench_serve: no graph file $graph" >&2; exit 2; }
[[ "$requests" =~ ^[0-9]+$ ]] || { echo "bench_serve: \"$requests\" is not a number" >&2; exit 2; }
ck=target/serve/checkpoint
rm -rf "$ck"
if [ -n "${SETTING:-}" ]; then
  model=(--setting "$SETTING")
  preset="setting $SETTING"
else
  model=(--preset "$preset")
fi
./target/release/turbopi checkpoint random "${model[@]}" --dtype "${CKPT_DTYPE:-f32}" --out "$ck" >/dev/null
python3 tools/openpi/fixtures.py "$ck" >/dev/null
openpi_client=target/python/openpi-client
if ! PYTHONPATH=$openpi_client python3 -c "import openpi_client.websocket_client_policy" 2>/dev/null; then
  python3 -m pip install --quiet --target "$openpi_client" openpi-client==0.1.2 typing_extensions
fi
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
work=$(mktemp -d)
TURBOPI_CHECKPOINT=$PWD/$ck TURBOPI_ROBOT=libero TURBOPI_HOST=127.0.0.1 TURBOPI_PORT=$port \
    dora run "$graph" >"$work/dora.log" 2>&1 &
dora_pid=$!
trap 'kill -INT $dora_pid 2>/dev/null; wait $dora_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  kill -0 $dora_pid 2>/dev/null || { echo "bench_serve: dora run exited:" >&2; tail -n 30 "$work/dora.log" >&2; exit 1; }
  sleep 1
done
echo "bench_serve: $graph, $preset ($(nproc) CPU cores), port $port"
PYTHONPATH=$openpi_client python3 tools/openpi/bench.py --port "$port" --requests "$requests"
for n in ${LOAD_CLIENTS:-}; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench_serve: LOAD_CLIENTS has \"$n\", not a client count" >&2; exit 2; }
  echo "load.py: $n clients, ${LOAD_SECONDS:-8} s"
  PYTHONPATH=$openpi_client python3 tools/openpi/load.py --port "$port" --clients "$n" \
    --seconds "${LOAD_SECONDS:-8}"
done
