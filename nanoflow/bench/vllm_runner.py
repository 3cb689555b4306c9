"""vLLM peer, run as a script by the python of vLLM's own virtualenv (.venv-vllm): one engine, one token budget.

    .venv-vllm/bin/python nanoflow/bench/vllm_runner.py REQUESTS.json OUT.json

REQUESTS.json: {"model": HF dir, "dtype": "bfloat16"|"float32", "max_num_batched_tokens": int,
"max_num_seqs": int, "max_model_len": int, "requests": [{"prompt_token_ids": [...], "output_len": n}, ...]}.
OUT.json gets {"elapsed_s", "output_lens", "vllm_version", "startup_s"} of the timed ``generate`` over all
requests (greedy, EOS ignored, exactly output_len tokens each), run after a warm-up ``generate``.

This file must not import nanoflow: that package is not installed in vLLM's virtualenv. The CPU engine is
configured by the caller through VLLM_CPU_KVCACHE_SPACE and VLLM_CPU_OMP_THREADS_BIND. Everything runs under
``if __name__ == "__main__"``, because vLLM spawns worker processes that re-import this module.
"""
from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype=job["dtype"], max_num_batched_tokens=job["max_num_batched_tokens"],
              max_num_seqs=job["max_num_seqs"], max_model_len=job["max_model_len"], seed=0)
    reqs = job["requests"]
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r["output_len"]) for r in reqs]
    # Warm-up (untimed): a few short requests, so first-call allocation/compilation is not billed to the run.
    warm = [{"prompt_token_ids": r["prompt_token_ids"][:8]} for r in reqs[:4]]
    llm.generate(warm, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=2), use_tqdm=False)
    startup = time.perf_counter() - t0
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    result = {"elapsed_s": elapsed, "startup_s": startup, "vllm_version": vllm.__version__,
              "output_lens": [len(o.outputs[0].token_ids) for o in outs],
              "first_output_token_ids": list(outs[0].outputs[0].token_ids)}
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
