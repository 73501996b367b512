#!/usr/bin/env bash
# One round of GPU measurements, for a machine without a Rust toolchain or internet, in parts
# that each fit one device call (at most 10 minutes). Run from the repository root after
# tools/gpu_build.sh [--wheels] [--pack] on the build machine (and, if packed,
# `tar xJf .gpu/pack.tar.xz -C .gpu`).
#
#   tools/gpu_round.sh tests      cuda_ops and cuda_policy (tools/gpu_tests.sh), then the
#                                 kernel set compiled for sm_87, sm_90, sm_100 and sm_110
#   tools/gpu_round.sh bench      turbopi bench, libero and pi0: bf16, bf16 with
#                                 TURBOPI_LT_EPILOGUES=0, fp8 (its default stages), fp8
#                                 with TURBOPI_FP8_STAGES=all (and with TURBOPI_FP8_FOLD=0
#                                 too), fp8 with TURBOPI_SKINNY_GEGLU=0 (libero) or
#                                 TURBOPI_SKINNY_FP8_WIDE=0 (pi0); two interleaved rounds;
#                                 then TURBOPI_PROFILE=1 for libero in bf16 and fp8
#   tools/gpu_round.sh overlap    turbopi bench --setting libero (one-at-a-time and pipelined
#                                 lines) with TURBOPI_OVERLAP_SMS 0, 100 and 66, two rounds
#   tools/gpu_round.sh attention  turbopi bench --setting libero with the prefix's attention
#                                 as gemm, flash, flash:1, flash:4, flash:8 and the vision
#                                 tower's as flash and chunks, two rounds
#   tools/gpu_round.sh accuracy   turbopi accuracy --backend cuda --dtype fp8 --against bf16
#                                 (fp8's default stages): full-size libero and pi0 (20
#                                 observations each), and every golden model
#   tools/gpu_round.sh serve      tools/gpu_serve.sh 300 2 0 3000
#   tools/gpu_round.sh kernels    each kernel's own GPU time (Nsight Compute replays them
#                                 one by one: no overlap, no early start) over about one
#                                 steady-state frame of turbopi bench --setting libero, in
#                                 bf16 and fp8: tools/ncu_table.py's table per kernel name
#
# Everything printed is also written to $GPU_ROUND_OUT (default .gpu/round-out)/<part>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
out=${GPU_ROUND_OUT:-.gpu/round-out}
mkdir -p "$out"
tp=.gpu/bin/turbopi
[ -x "$tp" ] || { echo "gpu_round: $tp missing (run tools/gpu_build.sh on the build machine)" >&2; exit 2; }
export TURBOPI_GOLDEN=${TURBOPI_GOLDEN:-$PWD/tests/golden}

tests() {
    tools/gpu_tests.sh .gpu/bin
    "$tp" kernels compile --arch sm_87,sm_90,sm_100,sm_110
}

bench_one() {
    local setting=$1 label=$2
    shift 2
    echo "== $setting, $label"
    env "$@" "$tp" bench --setting "$setting" --backend cuda --steps 10 --iters 200 \
        $( [ "${label%%,*}" = fp8 ] && echo --dtype fp8 ) 2>&1
}

bench() {
    for round in 1 2; do
        for setting in libero pi0; do
            bench_one "$setting" bf16 TURBOPI_LT_EPILOGUES=1
            bench_one "$setting" "bf16, TURBOPI_LT_EPILOGUES=0" TURBOPI_LT_EPILOGUES=0
            bench_one "$setting" fp8 TURBOPI_LT_EPILOGUES=1
            bench_one "$setting" "fp8, TURBOPI_FP8_STAGES=all" TURBOPI_FP8_STAGES=all
            bench_one "$setting" "fp8, TURBOPI_FP8_STAGES=all TURBOPI_FP8_FOLD=0" \
                TURBOPI_FP8_STAGES=all TURBOPI_FP8_FOLD=0
            if [ "$setting" = pi0 ]; then
                bench_one "$setting" "fp8, TURBOPI_SKINNY_FP8_WIDE=0" TURBOPI_SKINNY_FP8_WIDE=0
            else
                bench_one "$setting" "fp8, TURBOPI_SKINNY_GEGLU=0" TURBOPI_SKINNY_GEGLU=0
            fi
        done
    done
    for dtype in bf16 fp8; do
        echo "== profile, libero, $dtype"
        TURBOPI_PROFILE=1 "$tp" bench --setting libero --backend cuda --steps 10 --iters 50 \
            --dtype "$dtype" 2>&1
    done
}

overlap() {
    for round in 1 2; do
        for sms in 0 100 66; do
            bench_one libero "bf16, TURBOPI_OVERLAP_SMS=$sms" TURBOPI_OVERLAP_SMS=$sms
        done
    done
}

attention() {
    for round in 1 2; do
        for v in gemm flash flash:1 flash:4 flash:8; do
            bench_one libero "bf16, TURBOPI_PREFIX_ATTENTION=$v" TURBOPI_PREFIX_ATTENTION=$v
        done
        bench_one libero "bf16, TURBOPI_VISION_ATTENTION=chunks" TURBOPI_VISION_ATTENTION=chunks
    done
}

accuracy() {
    for setting in libero pi0; do
        echo "== accuracy, full-size random weights, $setting"
        "$tp" accuracy --setting "$setting" --backend cuda --dtype fp8 --against bf16 \
            --observations 20 2>&1
    done
    for case in "$TURBOPI_GOLDEN"/*/; do
        [ -d "$case/checkpoint" ] || continue
        name=$(basename "$case")
        setting=libero
        [ "$name" = pi0_small ] && setting=pi0
        echo "== accuracy, golden $name (--setting $setting)"
        "$tp" accuracy --checkpoint "$case/checkpoint" --setting "$setting" --backend cuda \
            --dtype fp8 --against bf16 --observations 20 2>&1
    done
}

serve() {
    tools/gpu_serve.sh 300 2 0 3000
}

kernels() {
    local ncu
    ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null) ||
        { echo "gpu_round: no ncu (Nsight Compute) on this machine" >&2; return 2; }
    for dtype in bf16 fp8; do
        # 10 warm-up and 5 timed frames of about 2,150 launches each (after the random
        # weights' few hundred): skip into the warm-up's second half, then take one frame's
        # worth. Which kernel the window starts at does not change the per-name totals.
        echo "== ncu, libero, $dtype: 2,150 launches after the first 12,000"
        "$ncu" --metrics gpu__time_duration.sum --csv --launch-skip 12000 --launch-count 2150 \
            "$tp" bench --setting libero --backend cuda --steps 10 --iters 5 --dtype "$dtype" \
            >"$out/ncu_libero_$dtype.csv" 2>"$out/ncu_libero_$dtype.log"
        python3 tools/ncu_table.py "$out/ncu_libero_$dtype.csv"
    done
}

case "$part" in
    tests | bench | overlap | attention | accuracy | serve | kernels)
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
        fi
        "$part" 2>&1 | tee "$out/$part.txt"
        exit "${PIPESTATUS[0]}"
        ;;
    *)
        echo "usage: tools/gpu_round.sh tests|bench|overlap|attention|accuracy|serve|kernels" >&2
        exit 2
        ;;
esac
