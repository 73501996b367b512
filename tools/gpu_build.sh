#!/usr/bin/env bash
# Builds the CUDA binaries on this machine (no CUDA toolkit needed: cudarc loads the
# libraries at run time) and stages them for the GPU machine:
#   .gpu/bin/turbopi        the CLI built with --features cuda
#   .gpu/bin/cuda_*         the GPU test binaries of crate operators (operators/tests/cuda_*.rs)
#   .gpu/serve/             openpi-server and policy built with --features cuda (tools/gpu_serve.sh)
# Debug info is stripped so that .gpu/ stays small enough to carry. Then, on the GPU machine,
# from the repository root: tools/gpu_tests.sh (and tools/gpu_serve.sh).
#
#   tools/gpu_build.sh [--wheels] [--pack]
#     --wheels  also download, for a GPU machine without internet (Python 3.12, x86_64), the
#               dora CLI's wheel, openpi-client's and websockets' into .gpu/whl (about 28
#               MB; numpy and msgpack are taken from the machine)
#     --pack    also pack bin/ and serve/ into .gpu/pack.tar.xz (unpack there with
#               `tar xJf .gpu/pack.tar.xz -C .gpu`)
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=0
pack=0
for a in "$@"; do
    case "$a" in
        --wheels) wheels=1 ;;
        --pack) pack=1 ;;
        *) echo "gpu_build: unknown argument $a (expected --wheels, --pack)" >&2; exit 2 ;;
    esac
done
out=.gpu/bin
rm -rf "$out" .gpu/serve
mkdir -p "$out" .gpu/serve
# .gpu/ holds build outputs only; keep it out of git.
if [ -d .git ] && ! grep -qx '/\?\.gpu/\?' .git/info/exclude 2>/dev/null; then
    mkdir -p .git/info && echo '/.gpu/' >> .git/info/exclude
fi

cargo build --release --features cuda -p turbopi
cp target/release/turbopi "$out/"
# Built and copied at once: a plain workspace build writes target/release/<node> without CUDA.
cargo build --release -p openpi-server -p policy --features openpi-server/cuda,policy/cuda
cp target/release/openpi-server target/release/policy .gpu/serve/

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
    strip --strip-debug "$out"/* .gpu/serve/* 2>/dev/null || true
fi
if [ "$wheels" = 1 ]; then
    rm -rf .gpu/whl
    pip_target=(--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu/whl)
    # openpi-client's websocket policy imports msgpack, numpy, websockets and
    # typing_extensions only. The lent GPU machines' image has numpy, msgpack and
    # typing_extensions; what travels is limited (64 MiB), so only the rest goes.
    python3 -m pip download --quiet --no-deps "${pip_target[@]}" dora-rs-cli==1.1.0 \
        openpi-client==0.1.2 typing_extensions websockets
fi
if [ "$pack" = 1 ]; then
    tar -C .gpu -cf - bin serve | xz -T2 --lzma2=preset=9,dict=256MiB >.gpu/pack.tar.xz
fi
ls -la "$out" .gpu/serve
du -sh .gpu
