"""Prefix caching on the real default model: greedy outputs are identical with and without reuse."""
import pytest

from nanoflow import LLM, SamplingParams

pytestmark = pytest.mark.slow  # the default model

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SYSTEM = ("You are a careful assistant. Answer briefly and precisely, never make up facts, and say so when "
          "you do not know. ")
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?",
             "What is 2 + 2?"]


@pytest.fixture(scope="module")
def ref():
    return LLM("default", dtype="float32", block_size=8, prefix_caching=False)


@pytest.fixture(scope="module")
def llm():
    # A small pool (40 blocks x 8 tokens) so that later tests evict cached blocks.
    return LLM("default", dtype="float32", block_size=8, num_kv_blocks=40)


def greedy(llm, prompts, params=PARAMS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_idle_clean(llm):
    bm = llm.engine.scheduler.block_manager
    bm.check_invariants()
    assert all(rc == 0 for rc in bm.ref_counts), "a block is still referenced when idle"
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_evictable_blocks == bm.num_cached_blocks


def test_switch_off_never_reuses(ref):
    greedy(ref, [SYSTEM + QUESTIONS[0]] * 2)
    assert ref.engine.stats.prefix_hit_tokens == 0
    assert ref.engine.scheduler.block_manager.num_cached_blocks == 0


def test_shared_system_prompt_same_outputs(ref, llm):
    prompts = [SYSTEM + q for q in QUESTIONS]
    expect = greedy(ref, prompts)
    greedy(llm, prompts[:1])  # warms the cache with the system prompt
    hits = llm.engine.stats.prefix_hit_tokens
    assert greedy(llm, prompts) == expect
    n_sys = len(llm.encode(SYSTEM)) // 8 * 8
    assert llm.engine.stats.prefix_hit_tokens - hits >= len(prompts) * (n_sys - 8)
    assert_idle_clean(llm)


def test_partial_block_prefixes(ref, llm):
    """Prompts that share 0..23 tokens with a cached one: only whole blocks are reused, the rest recomputed."""
    base = llm.encode(SYSTEM + QUESTIONS[2])
    greedy(llm, [base])
    prompts = [base[:k] + llm.encode(" Tell me a story.") for k in (3, 8, 13, 16, 23)]
    prompts.append(base)  # the whole prompt cached: its last block is still computed for the logits
    before = llm.engine.stats.prefix_hit_tokens
    assert greedy(llm, prompts) == greedy(ref, prompts)
    assert llm.engine.stats.prefix_hit_tokens - before >= 0 + 8 + 8 + 16 + 16 + (len(base) - 1) // 8 * 8
    assert_idle_clean(llm)


def test_multiturn_history_is_reused(ref, llm):
    first = llm.encode(SYSTEM + "Count from one to five.")
    out = greedy(llm, [first])[0]
    second = first + out + llm.encode(" Now count backwards.")
    before = llm.engine.stats.prefix_hit_tokens
    assert greedy(llm, [second]) == greedy(ref, [second])
    # History = prompt + output; the output's last token has no KV yet (it was never fed back).
    assert llm.engine.stats.prefix_hit_tokens - before >= (len(first) + len(out) - 1) // 8 * 8


def test_concurrent_requests_share_blocks(ref, llm):
    """Requests running at the same time hold references on the same blocks (n>1 children too)."""
    prompts = [SYSTEM + "Describe a cat.", SYSTEM + "Describe a dog.", SYSTEM + "Describe a fish."]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2)
    expect = [[c.token_ids for c in o.outputs] for o in ref.generate(prompts, params, use_tqdm=False)]
    eng, bm = llm.engine, llm.engine.scheduler.block_manager
    bm.reset_prefix_cache()
    eng.add_request("c0", llm.encode(prompts[0]), SamplingParams(**_kw(params)))
    eng.step()  # c0's prompt blocks are computed; they join the cache before the next step
    for i in (1, 2):
        eng.add_request(f"c{i}", llm.encode(prompts[i]), SamplingParams(**_kw(params)))
    got, max_shared = {}, 1
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                got[o.request_id] = [c.token_ids for c in o.outputs]
        max_shared = max(max_shared, max(bm.ref_counts))
    assert [got[f"c{i}"] for i in range(3)] == expect
    assert max_shared >= 4, "the system prompt's blocks were never shared"
    assert_idle_clean(llm)


def test_eviction_under_pressure(ref, llm):
    """Five ~60-token prompts and their outputs overflow the 40-block pool: cached blocks are evicted
    (LRU), requests are admitted and preempted under pressure, and outputs stay identical."""
    prompts = [f"Story {i}: " + SYSTEM * 2 + QUESTIONS[i % 4] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expect = greedy(ref, prompts, params)
    assert greedy(llm, prompts, params) == expect
    assert greedy(llm, prompts[::-1], params) == expect[::-1]  # partly cached, partly evicted
    bm = llm.engine.scheduler.block_manager
    assert bm.num_cached_blocks <= bm.num_blocks
    assert_idle_clean(llm)


def test_abort_releases_references(llm):
    eng = llm.engine
    for i in range(2):
        eng.add_request(f"a{i}", llm.encode(SYSTEM + QUESTIONS[i]), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    for i in range(2):
        eng.abort_request(f"a{i}")
    while eng.has_unfinished_requests():  # (async scheduling: a step may still be in flight)
        eng.step()
    assert_idle_clean(llm)


def _kw(p: SamplingParams) -> dict:
    return dict(temperature=p.temperature, max_tokens=p.max_tokens, ignore_eos=p.ignore_eos, n=p.n)
