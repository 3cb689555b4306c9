"""Where the block manager puts a request's blocks: next to each other, so CPU decode attention reads long runs.
Placement never costs capacity: every free block stays usable whatever the layout."""
from hypothesis import given, settings, strategies as st

from nanoflow.engine.block_manager import MAX_GROWTH_ROOM, BlockManager
from nanoflow.engine.request import Request
from nanoflow.sampling_params import SamplingParams


def _req(prompt_len: int, max_tokens: int) -> Request:
    return Request(list(range(prompt_len)), SamplingParams(max_tokens=max_tokens))


def _admit(bm: BlockManager, req: Request) -> None:
    assert bm.allocate_with_prefix(req, [], 0, req.num_prompt_tokens)
    req.num_computed_tokens = req.num_prompt_tokens


def test_requests_grow_into_their_own_room():
    bm = BlockManager(num_blocks=64, block_size=4)
    a, b = _req(8, 8), _req(8, 8)  # 2 prompt blocks each, room for 2 more
    _admit(bm, a)
    _admit(bm, b)
    assert a.block_table == [0, 1] and b.block_table == [4, 5]  # b starts after a's room
    for _ in range(8):  # decode: one token per step each, interleaved
        for r in (a, b):
            assert bm.grow(r, 1)
            r.num_computed_tokens += 1
    assert a.block_table == [0, 1, 2, 3] and b.block_table == [4, 5, 6, 7]


def test_room_is_capped_and_growth_past_it_still_succeeds():
    bm = BlockManager(num_blocks=1000, block_size=1)
    a, b = _req(1, 10_000), _req(1, 1)
    _admit(bm, a)
    _admit(bm, b)
    assert b.block_table == [1 + MAX_GROWTH_ROOM]
    for _ in range(MAX_GROWTH_ROOM + 5):  # a runs into b: it continues wherever there is space
        assert bm.grow(a, 1)
        a.num_computed_tokens += 1
    assert a.block_table[:MAX_GROWTH_ROOM + 1] == list(range(MAX_GROWTH_ROOM + 1))
    assert len(set(a.block_table) | set(b.block_table)) == len(a.block_table) + len(b.block_table)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 60), st.booleans()), min_size=1, max_size=40))
def test_every_free_block_stays_usable(ops):
    """Admit, grow and free in any order: a request is refused only when the pool really lacks the blocks."""
    bm = BlockManager(num_blocks=48, block_size=4)
    live: list[Request] = []
    for prompt_len, max_tokens, finish_one in ops:
        if finish_one and live:
            bm.free(live.pop(0))
        req = _req(prompt_len, max_tokens)
        need, free_before = -(-prompt_len // 4), bm.num_free_blocks
        ok = bm.allocate_with_prefix(req, [], 0, prompt_len)
        assert ok == (need <= free_before)
        if ok:
            req.num_computed_tokens = prompt_len
            live.append(req)
        for r in live:  # every live request asks for one more block's worth of tokens
            need, free_before = bm.blocks_to_grow(r, 4), bm.num_free_blocks
            grew = bm.grow(r, 4)
            assert grew == (need <= free_before)
            if grew:
                r.num_computed_tokens += 4
        owned = [b for r in live for b in r.block_table]
        assert len(owned) == len(set(owned))
        bm.check_invariants()


def test_ablation_switch_interleaves():
    bm = BlockManager(num_blocks=64, block_size=4, contiguous=False)
    a, b = _req(8, 8), _req(8, 8)
    _admit(bm, a)
    _admit(bm, b)
    for r in (a, b):
        assert bm.grow(r, 1)
    assert a.block_table == [0, 1, 4] and b.block_table == [2, 3, 5]
