"""Asynchronous scheduling gives the same outputs as --no-async, token for token (default model, float32)."""
from collections import deque

import pytest
from hypothesis import given, settings, strategies as st

from nanoflow import LLM, SamplingParams
from nanoflow.config import EngineConfig, add_engine_arguments, engine_config_from_args
from nanoflow.engine.request import Request
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig

QUESTIONS = ["What is the capital of France?", "Say hi.", "What is 2+2?", "Name a color.",
             "Write a long story about a dragon.", "Who wrote Hamlet?"]
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Once upon a time, there was"]
KW = dict(dtype="float32", kv_cache_gb=0.25)  # a small KV pool: several engines live in this module


@pytest.fixture(scope="module")
def pair():
    """The same engine twice: async (the default on a GPU) and --no-async (the default on a CPU)."""
    return LLM("default", async_scheduling=True, **KW), LLM("default", async_scheduling=False, **KW)


def _run(llm, prompts, params, chat=False):
    outs = (llm.chat if chat else llm.generate)(prompts, params, use_tqdm=False)
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason, o.logprobs) for o in out.outputs] for out in outs]


def _same(pair, prompts, params, chat=False):
    asy, syn = pair
    assert asy.engine.config.async_scheduling and not syn.engine.config.async_scheduling
    a, s = _run(asy, prompts, params, chat), _run(syn, prompts, params, chat)
    assert a == s
    for llm in pair:  # every KV block came back, nothing left in flight
        bm = llm.engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished_requests()
    return a


@pytest.mark.slow
def test_greedy_batch_with_eos(pair):
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = _same(pair, convs, SamplingParams(temperature=0.0, max_tokens=40), chat=True)
    reasons = [o[0][2] for o in outs]
    assert "stop" in reasons and "length" in reasons  # some stop early on EOS while others go on
    assert all(len(o[0][0]) <= 40 for o in outs)


@pytest.mark.slow
def test_stop_strings_and_stop_token_ids(pair):
    asy, _ = pair
    greedy = _run(asy, PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    _same(pair, PROMPTS, SamplingParams(temperature=0.0, max_tokens=20, stop=["7", "\n", " the"]))
    _same(pair, PROMPTS, SamplingParams(temperature=0.0, max_tokens=20, stop="7", include_stop_str_in_output=True))
    stop_ids = [g[0][0][3] for g in greedy]
    outs = _same(pair, PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                stop_token_ids=stop_ids))
    assert all(o[0][2] == "stop" for o in outs)


@pytest.mark.slow
def test_max_tokens_never_overshoots(pair):
    """max_tokens is known ahead: no step is scheduled for a token that would be thrown away."""
    asy, _ = pair
    rows = []
    prepare = asy.engine.runner.prepare
    asy.engine.runner.prepare = lambda batch: rows.append(len((inp := prepare(batch)).sample_reqs)) or inp
    try:
        lens = [1, 2, 5, 9]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lens]
        outs = _same(pair, PROMPTS, params)
    finally:
        del asy.engine.runner.prepare
    assert [len(o[0][0]) for o in outs] == lens and all(o[0][2] == "length" for o in outs)
    assert sum(rows) == sum(lens)


@pytest.mark.slow
def test_n_seeds_temperature_logprobs(pair):
    p = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=11, max_tokens=10, logprobs=2)
    outs = _same(pair, PROMPTS[:3], p)
    assert len({tuple(c[0]) for c in outs[0]}) > 1  # the children really differ
    assert all(len(c[4]) == len(c[0]) for o in outs for c in o)


@pytest.mark.slow
def test_penalties(pair):
    for kw in ({"repetition_penalty": 1.5}, {"frequency_penalty": 1.2, "presence_penalty": 0.5}):
        _same(pair, PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, **kw))
        _same(pair, PROMPTS, SamplingParams(temperature=0.8, seed=5, max_tokens=16, ignore_eos=True, **kw))


@pytest.mark.slow
def test_chunked_prefill_small_dense_batch():
    pair = (LLM("default", dense_batch=7, async_scheduling=True, **KW),
            LLM("default", dense_batch=7, async_scheduling=False, **KW))
    prompts = PROMPTS + ["Explain in one paragraph why the sky is blue and why sunsets are red and orange."]
    _same(pair, prompts, SamplingParams(temperature=0.0, max_tokens=12))


@pytest.mark.slow
def test_preemption_same_tokens_and_no_leak():
    kw = dict(dtype="float32", num_kv_blocks=6, admission_control=False, dense_batch=64)
    pair = LLM("default", async_scheduling=True, **kw), LLM("default", async_scheduling=False, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=26, ignore_eos=True)  # 2 blocks each, 6 in the pool
    _same(pair, PROMPTS, params)
    assert all(llm.engine.scheduler.num_preemptions > 0 for llm in pair)


@pytest.mark.slow
def test_abort_mid_generation_frees_all_blocks(pair):
    eng = pair[0].engine
    bm = eng.scheduler.block_manager
    ids = [eng.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    for i, p in enumerate(ids):
        eng.add_request(f"abort-{i}", p, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, n=1 + i % 2))
    seen = {}
    for _ in range(6):
        for out in eng.step():
            seen[out.request_id] = out
    assert eng._in_flight, "a step is in flight while we abort"
    for i in range(0, len(ids), 2):
        eng.abort_request(f"abort-{i}")
    in_use = {b for r in eng.scheduler.running for b in r.block_table}  # (children may share prompt blocks)
    assert bm.num_free_blocks == bm.num_blocks - len(in_use)
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id in {f"abort-{i}" for i in range(1, len(ids), 2)}, "aborted request came back"
            seen[out.request_id] = out
    assert bm.num_free_blocks == bm.num_blocks
    assert all(len(c.token_ids) == 30 for i in (1, 3) for c in seen[f"abort-{i}"].outputs)


