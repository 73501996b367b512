#!/usr/bin/env python3
"""Latency the openpi server adds over the policy itself, measured from an openpi client.

One openpi-client WebsocketClientPolicy sends LIBERO observations (two 224x224 cameras, a
state, a prompt) back to back. Per request:
  * round trip: the client's wall time around `infer()` (packing, websocket, server, unpacking);
  * policy: `policy_timing.infer_ms`, the policy node's own time for the frame (the sum of its
    stage times: device time on the GPU);
  * policy_wall: `policy_timing.wall_ms`, the host's wall time of the policy's call that ran the
    frame (with the backend's host work: staging, launches, waits, copies back);
  * added: round trip - policy, everything the serving path costs (msgpack both ways, the
    websocket, openpi's transforms, two dora messages, the output transforms);
  * dataflow: `server_timing.dataflow_ms`, frame into the dataflow until its actions came back.
Prints p50/p90/p99/mean of each over the measured requests and writes them as JSON (--json).

Usage: bench.py --port P [--requests 300] [--warmup 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from openpi_client import websocket_client_policy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import observations  # noqa: E402


def pct(v: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(v), q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    policy = websocket_client_policy.WebsocketClientPolicy(host=args.host, port=args.port)
    # Same-size frames throughout: 224x224 cameras as openpi's LIBERO runtime sends them.
    frames = []
    for i in range(16):
        obs = observations.libero(4 * i)
        frames.append(obs)
    series: dict[str, list[float]] = {
        "round_trip": [],
        "policy": [],
        "policy_wall": [],
        "added": [],
        "dataflow": [],
        "server": [],
    }
    for i in range(args.warmup + args.requests):
        obs = frames[i % len(frames)]
        t0 = time.perf_counter()
        r = policy.infer(obs)
        rtt = (time.perf_counter() - t0) * 1e3
        if i < args.warmup:
            continue
        p = r["policy_timing"]["infer_ms"]
        series["round_trip"].append(rtt)
        series["policy"].append(p)
        series["added"].append(rtt - p)
        # Servers other than turbo-pi's (and pipelined policies) may not report these.
        if "wall_ms" in r["policy_timing"]:
            series["policy_wall"].append(r["policy_timing"]["wall_ms"])
        if "dataflow_ms" in r["server_timing"]:
            series["dataflow"].append(r["server_timing"]["dataflow_ms"])
        series["server"].append(r["server_timing"]["infer_ms"])
    rows = {
        k: {"p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99), "mean": statistics.fmean(v)}
        for k, v in series.items()
        if v
    }
    print(f"{args.requests} requests after {args.warmup} warm-up, one client, ms")
    print(f"{'':<12}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}")
    for k, r in rows.items():
        print(f"{k:<12}{r['p50']:9.2f}{r['p90']:9.2f}{r['p99']:9.2f}{r['mean']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "warmup": args.warmup, "ms": rows}, f, indent=1)


if __name__ == "__main__":
    main()
