#!/usr/bin/env python3
"""Drives a turbo-pi openpi server with openpi-client's own WebsocketClientPolicy.

Sends FRAMES observations of ROBOT's format one after the other (frame i gets the server's
seq i when it is the server's first client), checks every answer (the metadata on connect,
`actions` of shape [horizon, robot dims] in float64, finite; `policy_timing` and
`server_timing` with `infer_ms`), and saves each observation exactly as the client packed it
(OUT/frame<i>.msgpack) with the actions it got back (OUT/frame<i>.actions.npy), for
`turbopi infer --openpi` to reproduce. Exits non-zero with a message on any failure.

Usage: client_check.py --port P --robot libero|droid --horizon H --frames N --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from openpi_client import msgpack_numpy
from openpi_client import websocket_client_policy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import observations  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--robot", required=True, choices=sorted(observations.ROBOTS))
    ap.add_argument("--horizon", type=int, required=True)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--metadata", default="{}", help="the metadata expected on connect (JSON)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    make, dims = observations.ROBOTS[args.robot]
    os.makedirs(args.out, exist_ok=True)

    policy = websocket_client_policy.WebsocketClientPolicy(host=args.host, port=args.port)
    meta = policy.get_server_metadata()
    want_meta = json.loads(args.metadata)
    if meta != want_meta:
        sys.exit(f"metadata on connect: got {meta!r}, expected {want_meta!r}")

    summary = []
    for i in range(args.frames):
        obs = make(i)
        with open(os.path.join(args.out, f"frame{i}.msgpack"), "wb") as f:
            f.write(msgpack_numpy.packb(obs))
        result = policy.infer(obs)
        actions = result.get("actions")
        if not isinstance(actions, np.ndarray):
            sys.exit(f"frame {i}: `actions` is {type(actions).__name__}, not a numpy array")
        if actions.shape != (args.horizon, dims) or actions.dtype != np.float64:
            sys.exit(f"frame {i}: actions {actions.dtype} {actions.shape}, expected float64 ({args.horizon}, {dims})")
        if not np.all(np.isfinite(actions)):
            sys.exit(f"frame {i}: non-finite actions")
        for key in ("policy_timing", "server_timing"):
            t = result.get(key)
            if not isinstance(t, dict) or not isinstance(t.get("infer_ms"), float) or t["infer_ms"] < 0:
                sys.exit(f"frame {i}: `{key}` is {t!r}, expected a map with infer_ms")
        if i > 0 and "prev_total_ms" not in result["server_timing"]:
            sys.exit(f"frame {i}: server_timing has no prev_total_ms")
        np.save(os.path.join(args.out, f"frame{i}.actions.npy"), actions)
        summary.append({"frame": i, "keys": sorted(result), "server_timing": result["server_timing"], "policy_timing": result["policy_timing"]})
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"metadata": meta, "frames": summary}, f, indent=1)
    print(f"{args.robot}: {args.frames} frames served by openpi-client's WebsocketClientPolicy, actions ({args.horizon}, {dims}) float64")


if __name__ == "__main__":
    main()
