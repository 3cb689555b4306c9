"""Soak the OpenAI server (not a test): minutes of mixed load with random client disconnects and bad
requests interleaved, then check: no 5xx, every completed greedy request's text equals the same request run
alone, the KV pool is back to full, and the server's memory (RSS) is stable.

    .venv/bin/python benchmarks/soak.py --duration 240 --clients 4 --json out/soak.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import psutil

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,", "Once upon a time,",
           "The best way to learn a language is", "Water boils at", "List three colors:", "import numpy as np\n",
           "My favourite food is", "In the beginning", "The quick brown fox", "Dear Sir or Madam,"]
BAD = [b"{not json", b"[]", b'{"prompt": 5}', b'{"prompt": ""}', b'{"prompt": "x", "max_tokens": -3}',
       b'{"prompt": "x", "temperature": "hot"}', b'{"prompt": "x", "model": "gpt-9"}', b'{"prompt": "x", "n": 0}',
       b'{"prompt": "x", "logprobs": 99}', b'{"prompt": [99999999]}', b'{"prompt": "x", "max_tokens": 1e40}',
       b'{"messages": []}', b'{"messages": [{"role": "wizard", "content": "x"}]}', b'{"prompt": [1] * 3}']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Soak:
    def __init__(self, url: str, args) -> None:
        self.url, self.args = url, args
        self.status: Counter = Counter()
        self.kinds: Counter = Counter()
        self.mismatches: list[dict] = []
        self.refs: dict[tuple[str, int], str] = {}
        self.lock = threading.Lock()

    @staticmethod
    def greedy_body(prompt: str) -> tuple[dict, tuple[str, int]]:
        max_tokens = 8 + 8 * (PROMPTS.index(prompt) % 3)  # fixed per prompt: one reference each
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, (prompt, max_tokens)

    def reference(self, client: httpx.Client) -> None:
        """Each greedy request run alone, before the load."""
        for prompt in PROMPTS:
            body, key = self.greedy_body(prompt)
            self.refs[key] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    def record(self, kind: str, status: int) -> None:
        with self.lock:
            self.status[status] += 1
            self.kinds[kind] += 1

    def one(self, client: httpx.Client, rng: random.Random) -> None:
        r = rng.random()
        if r < self.args.bad_prob:
            resp = client.post("/v1/completions" if b"prompt" in (raw := rng.choice(BAD)) else "/v1/chat/completions",
                               content=raw, headers={"content-type": "application/json"})
            return self.record("bad", resp.status_code)
        if r < self.args.bad_prob + self.args.disconnect_prob:
            return self.disconnect(client, rng)
        if r < 0.85:
            return self.greedy(client, rng, stream=rng.random() < 0.5)
        body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": 12, "n": 2,
                "temperature": 0.8, "seed": rng.randrange(1000), "logprobs": True, "top_logprobs": 2}
        self.record("chat-sampled", client.post("/v1/chat/completions", json=body).status_code)

    def greedy(self, client: httpx.Client, rng: random.Random, stream: bool) -> None:
        body, key = self.greedy_body(rng.choice(PROMPTS))
        if not stream:
            resp = client.post("/v1/completions", json=body)
            text = resp.json()["choices"][0]["text"] if resp.status_code == 200 else None
        else:
            text, code = "", None
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                code = resp.status_code
                for line in resp.iter_lines():
                    if line.startswith("data: {") and code == 200:
                        chunk = json.loads(line[6:])
                        text += "".join(c["text"] for c in chunk.get("choices", []))
            text = text if code == 200 else None
        self.record("greedy-stream" if stream else "greedy", resp.status_code)
        if text is not None and text != self.refs[key]:
            with self.lock:
                self.mismatches.append({"prompt": key[0], "got": text, "alone": self.refs[key]})

    def disconnect(self, client: httpx.Client, rng: random.Random) -> None:
        body = {"prompt": rng.choice(PROMPTS), "max_tokens": 200, "ignore_eos": True}
        if rng.random() < 0.5:
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                lines = resp.iter_lines()
                for _ in range(rng.randint(1, 4)):
                    next(lines, None)
            self.record("disconnect-stream", resp.status_code)
        else:
            try:
                client.post("/v1/completions", json=body, timeout=rng.uniform(0.2, 2.0))
                self.record("disconnect-late", 200)
            except httpx.TimeoutException:
                self.record("disconnect-timeout", 0)

    def worker(self, seed: int, stop_at: float) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=300) as client:
            while time.time() < stop_at:
                self.one(client, rng)


def metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^nanoflow:(\w+) ([0-9.e+-]+)$", text, re.M)}


def start_server(dtype: str, serve_args: str) -> tuple[str, subprocess.Popen]:
    """`nanoflow serve` with the default model on a free loopback port, in a subprocess (not waited for)."""
    port = free_port()
    cmd = [sys.executable, "-m", "nanoflow.cli", "serve", "--model", "default", "--dtype", dtype,
           "--port", str(port), "--log-level", "warning", *serve_args.split()]
    return f"http://127.0.0.1:{port}", subprocess.Popen(cmd)


def wait_ready(url: str, server: subprocess.Popen) -> None:
    """Until /health answers 200 (the server warms its kernels up before it listens)."""
    while True:
        if server.poll() is not None:
            raise SystemExit("server exited during start-up")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(1)


def wait_idle(url: str, timeout: float) -> dict:
    """Poll /metrics (bounded) until nothing runs and the KV pool is full; returns the last metrics."""
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        if (m["kv_cache_free_blocks"] == m["kv_cache_total_blocks"] and m["num_requests_running"] == 0
                and m.get("num_requests_waiting", 0) == 0) or time.time() > deadline:
            return m
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=240.0, help="seconds of load")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--bad-prob", type=float, default=0.15)
    ap.add_argument("--disconnect-prob", type=float, default=0.15)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--serve-args", default="--max-model-len 512 --max-waiting 64", help="extra `nanoflow serve` args")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    url, server = start_server(args.dtype, args.serve_args)
    try:
        return run(url, server, args)
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(url: str, server: subprocess.Popen, args) -> int:
    wait_ready(url, server)
    soak, proc = Soak(url, args), psutil.Process(server.pid)
    with httpx.Client(base_url=url, timeout=300) as client:
        soak.reference(client)
    rss_start = proc.memory_info().rss
    rss_samples = [rss_start]
    start = time.time()
    stop_at = start + args.duration
    threads = [threading.Thread(target=soak.worker, args=(i, stop_at)) for i in range(args.clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        rss_samples.append(proc.memory_info().rss)
    elapsed = time.time() - start
    m = wait_idle(url, 60)
    rss_end = proc.memory_info().rss
    fivexx = sum(n for s, n in soak.status.items() if s >= 500)
    report = {
        "duration_s": elapsed, "clients": args.clients, "requests": sum(soak.kinds.values()),
        "by_kind": dict(soak.kinds), "by_status": {str(k): v for k, v in sorted(soak.status.items())},
        "num_5xx": fivexx, "greedy_mismatches": len(soak.mismatches), "mismatch_examples": soak.mismatches[:3],
        "kv_free_blocks": m["kv_cache_free_blocks"], "kv_total_blocks": m["kv_cache_total_blocks"],
        "aborted": m.get("request_aborted_total"), "finished": m.get("request_success_total"),
        "preemptions": m.get("num_preemptions_total"), "generation_tokens": m.get("generation_tokens_total"),
        "rss_start_mb": rss_start / 2**20, "rss_end_mb": rss_end / 2**20, "rss_max_mb": max(rss_samples) / 2**20,
        "rss_every_minute_mb": [round(x / 2**20, 1) for x in rss_samples[::12]],
    }
    report["ok"] = (fivexx == 0 and not soak.mismatches
                    and report["kv_free_blocks"] == report["kv_total_blocks"])
    return write_report(report, args.json)


def write_report(report: dict, path: str | None) -> int:
    """Print the report, write it to `path` if given; the exit status says whether it is ok."""
    print(json.dumps(report, indent=2))
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
