#!/usr/bin/env python3
"""Per-kernel GPU time from Nsight Compute's CSV: each kernel launch's
gpu__time_duration.sum (as `ncu --metrics gpu__time_duration.sum --csv` prints it), grouped
by kernel name: launches, mean and total microseconds, share of the total. Kernels of a
replayed CUDA graph are profiled one by one, so each time is the kernel alone (no overlap
with its neighbours, no programmatic early start): a floor per kernel, not the graph's time.

Usage: ncu_table.py CSV [--per N]   (--per: divide totals by N, e.g. the denoise steps seen)
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict

UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def read(path: str) -> dict[str, list[float]]:
    """Kernel name -> durations in microseconds."""
    with open(path, newline="") as f:
        # ncu prints its own lines (==PROF== ...) before the table.
        lines = [line for line in f if line.startswith('"')]
    if not lines:
        sys.exit(f"ncu_table: no CSV rows in {path}")
    times: dict[str, list[float]] = defaultdict(list)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row.get("Metric Unit", "")
        if unit not in UNITS:
            sys.exit(f"ncu_table: {path}: unknown unit {unit!r} for {row.get('Kernel Name')}")
        value = float(row["Metric Value"].replace(",", ""))
        times[row["Kernel Name"]].append(value * UNITS[unit])
    if not times:
        sys.exit(f"ncu_table: {path}: no gpu__time_duration.sum rows")
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--per", type=float, default=1.0, help="divide the totals by this")
    args = ap.parse_args()
    if args.per <= 0:
        sys.exit("ncu_table: --per must be positive")
    times = read(args.csv)
    total = sum(sum(v) for v in times.values())
    print(f"{'kernel':<40} {'launches':>8} {'mean us':>9} {'total us':>10} {'share':>6}")
    for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(
            f"{name[:40]:<40} {len(v) / args.per:>8.1f} {sum(v) / len(v):>9.2f} "
            f"{sum(v) / args.per:>10.1f} {100 * sum(v) / total:>5.1f}%"
        )
    print(f"{'total':<40} {sum(len(v) for v in times.values()) / args.per:>8.1f} {'':>9} {total / args.per:>10.1f}")


if __name__ == "__main__":
    main()
