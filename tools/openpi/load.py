#!/usr/bin/env python3
"""Load generator for a turbo-pi openpi server: N concurrent openpi-clients, each a closed
loop (send an observation, wait for its actions, send the next), for T seconds or F requests
each; optionally M more clients that send bad requests, each of which must be answered with
an error text and close code 1011 while the others keep being served.

Prints a table: clients, requests, requests/s, the batch sizes the policy ran them in (from
each answer's `policy_timing.batch_size`), and p50 / p99 round trip per client. With --out it
saves every request as the client packed it (OUT/c<client>_r<i>.msgpack), its actions
(.actions.npy) and, in OUT/requests.json, the frame seq (`server_timing.frame`) and batch size
of each, so that `turbopi infer --openpi` can reproduce every answer. With --report it writes
the numbers as JSON. Exits non-zero with a message on any failure.

Client c's request i is observation c * 1000 + i of tools/openpi/observations.py (different
images, states and prompts per client).

Usage: load.py --port P [--robot libero|droid] [--clients N] (--seconds T | --requests F)
               [--bad-clients M] [--horizon H] [--out DIR] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np
from openpi_client import msgpack_numpy
from openpi_client import websocket_client_policy
import websockets.exceptions
import websockets.sync.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import observations  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (as `turbopi bench` and `trace report` compute it)."""
    if not values:
        return float("nan")
    s = sorted(values)
    rank = max(1, min(len(s), int(np.ceil(q * len(s)))))
    return s[rank - 1]


class Client(threading.Thread):
    """One closed-loop WebsocketClientPolicy."""

    def __init__(self, index: int, args, start: threading.Barrier, deadline: list[float]):
        super().__init__(daemon=True)
        self.index, self.args, self.start_barrier, self.deadline = index, args, start, deadline
        self.records: list[dict] = []
        self.error: str | None = None

    def run(self) -> None:
        make, dims = observations.ROBOTS[self.args.robot]
        try:
            policy = websocket_client_policy.WebsocketClientPolicy(host=self.args.host, port=self.args.port)
            self.start_barrier.wait(timeout=120)
            i = 0
            while (self.args.requests is None or i < self.args.requests) and (self.args.seconds is None or time.monotonic() < self.deadline[0]):
                obs = make(self.index * 1000 + i)
                packed = msgpack_numpy.packb(obs)
                t0 = time.monotonic()
                result = policy.infer(obs)
                rtt = (time.monotonic() - t0) * 1e3
                actions = result.get("actions")
                if not isinstance(actions, np.ndarray) or actions.ndim != 2 or actions.shape[1] != dims:
                    raise AssertionError(f"request {i}: actions {getattr(actions, 'shape', actions)!r}, expected [H, {dims}]")
                if self.args.horizon and actions.shape[0] != self.args.horizon:
                    raise AssertionError(f"request {i}: horizon {actions.shape[0]}, expected {self.args.horizon}")
                if not np.all(np.isfinite(actions)):
                    raise AssertionError(f"request {i}: non-finite actions")
                batch = result.get("policy_timing", {}).get("batch_size")
                frame = result.get("server_timing", {}).get("frame")
                if not isinstance(batch, int) or batch < 1:
                    raise AssertionError(f"request {i}: policy_timing.batch_size is {batch!r}")
                record = {"client": self.index, "request": i, "frame": frame, "batch_size": batch, "rtt_ms": rtt}
                if self.args.out:
                    name = os.path.join(self.args.out, f"c{self.index}_r{i}")
                    with open(name + ".msgpack", "wb") as f:
                        f.write(packed)
                    np.save(name + ".actions.npy", actions)
                    record["file"] = os.path.basename(name)
                self.records.append(record)
                i += 1
        except Exception as e:  # noqa: BLE001 - reported with the client's number
            self.error = f"client {self.index}: {type(e).__name__}: {e}"
            try:
                self.start_barrier.abort()
            except threading.BrokenBarrierError:
                pass


