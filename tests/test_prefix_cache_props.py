"""Property tests of prefix caching and the KV tier protocol in the scheduler, driven without a model.

A "shadow KV" stands in for the cache: every slot records which token sequence its KV was computed from.
Each scheduled chunk checks that all KV it attends to (its cached prefix, reused or reloaded) holds exactly
its own earlier tokens, so a wrong hit, a block overwritten while shared, or an unpinned offload shows up.
"""
from collections import OrderedDict

from hypothesis import event, given, settings, strategies as st

from nanoflow.engine.request import Request
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig
from nanoflow.sampling_params import SamplingParams
from tests.helpers import drive_scheduler


class FakeTiers:
    """The scheduler-facing protocol of kv_tiers.KVTiers over the shadow KV; copies land one step late."""

    def __init__(self, shadow: dict, block_size: int, capacity: int, drop_every: int) -> None:
        self.shadow, self.bs, self.capacity, self.drop_every = shadow, block_size, capacity, drop_every
        self.store: OrderedDict = OrderedDict()
        self.pending: list = []
        self.fetches = 0

    def wants(self, h):
        return h not in self.store and all(h != p for p, _ in self.pending)

    def offload(self, pairs):
        self.pending += pairs

    def store_now(self, pairs):  # preemption swap-out: copied at once
        for h, b in pairs:
            self.store[h] = [self.shadow.get(b * self.bs + i) for i in range(self.bs)]

    def completed(self, wait=False):
        done, self.pending = self.pending, []
        for h, b in done:  # the copy reads the block now: it must still hold what it held when pinned
            self.store[h] = [self.shadow.get(b * self.bs + i) for i in range(self.bs)]
            while len(self.store) > self.capacity:
                self.store.popitem(last=False)
        return [b for _, b in done]

    def count_prefix(self, hashes):
        n = 0
        while n < len(hashes) and hashes[n] in self.store:
            n += 1
        return n

    def fetch(self, hashes):
        self.fetches += 1
        n = self.count_prefix(hashes)
        if self.drop_every and self.fetches % self.drop_every == 0:
            n //= 2  # a corrupt/vanished block: fewer than promised
        return [self.store[h] for h in hashes[:n]], n


def _key(req: Request, pos: int) -> int:
    return hash(tuple(req.all_token_ids[:pos + 1]))


