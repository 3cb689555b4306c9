"""`nanoflow bench serve`: online latency through the OpenAI HTTP API (vLLM's `bench serve` shape).

Requests come from the same trace/const sampler as the offline bench (token-id prompts, forced output
lengths with ignore_eos), arrive as a Poisson process (gamma with `--burstiness`), and stream their tokens.
Per request: TTFT, TPOT, ITL, e2e and the paper's normalized latency (e2e / output tokens).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from nanoflow.bench.workloads import BenchRequest, sample_workload

_METRICS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"),
            ("normalized (e2e/token)", "normalized_ms"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="server base URL; several as 'label=URL,label=URL' run one after another (side by side)")
    p.add_argument("--model", default=None, help="the served model name (default: the server's first)")
    p.add_argument("--workload", default="sharegpt", help="splitwise | lmsys | sharegpt | const:IN/OUT")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson, <1 burstier")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--max-input", type=int, default=None)
    p.add_argument("--max-output", type=int, default=None)
    p.add_argument("--slo-normalized-ms", type=float, default=500.0, help="goodput SLO on e2e/output token")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="optional extra goodput SLO on TTFT")
    p.add_argument("--sweep", default=None, help="comma list of request rates; overrides --request-rate")
    p.add_argument("--plot", default=None, help="PNG of normalized latency vs request rate (with --sweep)")
    p.add_argument("--json", default=None, help="write all per-run summaries (and per-request data) here")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")


@dataclass
class RequestResult:
    ok: bool
    input_len: int
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


async def _send(client, url: str, model: str, req: BenchRequest) -> RequestResult:
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(False, req.input_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk, now = json.loads(line[6:]), time.perf_counter()
                if "error" in chunk:
                    res.error = chunk["error"].get("message")
                    return res
                if chunk.get("usage"):
                    res.output_len = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):  # one chunk per engine step with new tokens
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.output_len > 0
    except Exception as e:  # a client-side failure is a failed request, not a crashed benchmark
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(url: str, model: str, requests: list[BenchRequest], rate: float, burstiness: float,
                   seed: int, timeout: float) -> tuple[list[RequestResult], float]:
    import httpx
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks, start = [], time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(_send(client, url, model, req)))
            if rate != float("inf"):  # gamma inter-arrival with mean 1/rate (shape 1 = exponential)
                await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float, slo_norm_ms: float,
              slo_ttft_ms: float | None) -> dict:
    ok = [r for r in results if r.ok]
    per = {
        "ttft_ms": [1e3 * r.ttft for r in ok],
        "tpot_ms": [1e3 * (r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl_ms": [1e3 * x for r in ok for x in r.itl],
        "e2e_ms": [1e3 * r.e2e for r in ok],
        "normalized_ms": [1e3 * r.e2e / r.output_len for r in ok],
    }
    good = [r for r in ok if 1e3 * r.e2e / r.output_len <= slo_norm_ms
            and (slo_ttft_ms is None or 1e3 * r.ttft <= slo_ttft_ms)]
    out_tok, in_tok = sum(r.output_len for r in ok), sum(r.input_len for r in ok)
    stats = {k: _stats(v) for k, v in per.items()}
    return {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
            "input_tokens": in_tok, "output_tokens": out_tok, "requests_per_s": len(ok) / duration,
            "output_tokens_per_s": out_tok / duration, "total_tokens_per_s": (in_tok + out_tok) / duration,
            "goodput_requests_per_s": len(good) / duration, "slo_normalized_ms": slo_norm_ms,
            "slo_ttft_ms": slo_ttft_ms, "errors": sorted({r.error for r in results if r.error})[:5], **stats}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def print_report(s: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    for h in ("metric (ms)", "mean", "median", "p90", "p99"):
        t.add_column(h, justify="left" if h.startswith("metric") else "right")
    for name, key in _METRICS:
        st = s[key]
        t.add_row(name, *("-" if st[q] is None else f"{st[q]:.1f}" for q in ("mean", "median", "p90", "p99")))
    console = Console(width=max(Console().width, 120))
    console.print(t)
    slo = f"normalized <= {s['slo_normalized_ms']:.0f} ms" + (
        f", TTFT <= {s['slo_ttft_ms']:.0f} ms" if s["slo_ttft_ms"] else "")
    console.print(f"completed {s['completed']} (failed {s['failed']}) in {s['duration_s']:.1f} s | "
                  f"{s['requests_per_s']:.3f} req/s | output {s['output_tokens_per_s']:.1f} tok/s | "
                  f"total {s['total_tokens_per_s']:.1f} tok/s | goodput ({slo}) {s['goodput_requests_per_s']:.3f} req/s")
    for e in s["errors"]:
        console.print(f"[red]error:[/red] {e}")


def _servers(spec: str) -> list[tuple[str, str]]:
    out = []
    for part in [x.strip() for x in spec.split(",") if x.strip()]:
        label, _, url = part.rpartition("=") if "=" in part else ("", "", part)
        out.append((label or url, url.rstrip("/")))
    return out


def _server_info(url: str, model: str | None) -> tuple[str, dict]:
    import httpx
    cards = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    card = next((c for c in cards if c["id"] == model), cards[0]) if model else cards[0]
    return card["id"], card


def run(args: argparse.Namespace) -> int:
    rates = [float(x) for x in args.sweep.split(",")] if args.sweep else [args.request_rate]
    if any(r <= 0 for r in rates) or args.burstiness <= 0 or args.num_requests < 1:
        raise ValueError("request rates, --burstiness and --num-requests must be positive")
    runs = []
    for label, url in _servers(args.url):
        model, card = _server_info(url, args.model)

        def sample(seed: int) -> list[BenchRequest]:
            return sample_workload(args.workload, args.num_requests, seed, card.get("vocab_size", 32000),
                                   card["max_model_len"], args.max_input, args.max_output)
        asyncio.run(run_load(url, model, sample(args.workload_seed + 10_000)[:2], float("inf"), 1.0, 0,
                             args.timeout))  # warm-up
        for i, rate in enumerate(rates):
            # A fresh sample per rate (same for every server): earlier runs must not hit the prefix cache.
            requests = sample(args.workload_seed + i)
            results, duration = asyncio.run(run_load(url, model, requests, rate, args.burstiness,
                                                     args.workload_seed, args.timeout))
            s = summarize(results, duration, args.slo_normalized_ms, args.slo_ttft_ms)
            runs.append({"server": label, "url": url, "request_rate": rate, "burstiness": args.burstiness,
                         "workload": args.workload, "num_requests": len(requests), **s,
                         "requests": [asdict(r) for r in results]})
            print_report(s, f"{label}: {args.workload}, {len(requests)} requests at {rate:g} req/s")
    if args.plot:
        plot_sweep(runs, args.plot, args.workload)
    if args.json:
        from nanoflow.bench.report import write_json
        write_json(args.json, {"runs": runs})
    return 0


def plot_sweep(runs: list[dict], path: str, workload: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["server"] for r in runs):
        rs = sorted((r for r in runs if r["server"] == label), key=lambda r: r["request_rate"])
        xs = [r["request_rate"] for r in rs]
        ax.plot(xs, [r["normalized_ms"]["mean"] for r in rs], marker="o", label=f"{label} mean")
        ax.plot(xs, [r["normalized_ms"]["p90"] for r in rs], marker="x", linestyle="--", label=f"{label} p90")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (ms / output token)")
    ax.set_title(f"online latency, {workload}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import os
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
