"""`nanoflow run-batch` end to end on a large synthetic OpenAI batch file: time to the first result, max RSS
(the runner and its children, sampled), wall time; optionally SIGTERM mid-job and resume, then check that every
custom_id is answered exactly once.

    .venv/bin/python benchmarks/run_batch_scale.py --lines 100000 --interrupt-at 30000 -- --max-num-seqs 256

Arguments after `--` go to run-batch (engine options). The input and output live in --workdir (not committed).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

TOPICS = ["the sky", "a lemon", "grass", "the sea", "snow", "coal", "a tomato", "a violet"]


def write_input(path: Path, lines: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(lines):
            if i % 2:
                body = {"prompt": f"Item {i}: the colour of {TOPICS[i % 8]} is", "max_tokens": max_tokens,
                        "temperature": 0}
                url = "/v1/completions"
            else:
                body = {"messages": [{"role": "user", "content": f"#{i} Colour of {TOPICS[i % 8]}?"}],
                        "max_tokens": max_tokens, "temperature": 0}
                url = "/v1/chat/completions"
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}) + "\n")


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def run_once(inp: Path, out: Path, extra: list[str], interrupt_at: int | None, lines: int) -> dict:
    cmd = [sys.executable, "-m", "nanoflow.cli", "run-batch", "-i", str(inp), "-o", str(out), "--no-progress",
           *extra]
    start, first, peak, before = time.perf_counter(), None, 0, count_lines(out)
    proc = subprocess.Popen(cmd)
    ps = psutil.Process(proc.pid)
    interrupted, samples = False, []
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
        except psutil.Error:
            continue
        peak = max(peak, rss)
        n = count_lines(out) - before
        if n >= len(samples) * lines // 10 and len(samples) <= 10:  # RSS at each tenth of the job: flat?
            samples.append((n, round(rss / 2**20)))
        if first is None and n > 0:
            first = time.perf_counter() - start
        if interrupt_at and not interrupted and n >= interrupt_at:
            proc.send_signal(signal.SIGTERM)
            interrupted = True
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": time.perf_counter() - start,
            "first_result_s": first, "max_rss_mib": peak / 2**20, "lines_written": count_lines(out) - before,
            "interrupted": interrupted, "rss_mib_by_results": samples}


def check(out: Path, lines: int) -> dict:
    ids = [json.loads(line)["custom_id"] for line in open(out)]
    ok = sum(1 for line in open(out) if json.loads(line)["response"]["status_code"] == 200)
    return {"records": len(ids), "unique_ids": len(set(ids)), "all_answered_once": sorted(set(ids)) == sorted(ids)
            and len(ids) == lines, "status_200": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--interrupt-at", type=int, default=None, help="SIGTERM after this many results, then resume")
    ap.add_argument("--workdir", default="/tmp/nanoflow-run-batch-scale")
    ap.add_argument("extra", nargs="*", help="run-batch options (after --)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inp, out = work / "requests.jsonl", work / "results.jsonl"
    write_input(inp, args.lines, args.max_tokens)
    out.unlink(missing_ok=True)
    print(f"input: {args.lines} lines, {inp.stat().st_size / 2**20:.1f} MiB", flush=True)
    print(json.dumps(run_once(inp, out, args.extra, args.interrupt_at, args.lines)), flush=True)
    if args.interrupt_at:  # (each run's numbers print as it ends: a long resume keeps what the first measured)
        print(json.dumps(run_once(inp, out, args.extra, None, args.lines)), flush=True)
    print(json.dumps(check(out, args.lines)), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
