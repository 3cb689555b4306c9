"""Fuzz the OpenAI server at volume (not a test): records the greedy answers of a fixed prompt
set, then sends N hypothesis-generated requests built from the server's own /openapi.json (raw httpx and the
openai client) while streaming clients disconnect at random points; every request has a client timeout (a hang).
Checks: 0 responses >= 500, 0 hangs, malformed error bodies / streams 0, KV pool back to full, greedy unchanged.

    .venv/bin/python benchmarks/fuzz_volume.py --requests 10000 --json out/fuzz_volume.json
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import sys
import threading
import time
from collections import Counter

import httpx
import openai
from hypothesis import HealthCheck, Phase, given, seed, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_schema import Case, cases  # noqa: E402
from soak import PROMPTS, start_server, wait_idle, wait_ready, write_report  # noqa: E402


class Fuzz:
    def __init__(self, url: str, hang_timeout: float = 120.0) -> None:
        self.url, self.hang_timeout = url, hang_timeout
        self.status: Counter = Counter()
        self.failures: Counter = Counter()  # hang, bad_body, bad_stream, conn
        self.examples: list[dict] = []
        self.lock = threading.Lock()
        self.done = threading.Event()

    def record(self, kind: str, status: int, failure: str | None = None, case: object = None) -> None:
        with self.lock:
            self.status[(kind, status)] += 1
            if failure:
                self.failures[failure] += 1
                if len(self.examples) < 10:
                    self.examples.append({"failure": failure, "status": status, "case": repr(case)[:400]})

    def greedy(self) -> list[str]:
        """The fixed prompt set, one at a time (so batch-mates cannot change the answers)."""
        with httpx.Client(base_url=self.url, timeout=self.hang_timeout) as c:
            return [c.post("/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0})
                    .json()["choices"][0]["text"] for p in PROMPTS]

    # ---- fuzzed requests ----
    def send_raw(self, c: httpx.Client, case: Case) -> None:
        headers = {"content-type": "application/json"}
        with c.stream(case.method, case.path, content=case.body, headers=headers) as r:
            body = r.read()
        failure = None
        if r.status_code >= 500:
            failure = "5xx"
        elif r.status_code >= 400 and case.path.startswith("/v1/"):
            err = json.loads(body).get("error", {})  # the OpenAI error body, code == status
            failure = None if err.get("message") and err.get("code") == r.status_code else "bad_body"
        elif r.headers.get("content-type", "").startswith("text/event-stream"):
            events = [ln[6:] for ln in body.decode().split("\n") if ln.startswith("data: ")]
            codes = [json.loads(e).get("error", {}).get("code", 200) for e in events[:-1]]
            failure = "bad_stream" if not events or events[-1] != "[DONE]" else ("5xx" if max(codes, default=0) >= 500
                                                                                  else None)
        self.record("raw", r.status_code, failure, case)

    def send_openai(self, oc: openai.OpenAI, case: Case, body: dict) -> None:
        chat = "chat" in case.path
        create = oc.chat.completions.create if chat else oc.completions.create
        key = "messages" if chat else "prompt"
        stream = body.pop("stream", False)
        args = {"model": body.pop("model", openai.NOT_GIVEN), key: body.pop(key, openai.NOT_GIVEN)}
        try:
            out = create(**args, stream=stream, extra_body=body)
            if stream is True:
                for _ in out:
                    pass
            self.record("openai", 200)
        except openai.APIStatusError as e:
            self.record("openai", e.status_code, "5xx" if e.status_code >= 500 else None, case)
        except openai.APIError as e:  # an SSE error event mid-stream: its code is in the body
            code = (e.body or {}).get("code", 0) if isinstance(e.body, dict) else 0
            self.record("openai-stream-error", code, "5xx" if code >= 500 else None, case)

    def worker(self, q: queue.Queue) -> None:
        with httpx.Client(base_url=self.url, timeout=self.hang_timeout) as c, \
                openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=self.hang_timeout) as oc:
            while (case := q.get()) is not None:
                try:
                    # NaN/Infinity are not JSON: only raw httpx sends those
                    plain = case.via_openai and case.body and b"NaN" not in case.body and b"Infinity" not in case.body
                    body = loads(case.body) if plain else None
                    if isinstance(body, dict) and body.get("stream", False) in (True, False):
                        self.send_openai(oc, case, body)
                    else:
                        self.send_raw(c, case)
                except (httpx.TimeoutException, openai.APITimeoutError):
                    self.record("timeout", 0, "hang", case)
                except (httpx.TransportError, openai.APIConnectionError) as e:
                    self.record("conn", 0, "conn", f"{case!r}: {e!r}")
                except Exception as e:  # e.g. an error body that is not JSON: a failure, and keep going
                    self.record("client", 0, "client_exception", f"{case!r}: {e!r}")

    # ---- streaming clients that hang up ----
    def disconnector(self, rng: random.Random) -> None:
        """Streams cut after a random number of events (0 = right after the headers), or non-streamed requests
        abandoned after a random fraction of a second; the server must abort them and free their KV blocks."""
        with httpx.Client(base_url=self.url, timeout=self.hang_timeout) as c:
            while not self.done.is_set():
                body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, 40), "ignore_eos": True,
                        "n": rng.choice([1, 1, 2]), "temperature": rng.choice([0, 0.8])}
                try:
                    if rng.random() < 0.7:
                        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                            lines = r.iter_lines()
                            for _ in range(rng.randint(0, 30)):
                                next(lines, None)
                        self.record("disconnect-stream", r.status_code, "5xx" if r.status_code >= 500 else None)
                    else:
                        try:
                            r = c.post("/v1/completions", json=body, timeout=rng.uniform(0.05, 1.5))
                            self.record("disconnect-late", r.status_code, "5xx" if r.status_code >= 500 else None)
                        except httpx.TimeoutException:
                            self.record("disconnect-cut", 0)
                except httpx.TimeoutException:
                    self.record("timeout", 0, "hang", body)
                except httpx.TransportError as e:
                    self.record("conn", 0, "conn", repr(e))

    def run(self, n: int, workers: int = 8, disconnectors: int = 2, seed_: int = 0,
            progress: bool = False, max_seconds: float = float("inf")) -> dict:
        """Send n fuzzed requests (fewer if max_seconds runs out first: the report says how many) with `workers`
        clients, `disconnectors` hang-up clients alongside."""
        refs = self.greedy()
        strategy = cases(httpx.get(self.url + "/openapi.json", timeout=30).json())
        q: queue.Queue = queue.Queue(maxsize=4 * workers)
        threads = [threading.Thread(target=self.worker, args=(q,)) for _ in range(workers)]
        threads += [threading.Thread(target=self.disconnector, args=(random.Random(seed_ + i),))
                    for i in range(disconnectors)]
        for t in threads:
            t.start()
        start = time.time()
        sent = produce(strategy, n, q, seed_, start, progress, start + max_seconds)
        for _ in range(workers):
            q.put(None)
        for t in threads[:workers]:
            t.join()
        self.done.set()
        for t in threads[workers:]:
            t.join()
        wall = time.time() - start
        m = wait_idle(self.url, 120)
        return self.report(refs, self.greedy(), m, sent, wall)

    def report(self, refs: list[str], after: list[str], m: dict, n: int, wall: float) -> dict:
        by_status = Counter()
        for (_, s), k in self.status.items():
            by_status[s] += k
        out = {"fuzzed_requests": n, "wall_s": round(wall, 1), "responses": sum(by_status.values()),
               "by_status": {str(k): v for k, v in sorted(by_status.items())},
               "by_kind": {f"{k}:{s}": v for (k, s), v in sorted(self.status.items())},
               "num_5xx": self.failures["5xx"],  # statuses >= 500 and SSE error events with such a code
               "hangs": self.failures["hang"], "failures": dict(self.failures), "examples": self.examples,
               "kv_free_blocks": m["kv_cache_free_blocks"], "kv_total_blocks": m["kv_cache_total_blocks"],
               "running_after": m["num_requests_running"], "aborted": m.get("request_aborted_total"),
               "greedy_changed": [p for p, a, b in zip(PROMPTS, refs, after) if a != b]}
        out["ok"] = (not self.failures and out["num_5xx"] == 0 and not out["greedy_changed"]
                     and out["kv_free_blocks"] == out["kv_total_blocks"] and out["running_after"] == 0)
        return out


def loads(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:  # raw garbage: sent as it is by httpx
        return None


def produce(strategy, n: int, q: queue.Queue, seed_: int, start: float, progress: bool, stop_at: float) -> int:
    """Hypothesis draws the cases (generate phase only: nothing fails inside, so no shrinking) into the queue;
    returns how many were sent."""
    sent = 0
    while sent < n and time.time() < stop_at:
        @seed(seed_ + sent)
        @settings(max_examples=n - sent, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def feed(case: Case) -> None:
            nonlocal sent
            if sent < n and time.time() < stop_at:  # past the deadline hypothesis just runs out its examples
                q.put(case)
                sent += 1
                if progress and sent % 500 == 0:
                    print(f"{sent} sent, {time.time() - start:.0f} s", flush=True)
        before = sent
        feed()
        if sent == before and time.time() < stop_at:
            raise RuntimeError("hypothesis generated no cases")
    return sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--max-seconds", type=float, default=float("inf"), help="stop sending after this long")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--disconnectors", type=int, default=2)
    ap.add_argument("--hang-timeout", type=float, default=120.0, help="client timeout; hitting it counts as a hang")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--serve-args", default="--max-model-len 64 --max-waiting 64", help="extra `nanoflow serve` args")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    url, server = start_server(args.dtype, args.serve_args)
    try:
        wait_ready(url, server)
        report = Fuzz(url, args.hang_timeout).run(args.requests, args.workers, args.disconnectors, args.seed, True,
                                                  args.max_seconds)
        report["server_alive"] = server.poll() is None
        report["ok"] = report["ok"] and report["server_alive"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    return write_report(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
