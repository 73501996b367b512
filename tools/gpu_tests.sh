#!/usr/bin/env bash
# Runs every GPU test binary in a directory (default .gpu/bin, made by tools/gpu_build.sh)
# and prints one table: binary, result, passed/failed tests, time. Run from the repository
# root on the GPU machine. Arguments after `--` go to every test binary, e.g.
#   tools/gpu_tests.sh                          all tests
#   tools/gpu_tests.sh .gpu/bin -- --skip full_size
#   tools/gpu_tests.sh .gpu/bin -- full_size_pi0
# Logs: $GPU_TEST_LOGS (default .gpu/logs)/<binary>.log; the tail of a failing log is printed.
set -uo pipefail
dir=.gpu/bin
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    dir=$1
    shift
fi
[ "${1:-}" = "--" ] && shift
extra=("$@")
logs=${GPU_TEST_LOGS:-.gpu/logs}
mkdir -p "$logs"
# The golden vectors travel with the repository; the path baked in at build time does not.
export TURBOPI_GOLDEN=${TURBOPI_GOLDEN:-$PWD/tests/golden}
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

if [ ! -d "$dir" ]; then
    echo "gpu_tests: no directory $dir (run tools/gpu_build.sh first)" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

rows=()
status=0
for bin in "$dir"/*; do
    name=$(basename "$bin")
    [ -f "$bin" ] && [ -x "$bin" ] || continue
    [ "$name" = "turbopi" ] && continue
    log="$logs/$name.log"
    start=$(date +%s%N)
    # One test at a time: the full-size tests hold a CPU model and two GPU models each.
    "$bin" --test-threads=1 ${extra[@]+"${extra[@]}"} >"$log" 2>&1
    rc=$?
    secs=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f s", (b - a) / 1e9 }')
    summary=$(grep -E '^test result:' "$log" | tail -1 | sed -E 's/^test result: [A-Za-z]+\. //; s/; [0-9]+ measured.*//')
    if [ $rc -eq 0 ]; then
        result=ok
    else
        result=FAIL
        status=1
        echo "---- $name failed (rc $rc); last lines of $log:"
        tail -n 60 "$log"
        echo "----"
    fi
    failed=$(grep -E '^test .* FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | tr '\n' ' ')
    rows+=("$(printf '%-24s %-6s %-44s %10s' "$name" "$result" "${summary:-no summary}" "$secs")")
    [ -n "$failed" ] && rows+=("$(printf '    failed: %s' "$failed")")
done

echo
printf '%-24s %-6s %-44s %10s\n' "test binary" result "tests" time
printf '%.0s-' {1..88}
echo
for r in "${rows[@]}"; do
    echo "$r"
done
if [ ${#rows[@]} -eq 0 ]; then
    echo "gpu_tests: no test binaries in $dir" >&2
    exit 2
fi
exit $status