class BadClient(threading.Thread):
    """Sends an observation without its first camera on a fresh connection, again and again:
    each must get one error text naming the missing key, then close code 1011."""

    def __init__(self, index: int, args, start: threading.Barrier, deadline: list[float], good: list[Client]):
        super().__init__(daemon=True)
        self.index, self.args, self.start_barrier, self.deadline, self.good = index, args, start, deadline, good
        self.failures = 0
        self.error: str | None = None

    def run(self) -> None:
        make, _ = observations.ROBOTS[self.args.robot]
        url = f"ws://{self.args.host}:{self.args.port}"
        try:
            self.start_barrier.wait(timeout=120)
            i = 0
            while True:
                if self.args.seconds is not None and time.monotonic() >= self.deadline[0]:
                    break
                # With a request count: as many bad requests, or until the good clients end.
                if self.args.requests is not None and (i >= self.args.requests or not any(c.is_alive() for c in self.good)):
                    break
                obs = make(self.index * 1000 + i)
                key = next(iter(obs))
                del obs[key]
                with websockets.sync.client.connect(url, compression=None, max_size=None, open_timeout=30) as ws:
                    msgpack_numpy.unpackb(ws.recv(timeout=30))
                    ws.send(msgpack_numpy.packb(obs))
                    reply = ws.recv(timeout=120)
                    want = f"missing key `{key}`"
                    if not isinstance(reply, str) or want not in reply:
                        raise AssertionError(f"bad request {i}: expected an error text with {want!r}, got {reply!r:.120}")
                    try:
                        extra = ws.recv(timeout=30)
                        raise AssertionError(f"bad request {i}: connection still open after the error ({extra!r:.80})")
                    except websockets.exceptions.ConnectionClosed as e:
                        code = e.rcvd.code if e.rcvd is not None else None
                        if code != 1011:
                            raise AssertionError(f"bad request {i}: closed with code {code}, expected 1011") from None
                self.failures += 1
                i += 1
        except Exception as e:  # noqa: BLE001
            self.error = f"bad client {self.index}: {type(e).__name__}: {e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--robot", default="libero", choices=sorted(observations.ROBOTS))
    ap.add_argument("--clients", type=int, default=4)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--seconds", type=float, help="run every client for this long")
    group.add_argument("--requests", type=int, help="requests per client")
    ap.add_argument("--bad-clients", type=int, default=0)
    ap.add_argument("--horizon", type=int, default=0, help="the action horizon to expect (0: any)")
    ap.add_argument("--out", help="save every request and its actions here")
    ap.add_argument("--report", help="write the numbers here as JSON")
    args = ap.parse_args()
    if args.clients < 1 or (args.requests is not None and args.requests < 1) or (args.seconds is not None and args.seconds <= 0):
        sys.exit("--clients, --requests and --seconds must be positive")
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    # The clock starts as the barrier releases every client (the barrier's action runs before
    # any of them goes on, so none reads an unset deadline).
    deadline = [0.0]
    began = [0.0]

    def go() -> None:
        began[0] = time.monotonic()
        deadline[0] = began[0] + (args.seconds or 0.0)

    start = threading.Barrier(args.clients + args.bad_clients + 1, action=go)
    good = [Client(c, args, start, deadline) for c in range(args.clients)]
    bad = [BadClient(args.clients + b, args, start, deadline, good) for b in range(args.bad_clients)]
    for t in good + bad:
        t.start()
    try:
        start.wait(timeout=180)
    except threading.BrokenBarrierError:
        pass
    for t in good + bad:
        t.join()
    elapsed = time.monotonic() - (began[0] or time.monotonic())

    errors = [t.error for t in good + bad if t.error]
    errors += [f"client {c.index}: no request answered" for c in good if not c.records and not c.error]
    records = [r for c in good for r in c.records]
    sizes: dict[int, int] = {}
    for r in records:
        sizes[r["batch_size"]] = sizes.get(r["batch_size"], 0) + 1
    seen = ", ".join(f"{b}: {n}" for b, n in sorted(sizes.items())) or "-"
    print(f"{'clients':>7}  {'requests':>8}  {'seconds':>7}  {'requests/s':>10}  batch sizes seen (size: requests)")
    rate = len(records) / elapsed if elapsed > 0 else float("nan")
    print(f"{args.clients:>7}  {len(records):>8}  {elapsed:>7.1f}  {rate:>10.1f}  {seen}")
    print(f"{'client':>7}  {'requests':>8}  {'p50 ms':>8}  {'p99 ms':>8}")
    per_client = []
    for c in good:
        rtts = [r["rtt_ms"] for r in c.records]
        per_client.append({"client": c.index, "requests": len(rtts), "p50_ms": percentile(rtts, 0.5), "p99_ms": percentile(rtts, 0.99)})
        print(f"{c.index:>7}  {len(rtts):>8}  {percentile(rtts, 0.5):>8.1f}  {percentile(rtts, 0.99):>8.1f}")
    if bad:
        print(f"bad requests answered with 1011: {sum(b.failures for b in bad)}")
    report = {
        "clients": args.clients,
        "requests": len(records),
        "seconds": elapsed,
        "requests_per_s": rate,
        "batch_sizes": {str(b): n for b, n in sorted(sizes.items())},
        "per_client": per_client,
        "bad_requests_failed": sum(b.failures for b in bad),
        "errors": errors,
    }
    if args.out:
        with open(os.path.join(args.out, "requests.json"), "w") as f:
            json.dump(records, f, indent=1)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    if errors:
        sys.exit("\n".join(errors))


if __name__ == "__main__":
    main()
