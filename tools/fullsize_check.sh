#!/usr/bin/env bash
# Full-size parity on the CPU: a random-weight checkpoint of PRESET (default pi05, f32, about
# 13 GB on disk and in memory), the Rust CPU backend and the Python reference on the same
# observation, and their max abs difference relative to max |action|.
# Needs python3 with torch, numpy and safetensors. Usage: tools/fullsize_check.sh [PRESET] [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-pi05}
work=${2:-/tmp/turbopi-fullsize}
cargo build --release --bin turbopi
ck="$work/$preset"
[ -f "$ck/model.safetensors" ] || ./target/release/turbopi checkpoint random --preset "$preset" --dtype f32 --seed 7 --out "$ck"
/usr/bin/env time -f "rust: %e s wall, %M KB peak" ./target/release/turbopi infer --checkpoint "$ck" \
  --observation "$ck/observation" --steps 10 --out "$work/rust.npy"
/usr/bin/env time -f "reference: %e s wall, %M KB peak" python3 tools/reference/pi_reference.py \
  --checkpoint "$ck" --observation "$ck/observation" --steps 10 --out "$work/reference.npy"
python3 - "$work" <<'PY'
import sys, numpy as np
w = sys.argv[1]
a, b = np.load(f"{w}/rust.npy"), np.load(f"{w}/reference.npy")
err, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
print(f"max abs diff {err:.3e}, max |action| {scale:.3f}, relative {err / scale:.3e}")
sys.exit(0 if err <= 1e-3 * scale else 1)
PY
