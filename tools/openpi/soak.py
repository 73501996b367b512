#!/usr/bin/env python3
"""A serving soak: several openpi clients, bad requests mixed in, and the policy process
paused and resumed at random moments, for a bounded time (LIBERO format).

Three kinds of threads run until --duration seconds have passed:
  * --clients well-formed clients, each an openpi-client `WebsocketClientPolicy` sending
    observations back to back (tools/openpi/observations.py's variants, plus pre-tokenized
    prompts that show the model no prompt token at all); every answer must be float64
    actions [horizon, 7], finite, with `policy_timing` and `server_timing`;
  * one hostile client sending tools/openpi/hostile.py's bad requests (malformed msgpack,
    missing keys, wrong image dtype, non-finite state, oversized, text frames, ...) in a
    seeded random order at random moments, each on its own raw websocket: every one must get
    one text frame starting `turbo-pi: ` that names the problem, then close code 1011;
  * with --pause-pid, an injector that stops that process (SIGSTOP) at random moments for
    0.1-1 s and resumes it (SIGCONT); it always resumes it before exiting.

Every random choice comes from --seed. The frame `seq` the server gives a request is not sent
back, but it is bounded: at least the number of answers received before the request was sent,
less than the number of requests sent before its answer came. A few requests of client 0
(preferring those that overlapped a pause) are saved as OUT/check<k>.msgpack, exactly as the
client packed them, with their actions (OUT/check<k>.actions.npy) and that seq window, for
`turbopi infer --openpi` to reproduce.

Prints a JSON summary on stdout; exits non-zero after it when anything failed.

Usage: soak.py --port P --horizon H --max-message-mb M --duration S --clients N --seed S
               [--pause-pid PID] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time

import numpy as np
from openpi_client import msgpack_numpy
from openpi_client import websocket_client_policy
import websockets.exceptions
import websockets.sync.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hostile  # noqa: E402
import observations  # noqa: E402

ERROR_PREFIX = "turbo-pi: "
CLOSE_INTERNAL_ERROR = 1011
ROBOT_DIMS = 7
CHECKED_FRAMES = 4


def good_observation(rng: random.Random, i: int) -> tuple[str, dict]:
    """(variant, observation): observations.libero's four variants, and pre-tokenized prompts
    whose mask shows the model no token (the images still show it something)."""
    r = rng.random()
    obs = observations.libero(i)
    if r < 0.08:
        obs.pop("prompt", None)
        obs["tokenized_prompt"] = np.array([2, 20, 9, 27], dtype=np.int32)
        obs["tokenized_prompt_mask"] = np.zeros(4, dtype=bool)
        return "prompt mask all false", obs
    if r < 0.12:
        obs.pop("prompt", None)
        obs["tokenized_prompt"] = np.zeros(0, dtype=np.int32)
        obs["tokenized_prompt_mask"] = np.zeros(0, dtype=bool)
        return "empty tokenized prompt", obs
    return ["prompt", "float CHW wrist image", "320x180 base image", "tokenized prompt"][i % 4], obs


def stats_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    ms = np.array(seconds) * 1e3
    return {
        "n": len(ms),
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
    }


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.deadline = time.monotonic() + args.duration
        self.lock = threading.Lock()
        # Good requests sent, and answers received (for the seq windows).
        self.sent = 0
        self.done = 0
        self.good_rtt: list[float] = []
        self.variants: dict[str, int] = {}
        self.bad_rtt: list[float] = []
        self.refused: dict[str, int] = {}
        self.bad_sent = 0
        self.cases = hostile.cases(args.max_message_mb << 20)
        self.failures: list[str] = []
        # (start, end) monotonic times of the pauses.
        self.pauses: list[tuple[float, float]] = []
        self.confirmed_stopped = 0
        # Client 0's requests: (packed observation, actions, seq_lo, seq_hi, t_send, t_recv).
        self.saved: list[tuple[bytes, np.ndarray, int, int, float, float]] = []

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)
        print(f"soak: {what}", file=sys.stderr)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    # A well-formed openpi client.
    def client(self, k: int) -> None:
        rng = random.Random(f"{self.args.seed}/client/{k}")
        policy = None
        i = 0
        while self.running():
            variant, obs = good_observation(rng, k * 100_000 + i)
            i += 1
            try:
                if policy is None:
                    policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=self.args.port)
                packed = msgpack_numpy.packb(obs) if k == 0 else b""
                with self.lock:
                    seq_lo = self.done
                    self.sent += 1
                t0 = time.monotonic()
                result = policy.infer(obs)
                t1 = time.monotonic()
                with self.lock:
                    self.done += 1
                    seq_hi = self.sent - 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                self.fail(f"client {k}, {variant} request {i - 1}: {type(e).__name__}: {e}")
                policy = None
                continue
            actions = result.get("actions")
            problem = None
            if not isinstance(actions, np.ndarray):
                problem = f"`actions` is {type(actions).__name__}"
            elif actions.shape != (self.args.horizon, ROBOT_DIMS) or actions.dtype != np.float64:
                problem = f"actions {actions.dtype} {actions.shape}, expected float64 ({self.args.horizon}, {ROBOT_DIMS})"
            elif not np.all(np.isfinite(actions)):
                problem = "non-finite actions"
            for key in ("policy_timing", "server_timing"):
                t = result.get(key)
                if not isinstance(t, dict) or not isinstance(t.get("infer_ms"), float):
                    problem = f"`{key}` is {t!r}"
            if problem:
                self.fail(f"client {k}, {variant} request {i - 1}: {problem}")
                continue
            with self.lock:
                self.good_rtt.append(t1 - t0)
                self.variants[variant] = self.variants.get(variant, 0) + 1
                if k == 0:
                    self.saved.append((packed, actions, seq_lo, seq_hi, t0, t1))

    # Bad requests, each on its own connection.
    def hostile(self) -> None:
        rng = random.Random(f"{self.args.seed}/hostile")
        url = f"ws://127.0.0.1:{self.args.port}"
        cases = self.cases
        order: list[int] = []
        while self.running():
            time.sleep(rng.uniform(0.05, 0.6))
            if not order:
                # Every case once per round, in a random order.
                order = list(range(len(cases)))
                rng.shuffle(order)
            name, message, want = cases[order.pop()]
            with self.lock:
                self.bad_sent += 1
            t0 = time.monotonic()
            try:
                self.expect_refusal(url, name, message, want)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                self.fail(f"bad request `{name}`: {type(e).__name__}: {e}")
                continue
            with self.lock:
                self.bad_rtt.append(time.monotonic() - t0)
                self.refused[name] = self.refused.get(name, 0) + 1

    def expect_refusal(self, url: str, name: str, message, want: str) -> None:
        with websockets.sync.client.connect(url, compression=None, max_size=None, open_timeout=30) as ws:
            meta = msgpack_numpy.unpackb(ws.recv(timeout=30))
            if not isinstance(meta, dict):
                raise AssertionError(f"metadata on connect is {meta!r}")
            ws.send(message)
            reply = ws.recv(timeout=60)
            if not isinstance(reply, str):
                raise AssertionError(f"expected an error text frame, got {type(reply).__name__} of {len(reply)} bytes")
            if not reply.startswith(ERROR_PREFIX) or want not in reply:
                raise AssertionError(f"error text {reply!r} does not start with {ERROR_PREFIX!r} and contain {want!r}")
            try:
                extra = ws.recv(timeout=30)
                raise AssertionError(f"connection still open after the error (got {extra!r:.80})")
            except websockets.exceptions.ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd is not None else None
                if code != CLOSE_INTERNAL_ERROR:
                    raise AssertionError(f"closed with code {code}, expected {CLOSE_INTERNAL_ERROR}") from None

    # SIGSTOP / SIGCONT of the policy process.
    def injector(self, pid: int) -> None:
        rng = random.Random(f"{self.args.seed}/pauses")
        try:
            while True:
                time.sleep(rng.uniform(0.2, 1.5))
                pause = rng.uniform(0.1, 1.0)
                if time.monotonic() + pause > self.deadline:
                    break
                t0 = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                try:
                    if process_state(pid) == "T":
                        with self.lock:
                            self.confirmed_stopped += 1
                    time.sleep(max(0.0, pause - (time.monotonic() - t0)))
                finally:
                    os.kill(pid, signal.SIGCONT)
                with self.lock:
                    self.pauses.append((t0, time.monotonic()))
        except Exception as e:  # noqa: BLE001 - reported
            self.fail(f"pause injector: {type(e).__name__}: {e}")
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                self.fail(f"the paused process {pid} is gone")

    def save_checked(self, out: str) -> list[dict]:
        """Up to CHECKED_FRAMES of client 0's requests, spread over the soak, those that
        overlapped a pause first."""
        def paused(s) -> bool:
            return any(a < s[5] and s[4] < b for a, b in self.pauses)

        during = [s for s in self.saved if paused(s)]
        picked = [during[j * len(during) // 2] for j in range(min(2, len(during)))]
        rest = [s for s in self.saved if all(s is not p for p in picked)]
        need = min(CHECKED_FRAMES - len(picked), len(rest))
        picked += [rest[j * len(rest) // need] for j in range(need)]
        os.makedirs(out, exist_ok=True)
        checked = []
        for k, s in enumerate(picked):
            packed, actions, lo, hi, _, _ = s
            obs = os.path.join(out, f"check{k}.msgpack")
            with open(obs, "wb") as f:
                f.write(packed)
            act = os.path.join(out, f"check{k}.actions.npy")
            np.save(act, actions)
            checked.append({"observation": obs, "actions": act, "seq_lo": lo, "seq_hi": hi, "during_pause": paused(s)})
        return checked


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (T: stopped), after a moment for the signal."""
    for _ in range(50):
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in "Tt":
            return "T"
        time.sleep(0.002)
    return state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--horizon", type=int, required=True)
    ap.add_argument("--max-message-mb", type=int, required=True)
    ap.add_argument("--duration", type=float, required=True, help="seconds of load")
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--pause-pid", type=int, help="the process to stop and resume (the policy node)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    soak = Soak(args)
    threads = [threading.Thread(target=soak.client, args=(k,), name=f"client {k}", daemon=True) for k in range(args.clients)]
    threads.append(threading.Thread(target=soak.hostile, name="hostile", daemon=True))
    if args.pause_pid:
        threads.append(threading.Thread(target=soak.injector, args=(args.pause_pid,), name="pauses", daemon=True))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    # A request still running at the deadline finishes (each waits at most the server's
    # REQUEST_TIMEOUT_S); a thread still running well after that is stuck.
    for t in threads:
        t.join(timeout=max(0.0, soak.deadline + 120 - time.monotonic()))
        if t.is_alive():
            soak.fail(f"thread {t.name} still running 120 s after the deadline")
    elapsed = time.monotonic() - t0
    pause_s = [b - a for a, b in soak.pauses]
    summary = {
        "seed": args.seed,
        "duration_s": args.duration,
        "elapsed_s": elapsed,
        "clients": args.clients,
        "good": {
            "sent": soak.sent,
            "answered": len(soak.good_rtt),
            "by_variant": soak.variants,
            "round_trip_ms": stats_ms(soak.good_rtt),
        },
        "bad": {
            "sent": soak.bad_sent,
            "refused": len(soak.bad_rtt),
            "by_reason": soak.refused,
            "cases": sorted(name for name, _, _ in soak.cases),
            "round_trip_ms": stats_ms(soak.bad_rtt),
        },
        "pauses": {
            "pid": args.pause_pid,
            "injected": len(soak.pauses),
            "confirmed_stopped": soak.confirmed_stopped,
            "total_s": sum(pause_s),
            "max_s": max(pause_s, default=0.0),
        },
        "checked": soak.save_checked(args.out),
        "failures": soak.failures,
    }
    print(json.dumps(summary, indent=1))
    if soak.failures:
        sys.exit(f"soak: {len(soak.failures)} failures")


if __name__ == "__main__":
    main()
