#!/usr/bin/env python3
"""The floor under any openpi server: answers each observation at once, with zero actions.

An openpi websocket server in the protocol openpi-client speaks (metadata on connect, then one
msgpack-numpy reply per observation, no compression), built on the same `websockets` package
as openpi's own server, that decodes each request and answers with zero actions
[horizon, dims] without running anything. `tools/openpi/bench.py` against it measures what
the Python client and the socket cost by themselves (its "added" column, the policy's time
being 0), the part of a served round trip that no server can remove.

Usage: echo_server.py --port P [--horizon 10] [--dims 7]
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
    args = ap.parse_args()
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
            ms = (time.perf_counter() - t0) * 1e3
            reply = {
                "actions": actions,
                "policy_timing": {"infer_ms": 0.0},
                "server_timing": {"infer_ms": ms},
            }
            ws.send(packer.pack(reply))

    with serve(handler, args.host, args.port, compression=None, max_size=None) as server:
        print(f"echo server on {args.host}:{args.port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
