#!/usr/bin/env bash
# The main job on its embedded default: build turbo-pi, write a small random-weight pi0.5
# checkpoint with a sample prompt, run the split dataflow graphs/demo.yml on the CPU with the
# real dora CLI (installed with pip when missing), and print the action sink's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/need_rust.sh
if ! command -v dora >/dev/null; then
  echo "installing the dora CLI: pip install dora-rs-cli==1.1.0"
  python3 -m pip install --quiet dora-rs-cli==1.1.0
fi
dora --version
cargo build --release --workspace
work=target/demo
rm -rf "$work"
./target/release/turbopi checkpoint random --preset pi05-small --seed 0 --out "$work/checkpoint"
./target/release/turbopi graph check graphs/demo.yml
dora run graphs/demo.yml
echo "actions: $work/actions.jsonl ($(wc -l < "$work/actions.jsonl") frames)"
cat "$work/actions.jsonl.summary.json"
