#!/usr/bin/env python3
"""The floor under any openpi server: answers each observation at once, with zero actions.

An openpi websocket server in the protocol openpi-client speaks (metadata on connect, then one
msgpack-numpy reply per observation, no compression), built on the same `websockets` package
as openpi's own server, that decodes each request and answers with zero actions
[horizon, dims] without running anything. `tools/openpi/bench.py` against it measures what
the Python client and the socket cost by themselves (its "added" column, the policy's time
being 0), the part of a served round trip that no server can remove.

With --hold-ms H it holds each answer for H ms (a sleep, reported as the policy's time) as a
policy on a GPU would: the client and the server's threads then sit idle for that long
before each answer, as they do against a real policy, so that bench.py's "added" (round trip
minus the hold) includes what waking them costs on that host (deeper CPU sleep states after
longer idles), not only the socket's cost.

Usage: echo_server.py --port P [--horizon 10] [--dims 7] [--hold-ms 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from openpi_client import msgpack_numpy
from websockets.sync.server import serve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--dims", type=int, default=7)
    ap.add_argument("--hold-ms", type=float, default=0.0, help="hold each answer this long")
    args = ap.parse_args()
    if not 0.0 <= args.hold_ms <= 1000.0:
        ap.error(f"--hold-ms {args.hold_ms}: expected 0 to 1000")
    packer = msgpack_numpy.Packer()
    actions = np.zeros((args.horizon, args.dims), dtype=np.float64)

    def handler(ws) -> None:
        ws.send(packer.pack({"server": "echo"}))
        for message in ws:
            t0 = time.perf_counter()
            obs = msgpack_numpy.unpackb(message)
            if not isinstance(obs, dict):
                ws.close(1011, "expected a map")
                return
            held = 0.0
            if args.hold_ms > 0:
                h0 = time.perf_counter()
                time.sleep(args.hold_ms / 1e3)
                held = (time.perf_counter() - h0) * 1e3
            ms = (time.perf_counter() - t0) * 1e3
            reply = {
                "actions": actions,
                "policy_timing": {"infer_ms": held},
                "server_timing": {"infer_ms": ms},
            }
            ws.send(packer.pack(reply))

    with serve(handler, args.host, args.port, compression=None, max_size=None) as server:
        print(f"echo server on {args.host}:{args.port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