def _run_chunk(sched: Scheduler, batch, shadow: dict) -> None:
    bs = sched.config.block_size
    for ids, staging in batch.kv_loads:
        for b, content in zip(ids, staging):
            for i, v in enumerate(content):
                shadow[b * bs + i] = v
    for c in batch.chunks:
        req, table = c.req, c.req.block_table
        for p in range(c.start):
            assert shadow.get(table[p // bs] * bs + p % bs) == _key(req, p), "attended KV is not this prefix"
        for p in range(c.start, c.start + c.num_tokens):
            shadow[table[p // bs] * bs + p % bs] = _key(req, p)


def _maybe_add(sched: Scheduler, pending: list[Request], req: Request) -> None:
    try:
        sched.check_fits(req)
    except ValueError:
        return  # too big for this pool: rejected up front, never queued
    pending.insert(0, req)


def _follow_up(sched: Scheduler, pending: list[Request], req: Request, finished: list[Request]) -> None:
    """Every other finished request comes back as the next round of its conversation."""
    if len(finished) % 2:
        _maybe_add(sched, pending, Request(req.all_token_ids + [9, 9, 9], SamplingParams(max_tokens=4)))


@settings(max_examples=150, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 40), st.integers(1, 20)), min_size=4, max_size=20),
       dense_batch=st.integers(1, 64), num_blocks=st.integers(6, 40), block_size=st.sampled_from([1, 2, 4, 16]),
       max_num_seqs=st.integers(1, 8), admission=st.booleans(), tiers=st.sampled_from([0, 0, 3, 50]),
       drop_every=st.sampled_from([0, 3]), follow_up=st.booleans())
def test_prefix_cache_reuses_only_matching_kv_and_never_leaks(reqs, dense_batch, num_blocks, block_size,
                                                               max_num_seqs, admission, tiers, drop_every,
                                                               follow_up):
    cfg = SchedulerConfig(dense_batch=dense_batch, max_num_seqs=max_num_seqs, max_model_len=110,
                          block_size=block_size, num_blocks=num_blocks, admission_control=admission,
                          prefix_caching=True)
    sched, shadow = Scheduler(cfg), {}
    if tiers:
        sched.kv_tiers = FakeTiers(shadow, block_size, tiers, drop_every)
    prefixes = [[1] * 30, [1] * 12 + [2] * 18, [3] * 7]  # shared, partly shared and short prefixes
    pending = []
    for which, suffix, max_tokens in reqs:
        _maybe_add(sched, pending, Request(prefixes[which] + list(range(4, 4 + suffix)),
                                           SamplingParams(max_tokens=max_tokens)))
    expected = {r.request_id for r in pending}
    finished = drive_scheduler(
        sched, pending, next_token=lambda r: _key(r, r.num_tokens - 1) % 3,  # a deterministic "greedy" token
        on_batch=lambda batch: _run_chunk(sched, batch, shadow),
        on_finish=(lambda r, done: _follow_up(sched, pending, r, done)) if follow_up else None, max_steps=6000)
    assert expected <= {r.request_id for r in finished}
    for r in finished:
        assert len(r.output_token_ids) == r.params.max_tokens
    event(f"device hits: {sched.num_prefix_hit_tokens > 0}, tier hits: {sched.num_tier_hit_tokens > 0}, "
          f"preempted: {sched.num_preemptions > 0}")
    bm = sched.block_manager
    if sched.kv_tiers is not None:
        for b in sched.kv_tiers.completed():  # pins of the last offloads
            bm.release(b)
    bm.check_invariants()
    assert bm.num_free_blocks == num_blocks, "a block leaked"
    assert all(rc == 0 for rc in bm.ref_counts)
    assert bm.num_evictable_blocks == bm.num_cached_blocks  # idle: every cached block is evictable


def test_hits_are_counted_and_never_cover_the_whole_prompt():
    sched = Scheduler(SchedulerConfig(dense_batch=64, block_size=4, num_blocks=32, prefix_caching=True))
    a = Request([5] * 16, SamplingParams(max_tokens=1))
    sched.add(a)
    sched.schedule()
    a.output_token_ids.append(1)
    sched.finish(a, "length")
    sched.free_kv(a)
    b = Request([5] * 16, SamplingParams(max_tokens=1))  # same prompt: 3 blocks reused, the last recomputed
    sched.add(b)
    batch = sched.schedule()
    assert batch.prefills[0].start == 12 and batch.prefills[0].num_tokens == 4
    assert sched.num_prefix_hit_tokens == 12


def test_no_prefix_cache_switch():
    sched = Scheduler(SchedulerConfig(dense_batch=64, block_size=4, num_blocks=32, prefix_caching=False))
    for _ in range(2):
        r = Request([5] * 16, SamplingParams(max_tokens=1))
        sched.add(r)
        batch = sched.schedule()
        assert batch.prefills[0].start == 0
        r.output_token_ids.append(1)
        sched.finish(r, "length")
        sched.free_kv(r)
    assert sched.num_prefix_hit_tokens == 0 and sched.block_manager.num_cached_blocks == 0


def test_eviction_is_lru_and_drops_the_hash():
    from nanoflow.engine.block_manager import BlockManager
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    reqs = []
    for t in range(2):
        r = Request([t] * 4 + [7], SamplingParams(max_tokens=1))
        assert bm.allocate_with_prefix(r, bm.match_prefix(r), 0, 4)
        r.num_computed_tokens = 4
        bm.free(r)  # 2 cached blocks each, evictable
        reqs.append(r)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 4
    new = Request([9] * 2, SamplingParams(max_tokens=1))
    assert bm.grow(new, 2)  # free list empty: evicts the LRU block (request 0's tail)
    assert bm.num_cached_blocks == 3
    assert len(bm.match_prefix(Request([0] * 4 + [7], SamplingParams()))) == 1  # its head survives
    assert len(bm.match_prefix(Request([1] * 4 + [7], SamplingParams()))) == 2
    bm.check_invariants()