@pytest.mark.slow
def test_failed_step_raises_then_engine_recovers(pair):
    """A device error surfaces from step(); aborting then frees every block and the engine serves again."""
    eng = pair[0].engine
    bm, run, calls = eng.scheduler.block_manager, eng.runner.run, []

    def boom(inp):
        calls.append(inp.step_id)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return run(inp)
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"fail-{i}", eng.tokenizer.encode(p), SamplingParams(temperature=0.0, max_tokens=8))
    eng.runner.run = boom
    try:
        with pytest.raises(RuntimeError, match="boom"):
            for _ in range(10):
                eng.step()
    finally:
        del eng.runner.run
    for i in range(len(PROMPTS)):
        eng.abort_request(f"fail-{i}")
    while eng.has_unfinished_requests():
        try:
            eng.step()
        except (RuntimeError, AssertionError):
            pass
    assert bm.num_free_blocks == bm.num_blocks
    _same(pair, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6))


@pytest.mark.slow
def test_switch_and_stats(pair):
    parser = __import__("argparse").ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config_from_args(parser.parse_args(["--no-async"])).async_scheduling is False
    assert engine_config_from_args(parser.parse_args(["--async"])).async_scheduling is True
    assert EngineConfig(device="cpu").async_scheduling is False  # the CPU default: the step's threads are the device
    b = pair[0].engine.stats.breakdown()
    assert b["cpu_ms"] > 0 and b["device_ms"] > 0 and 0.0 <= b["device_idle_pct"] <= 100.0


# ---- the scheduler alone, driven the async way (tokens read back one step late) ----
@settings(max_examples=60, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(1, 50), st.integers(1, 30), st.integers(0, 40)), min_size=1, max_size=16),
       dense_batch=st.integers(1, 64), num_blocks=st.integers(8, 40), block_size=st.sampled_from([1, 4, 16]),
       max_num_seqs=st.integers(1, 12))
def test_scheduler_async_drive(reqs, dense_batch, num_blocks, block_size, max_num_seqs):
    """Launch step i+1 before reading step i back; a request may 'hit EOS' (stop_at) and finishes one step late.
    Every request finishes, no block leaks, and no request samples past max_tokens."""
    sched = Scheduler(SchedulerConfig(dense_batch=dense_batch, max_num_seqs=max_num_seqs, max_model_len=90,
                                      block_size=block_size, num_blocks=num_blocks, admission_control=False))
    pending = []
    for prompt, max_tokens, stop_at in reqs:
        r = Request([1] * prompt, SamplingParams(max_tokens=max_tokens))
        r.stop_at = stop_at
        if r.max_total_tokens <= 90 and -(-r.max_total_tokens // block_size) <= num_blocks:
            pending.append(r)
    flights, steps = deque(), 0  # (sampling requests, ids of all requests in the step, release after it)
    while pending or sched.has_unfinished() or flights:
        if pending:
            sched.add(pending.pop())
        batch = sched.schedule()
        if batch:
            sampling = [c.req for c in batch.chunks if c.samples]
            for r in sampling:
                r.num_output_placeholders += 1
            flights.append((sampling, {id(c.req) for c in batch.chunks}, []))
        if len(flights) > (1 if batch else 0):
            sampling, _, release = flights.popleft()
            for r in sampling:
                r.num_output_placeholders -= 1
                if r.is_finished:
                    continue
                r.output_token_ids.append(7)
                n = len(r.output_token_ids)
                assert n <= r.params.max_tokens, "sampled past max_tokens"
                if n >= r.params.max_tokens or n == r.stop_at:
                    holder = next((f for f in flights if id(r) in f[1]), None)
                    sched.finish(r, "length")
                    if holder is None:
                        sched.free_kv(r)
                    else:
                        holder[2].append(r)
            for r in release:
                sched.free_kv(r)
        sched.block_manager.check_invariants()
        steps += 1
        assert steps < 5000, "no progress"
    assert sched.block_manager.num_free_blocks == num_blocks


@pytest.mark.slow
def test_final_only_outputs_come_back_once(pair):
    """output_kind="final_only" (what LLM.generate asks for): a request's output comes back once, finished;
    "cumulative" (the server's streaming) gets one every step. Same tokens either way, async or not."""
    tokens = []
    for llm in pair:
        eng = llm.engine
        ids = eng.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
        for kind in ("final_only", "cumulative"):
            eng.add_request(kind, ids, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                      output_kind=kind))
        seen = {"final_only": [], "cumulative": []}
        while eng.has_unfinished_requests():
            for out in eng.step():
                seen[out.request_id].append(out)
        assert len(seen["final_only"]) == 1 and seen["final_only"][0].finished
        assert len(seen["cumulative"]) >= 10 and seen["cumulative"][-1].finished
        assert seen["final_only"][0].outputs[0].token_ids == seen["cumulative"][-1].outputs[0].token_ids
        tokens.append(seen["final_only"][0].outputs[0].token_ids)
    assert tokens[0] == tokens[1]
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")
