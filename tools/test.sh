#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need (the dora CLI), builds
# the workspace (the dataflow tests run the node binaries), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo --version
if ! command -v dora >/dev/null; then
  python3 -m pip install --quiet dora-rs-cli==1.1.0
fi
dora --version
cargo build --release --workspace
cargo test --release --workspace
