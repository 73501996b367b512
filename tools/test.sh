#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need (the dora CLI, the Chrome
# trace consumer, openpi-client), builds the workspace (the dataflow tests run the node
# binaries), runs every test, then lints the CUDA code and runs its GPU-free unit tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/need_rust.sh
cargo --version
if ! command -v dora >/dev/null; then
  python3 -m pip install --quiet dora-rs-cli==1.1.0
fi
dora --version
# The Chrome trace consumer (tools/trace_consumer: Chrome DevTools' trace engine, run by Node)
# that tools/turbopi/tests/chrome_consumer.rs reads `turbopi trace report --chrome` back with.
if ! command -v npm >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
node --version
npm ci --prefix tools/trace_consumer --no-audit --no-fund --loglevel=error >/dev/null
# openpi's own client (tests/tests/serve.rs drives the openpi server with it), in a folder of
# its own so that its pinned numpy<2 does not touch the system's packages. openpi-client 0.1.2
# imports typing_extensions without declaring it.
openpi_client=target/python/openpi-client
if ! PYTHONPATH=$openpi_client python3 -c "import openpi_client.websocket_client_policy" 2>/dev/null; then
  python3 -m pip install --quiet --target "$openpi_client" openpi-client==0.1.2 typing_extensions
fi
# The `sentencepiece` package openpi tokenizes with, and transformers' GemmaConverter (how
# PaliGemma's tokenizer.json is made), for tools/turbopi/tests/tokenizer.rs
# (tools/openpi/sentencepiece_cases.py), pinned, in a folder of their own.
sentencepiece_py=target/python/sentencepiece
if ! PYTHONPATH=$sentencepiece_py python3 -c "import importlib.metadata as m, sentencepiece, transformers.convert_slow_tokenizer; assert (m.version('sentencepiece'), m.version('transformers')) == ('0.2.1', '4.57.6')" 2>/dev/null; then
  python3 -m pip install --quiet --upgrade --target "$sentencepiece_py" \
    sentencepiece==0.2.1 protobuf==6.33.0 tokenizers==0.22.2 transformers==4.57.6
fi
cargo build --release --workspace
cargo test --release --workspace
# The CUDA backend and the GPU paths of the nodes build without a GPU or toolkit (cudarc loads
# the libraries at run time): lint them, and run what can be tested without a GPU (GEMM pick
# sharing, weight layouts, the kernel registry; the IPC slot accounting runs above).
cuda_features=operators/cuda,policy/cuda,vision/cuda,prefix/cuda,denoise/cuda,turbopi/cuda,openpi-server/cuda
cargo clippy --release --workspace --all-targets --features "$cuda_features" -- -D warnings
cargo test --release -p operators --features cuda --lib
