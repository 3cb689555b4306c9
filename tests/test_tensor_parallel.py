"""Tensor parallelism over gloo with 2 ranks on this machine (rank 0 in this process, rank 1 a worker process):
greedy tokens equal one device's on the parity prompts (float32), under every executor, async scheduling, the
prefix cache and chunked prefill; a killed or hung worker is an error naming the rank, never a hang; the server
answers the openai client. The shard arithmetic is tested without processes."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import openai
import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.distributed.shard import TPShard, check_shardable
from nanoflow.models.config import PRESETS
from nanoflow.server.app import ServerThread, build_app
from tests.conftest import PROMPTS
from tests.helpers import TINY

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


# ---- shards, no processes ----
def test_uneven_kv_groups_split_by_whole_groups():
    cfg = PRESETS["smollm2-135m"]  # 9 query heads in 3 KV groups
    a, b = (TPShard.of(cfg, r, 2) for r in (0, 1))
    assert (a.kv_heads, a.q_heads, b.kv_heads, b.q_heads) == ((0, 2), (0, 6), (2, 3), (6, 9))
    assert a.intermediate == (0, 768) and b.intermediate == (768, 1536)
    assert a.vocab == (0, 24576) and b.vocab == (24576, 49152)
    assert a.local_config(cfg).num_heads == 6 and b.local_config(cfg).num_kv_heads == 1


def test_fewer_kv_heads_than_ranks_replicates_them():
    cfg = PRESETS["llama-2-70b"]  # 64 query heads, 8 KV heads
    shards = [TPShard.of(cfg, r, 16) for r in range(16)]
    assert [s.kv_heads for s in shards[:4]] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert shards[0].q_heads == (0, 4) and shards[1].q_heads == (4, 8)
    with pytest.raises(ValueError, match="cannot split 3 KV heads"):
        check_shardable(PRESETS["smollm2-135m"], 4)


@pytest.mark.parametrize("cfg", [TINY, replace(TINY, num_heads=6, num_kv_heads=3, head_dim=16)])
def test_shards_put_back_together_are_the_model(cfg):
    """Each rank holds exactly its cut of every parameter of the whole dummy model (fused q/k/v and gate/up
    cut part by part), the cuts cover each split parameter once, and the norms are replicated."""
    from nanoflow.models.loader import ModelSource, build_model
    whole = dict(build_model(ModelSource("dummy", "tiny"), cfg, torch.float32).named_parameters())
    ranks = [build_model(ModelSource("dummy", "tiny"), cfg, torch.float32, shard=TPShard.of(cfg, r, 2))
             for r in range(2)]
    for name, full in whole.items():
        pieces = [dict(m.named_parameters())[name] for m in ranks]
        assert all(torch.equal(p, m.shard.narrow(name, full, cfg)) for p, m in zip(pieces, ranks)), name
        if "norm" in name:
            assert all(torch.equal(p, full) for p in pieces), name
        else:
            assert sum(p.numel() for p in pieces) == full.numel(), name


# ---- two ranks ----
def _tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(llm_fp32):
    return _tokens(llm_fp32, PROMPTS)


@pytest.fixture
def tp_llm(request):
    llms = []

    def make(**kw):
        kw.setdefault("dtype", "float32")
        llms.append(LLM("default", tensor_parallel_size=2, **kw))
        return llms[-1]
    yield make
    for llm in llms:
        llm.engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["sequential", "nanobatch", "overlap"])
def test_tp2_greedy_equals_one_device(tp_llm, reference, executor):
    # dense_batch 64: the 8 prompts' prefills are chunked, and decode rows share steps with prefill chunks
    llm = tp_llm(executor=executor, dense_batch=64)
    assert _tokens(llm, PROMPTS) == reference


@pytest.mark.slow
def test_tp2_async_and_prefix_cache(tp_llm, reference):
    llm = tp_llm(async_scheduling=True, block_size=4)
    assert _tokens(llm, PROMPTS) == reference
    again = _tokens(llm, PROMPTS[:4])  # the prompts' KV blocks are cached on both ranks now
    assert again == reference[:4]
    assert llm.engine.scheduler.num_prefix_hit_tokens > 0


@pytest.mark.slow
def test_killed_worker_is_an_error_not_a_hang(tp_llm):
    llm = tp_llm(distributed_timeout_s=20)
    proc = llm.engine.tp_workers.procs[1]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    t0 = time.time()
    with pytest.raises(RuntimeError, match="rank 1"):
        llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert time.time() - t0 < 25
    assert not llm.engine.has_unfinished_requests()  # the interrupted requests were aborted, KV freed
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.scheduler.config.num_blocks


@pytest.mark.slow
def test_hung_worker_times_out(tp_llm):
    llm = tp_llm(distributed_timeout_s=4)
    proc = llm.engine.tp_workers.procs[1]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        with pytest.raises(RuntimeError, match="tensor-parallel step failed"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        assert time.time() - t0 < 30
    finally:
        os.kill(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_server_with_tp2_answers_the_openai_client(tp_llm, reference):
    llm = tp_llm()
    with ServerThread(build_app(llm.engine, ["default"])) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.completions.create(model="default", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert out.choices[0].text == llm.tokenizer.decode(reference[0])


@pytest.mark.slow
def test_profile_and_tune_time_the_all_reduces(monkeypatch, tmp_path):
    """Under TP the profiler times the all-reduces in a real 2-rank group (solo per row count, and beside a GEMM:
    the network R -> P table), and tune plans with them: its choice is predicted (running a candidate needs every
    rank) and stored where `--plan auto` of a TP engine finds it."""
    from nanoflow.flow.plan import validate
    from nanoflow.models.loader import ModelSource, build_model
    from nanoflow.autosearch.profile import load_or_profile
    from nanoflow.autosearch.search import tensor_parallel_plan_path, tune
    from nanoflow.kernels import cpu_ext
    cpu_ext.get()  # loaded from the usual cache dir first: the temporary one below would rebuild the kernels
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    cfg = TINY
    model = build_model(ModelSource("dummy", "tiny"), cfg, torch.float32, shard=TPShard.of(cfg, 0, 2))
    grid = dict(tile=32, min_time=0.002, window=0.02)
    prof, _ = load_or_profile(model, 64, **grid)
    assert set(prof.solo["attn_all_reduce"]["1.000"]) == {"32", "64"}
    assert "network" in prof.rp and any(c["other_kind"] == "network" for c in prof.coruns)
    plan, decision = tune(model, 64, time_limit=2, max_nano=2, **grid)
    assert "predicted from the profile" in decision
    validate(plan, model.operations())
    assert os.path.exists(tensor_parallel_plan_path(cfg, torch.float32, "cpu", 64, 2))
