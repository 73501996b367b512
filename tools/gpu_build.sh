#!/usr/bin/env bash
# Builds the CUDA binaries on this machine (no CUDA toolkit needed: cudarc loads the
# libraries at run time) and stages them for the GPU machine:
#   .gpu/bin/turbopi        the CLI built with --features cuda
#   .gpu/bin/cuda_*         the GPU test binaries of crate operators (operators/tests/cuda_*.rs)
# Debug info is stripped so that .gpu/ stays small enough to carry. Then, on the GPU machine,
# from the repository root: tools/gpu_tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu/bin
rm -rf "$out"
mkdir -p "$out"
# .gpu/ holds build outputs only; keep it out of git.
if [ -d .git ] && ! grep -qx '/\?\.gpu/\?' .git/info/exclude 2>/dev/null; then
    mkdir -p .git/info && echo '/.gpu/' >> .git/info/exclude
fi

cargo build --release --features cuda -p turbopi
cp target/release/turbopi "$out/"

json=$(mktemp)
trap 'rm -f "$json"' EXIT
cargo test --release --features cuda -p operators --no-run --message-format=json >"$json"
found=0
for exe in $(grep -o '"executable":"[^"]*"' "$json" | sed 's/^"executable":"//; s/"$//'); do
    name=$(basename "$exe")
    name=${name%-*}            # drop cargo's hash suffix
    case "$name" in
        cuda_*) cp "$exe" "$out/$name"; found=$((found + 1)) ;;
    esac
done
if [ "$found" -eq 0 ]; then
    echo "gpu_build: no cuda_* test binaries found in cargo's output" >&2
    exit 1
fi
if command -v strip >/dev/null; then
    strip --strip-debug "$out"/* 2>/dev/null || true
fi
ls -la "$out"
du -sh .gpu
