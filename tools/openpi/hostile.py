#!/usr/bin/env python3
"""Malformed and hostile requests against a turbo-pi openpi server (LIBERO format), while a
well-formed openpi-client keeps being served.

Every bad request is sent on its own raw websocket connection and must get the documented
answer: one text frame naming the problem, then the connection closed with code 1011. Meanwhile
a WebsocketClientPolicy client sends observations without pause on one connection, which must
stay open and get actions throughout; several clients at once must all be served; and
`GET /healthz` must answer `OK`. Writes a JSON report to --report and exits non-zero with a
message on any failure.

Usage: hostile.py --port P --horizon H --max-message-mb M --report FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request

import msgpack
import numpy as np
from openpi_client import msgpack_numpy
from openpi_client import websocket_client_policy
import websockets.exceptions
import websockets.sync.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import observations  # noqa: E402


def good(i: int = 0) -> dict:
    obs = observations.libero(i)
    obs.pop("tokenized_prompt", None)
    obs.pop("tokenized_prompt_mask", None)
    obs["prompt"] = "pick up the bowl"
    return obs


def without(key: str) -> dict:
    obs = good()
    del obs[key]
    return obs


def with_(key: str, value) -> dict:
    obs = good()
    obs[key] = value
    return obs


def cases(max_bytes: int) -> list[tuple[str, object, str]]:
    """(name, message: bytes or str, text the error must contain)."""
    pack = msgpack_numpy.packb
    valid = pack(good())
    lying_bin = {b"__ndarray__": True, b"data": b"\x00" * 100, b"dtype": "|u1", b"shape": (224, 224, 3)}
    deep = b"\x91" * 200 + b"\xc0"
    return [
        ("malformed msgpack", b"\xc1\x00\x01garbage", "malformed msgpack"),
        ("truncated msgpack", valid[: len(valid) // 2], "malformed msgpack"),
        ("trailing bytes", valid + b"\x00", "left over"),
        ("lying array length", b"\xdd\xff\xff\xff\xff\x01", "elements declared"),
        ("deep nesting", deep, "nested deeper"),
        ("not a map", pack([1, 2, 3]), "expected the observation as a map"),
        ("missing key", pack(without("observation/wrist_image")), "missing key `observation/wrist_image`"),
        ("missing state", pack(without("observation/state")), "missing key `observation/state`"),
        ("missing prompt", pack(without("prompt")), "missing key `prompt`"),
        ("image dtype", pack(with_("observation/image", np.zeros((224, 224, 3), np.int32))), "dtype <i4"),
        ("bool image", pack(with_("observation/image", np.zeros((224, 224, 3), bool))), "dtype |b1"),
        ("2-D image", pack(with_("observation/image", np.zeros((224, 224), np.uint8))), "found shape [224, 224]"),
        ("4 channels", pack(with_("observation/image", np.zeros((224, 224, 4), np.uint8))), "3 color channels"),
        ("empty image", pack(with_("observation/image", np.zeros((0, 224, 3), np.uint8))), "empty image"),
        ("image bytes short of its shape", msgpack.packb({**{k: v for k, v in good().items() if k != "observation/image"}, "observation/image": lying_bin}, default=msgpack_numpy.pack_array), "needs 150528 bytes"),
        ("state as text", pack(with_("observation/state", "up")), "`observation/state`"),
        ("non-finite state", pack(with_("observation/state", np.full(8, np.nan))), "non-finite"),
        ("state too long", pack(with_("observation/state", np.zeros(40))), "40 dims"),
        ("prompt of wrong type", pack(with_("prompt", 42)), "`prompt`"),
        ("token outside the vocabulary", pack({**without("prompt"), "tokenized_prompt": np.array([2, 100000], np.int64)}), "outside the model's vocabulary"),
        ("text frame", "hello", "expected a binary msgpack observation"),
        ("oversized message", pack(with_("observation/image", np.zeros((max_bytes // 3 + 1024, 1, 3), np.uint8))), "message too large"),
        ("oversized random message", pack(with_("observation/image", np.random.default_rng(5).integers(0, 256, (2 * max_bytes // 3, 1, 3), dtype=np.uint8))), "message too large"),
    ]


def expect_error(url: str, name: str, message, want: str) -> dict:
    with websockets.sync.client.connect(url, compression=None, max_size=None, open_timeout=30) as ws:
        meta = msgpack_numpy.unpackb(ws.recv(timeout=30))
        if not isinstance(meta, dict):
            raise AssertionError(f"{name}: metadata on connect is {meta!r}")
        ws.send(message)
        reply = ws.recv(timeout=60)
        if not isinstance(reply, str):
            raise AssertionError(f"{name}: expected an error text frame, got {type(reply).__name__} of {len(reply)} bytes")
        if want not in reply:
            raise AssertionError(f"{name}: error text {reply!r} does not contain {want!r}")
        try:
            extra = ws.recv(timeout=30)
            raise AssertionError(f"{name}: connection still open after the error (got {extra!r:.80})")
        except websockets.exceptions.ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else None
            if code != 1011:
                raise AssertionError(f"{name}: closed with code {code}, expected 1011") from None
    return {"case": name, "error": reply, "close_code": 1011}


class Steady(threading.Thread):
    """A well-formed openpi client sending observations back to back on one connection."""

    def __init__(self, port: int, horizon: int):
        super().__init__(daemon=True)
        self.policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
        self.horizon = horizon
        self.stop = threading.Event()
        self.served = 0
        self.error: str | None = None

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                a = self.policy.infer(good(i))["actions"]
                if a.shape != (self.horizon, 7) or not np.all(np.isfinite(a)):
                    self.error = f"bad actions {a.dtype} {a.shape}"
                    return
                self.served += 1
                i += 1
        except Exception as e:  # noqa: BLE001 - reported to the main thread
            self.error = f"{type(e).__name__}: {e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--horizon", type=int, required=True)
    ap.add_argument("--max-message-mb", type=int, required=True)
    ap.add_argument("--report", required=True)
    args = ap.parse_args()
    url = f"ws://127.0.0.1:{args.port}"
    report: dict = {}

    with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/healthz", timeout=30) as r:
        body = r.read().decode()
        if r.status != 200 or body != "OK\n":
            sys.exit(f"/healthz answered {r.status} {body!r}")
    report["healthz"] = body

    steady = Steady(args.port, args.horizon)
    steady.start()
    results = []
    failures = []
    for name, message, want in cases(args.max_message_mb << 20):
        before = steady.served
        try:
            results.append(expect_error(url, name, message, want))
        except Exception as e:  # noqa: BLE001 - collected and reported
            failures.append(f"{name}: {type(e).__name__}: {e}")
        results[-1:] and results[-1].setdefault("steady_served_during", steady.served - before)
    # The steady client kept being served across all of them.
    deadline = time.time() + 60
    target = steady.served + 2
    while steady.served < target and steady.error is None and time.time() < deadline:
        time.sleep(0.05)
    steady.stop.set()
    steady.join(timeout=120)
    if steady.error:
        failures.append(f"the well-formed client failed: {steady.error}")
    if steady.served < len(results) // 2:
        failures.append(f"the well-formed client got only {steady.served} answers during {len(results)} bad requests")
    report["steady_client_served"] = steady.served

    # Several clients at once, each on its own connection.
    errors: list[str] = []

    def client(k: int) -> None:
        try:
            p = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=args.port)
            for j in range(3):
                a = p.infer(good(k * 10 + j))["actions"]
                if a.shape != (args.horizon, 7):
                    errors.append(f"client {k}: shape {a.shape}")
        except Exception as e:  # noqa: BLE001 - collected and reported
            errors.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    failures += errors
    report["concurrent_clients"] = {"clients": 4, "requests_each": 3, "errors": errors}
    report["cases"] = results
    report["failures"] = failures
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1)
    if failures:
        sys.exit("\n".join(failures))
    print(f"{len(results)} bad requests answered with an error text and close 1011; the well-formed client got {steady.served} answers meanwhile; 4 concurrent clients served")


if __name__ == "__main__":
    main()
