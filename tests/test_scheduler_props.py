"""Property tests of the block manager and the dense-batch scheduler, driven without a model."""
from hypothesis import given, settings, strategies as st

from nanoflow.engine.request import Request
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig
from nanoflow.sampling_params import SamplingParams
from tests.helpers import drive_scheduler

request_st = st.tuples(st.integers(1, 70), st.integers(1, 40))  # (prompt tokens, max_tokens)


def _check_batch(sched: Scheduler, batch) -> None:
    """Beside drive_scheduler's checks: the sequence limit holds and every scheduled token has a KV slot."""
    cfg = sched.config
    assert len(sched.running) <= cfg.max_num_seqs
    for c in batch.chunks:
        assert c.req.num_computed_tokens <= len(c.req.block_table) * cfg.block_size, "KV slots missing"


@settings(max_examples=120, deadline=None)
@given(reqs=st.lists(request_st, min_size=1, max_size=25), dense_batch=st.integers(1, 96),
       num_blocks=st.integers(8, 40), block_size=st.sampled_from([1, 4, 16]), max_num_seqs=st.integers(1, 16),
       admission=st.booleans(), abort_every=st.sampled_from([0, 0, 7]))
def test_every_request_finishes_and_no_block_leaks(reqs, dense_batch, num_blocks, block_size, max_num_seqs,
                                                   admission, abort_every):
    cfg = SchedulerConfig(dense_batch=dense_batch, max_num_seqs=max_num_seqs, max_model_len=110,
                          block_size=block_size, num_blocks=num_blocks, admission_control=admission)
    sched = Scheduler(cfg)
    pending = []
    for prompt, max_tokens in reqs:
        r = Request([1] * prompt, SamplingParams(max_tokens=max_tokens))
        try:
            sched.check_fits(r)
        except ValueError:
            continue  # too big for this pool: rejected up front, never queued
        pending.append(r)
    expected = {r.request_id for r in pending}
    finished = drive_scheduler(sched, pending, on_batch=lambda b: _check_batch(sched, b), abort_every=abort_every)
    assert {r.request_id for r in finished} == expected
    for r in finished:
        if r.finish_reason == "length":
            assert len(r.output_token_ids) == r.params.max_tokens
    assert sched.block_manager.num_free_blocks == num_blocks
    assert all(rc == 0 for rc in sched.block_manager.ref_counts)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 30)), max_size=60))
def test_block_manager_grow_free(ops):
    from nanoflow.engine.block_manager import BlockManager
    bm = BlockManager(num_blocks=20, block_size=4)
    reqs = [Request([1], SamplingParams()) for _ in range(6)]
    for who, n in ops:
        r = reqs[who]
        if n % 5 == 0:
            bm.free(r)
            r.num_computed_tokens = 0
        else:
            before = list(r.block_table)
            if bm.grow(r, n):
                r.num_computed_tokens += n
                assert len(r.block_table) * 4 >= r.num_computed_tokens
            else:
                assert r.block_table == before  # a failed grow changes nothing
        bm.check_invariants()
        owned = [b for q in reqs for b in q.block_table]
        assert len(owned) == len(set(owned)), "a block has two owners"
        assert len(owned) + bm.num_free_blocks == 20
    for r in reqs:
        bm.free(r)
    assert bm.num_free_blocks == 20


def test_too_long_request_rejected():
    sched = Scheduler(SchedulerConfig(max_model_len=100, num_blocks=4, block_size=16))
    import pytest
    with pytest.raises(ValueError, match="context length"):
        sched.add(Request([1] * 90, SamplingParams(max_tokens=20)))
    with pytest.raises(ValueError, match="KV cache"):
        sched.add(Request([1] * 60, SamplingParams(max_tokens=20)))
