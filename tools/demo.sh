#!/usr/bin/env bash
# The main job on its embedded default: build turbopi, write a small random-weight pi0.5
# checkpoint with a sample observation, and run the policy on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
  echo "turbo-pi needs a Rust toolchain (https://rustup.rs): cargo was not found" >&2
  exit 1
fi
cargo build --release --bin turbopi
work=target/demo
rm -rf "$work"
./target/release/turbopi checkpoint random --preset pi05-small --seed 0 --out "$work/checkpoint"
./target/release/turbopi checkpoint inspect "$work/checkpoint" | sed -n '/parameters per part/,/total/p'
./target/release/turbopi infer --checkpoint "$work/checkpoint" --observation "$work/checkpoint/observation" \
  --steps 10 --out "$work/actions.npy"
