"""Data-parallel routing (pure Python): least outstanding work, with the held prefix discounted."""
from dataclasses import dataclass

from nanoflow.engine.dp_router import PrefixAffinityRouter, block_hashes, shared_blocks

BS = 16


@dataclass
class R:
    rank: int
    alive: bool = True
    load: int = 0


def prompt(prefix: int, suffix_seed: int, prefix_len: int = 640, suffix_len: int = 40) -> list[int]:
    return [1000 + prefix] * 8 + list(range(prefix_len - 8)) + [suffix_seed] * suffix_len


def send(router, replicas, ids, out=8):
    r, cost = router.pick(replicas, ids, len(ids) + out)
    r.load += cost
    return r, cost


def test_block_hashes_chain_and_shared_count():
    a, b = block_hashes(prompt(1, 5), BS), block_hashes(prompt(1, 6), BS)
    assert len(a) == (640 + 40) // BS
    assert shared_blocks(a, b) == 640 // BS  # the suffixes differ from the first block after the prefix
    assert shared_blocks(a, block_hashes(prompt(2, 5), BS)) == 0


def test_a_group_stays_on_its_replica_while_the_other_is_idle():
    """Grouped admission sends a whole group back to back: its followers cost their suffix only, so the
    group is not spilled onto the idle replica (which would compute the 640-token prefix again)."""
    router, reps = PrefixAffinityRouter(BS), [R(0), R(1)]
    first, cost = send(router, reps, prompt(1, 0))
    assert cost == 688
    placed = [send(router, reps, prompt(1, i)) for i in range(1, 12)]
    assert all(r is first for r, _ in placed)
    assert all(c == 688 - 640 for _, c in placed)
    other, cost = send(router, reps, prompt(2, 0))  # a new prefix goes to the least loaded
    assert other is not first and cost == 688


def test_spills_when_really_imbalanced_and_when_the_replica_died():
    router, reps = PrefixAffinityRouter(BS), [R(0), R(1)]
    fav, _ = send(router, reps, prompt(1, 0))
    fav.load += 50_000  # far ahead of the other
    r, cost = send(router, reps, prompt(1, 1))
    assert r is not fav and cost == 688  # a spill pays the whole prompt
    r2, _ = send(router, reps, prompt(1, 2))
    assert r2 is not fav  # the prefix stays with its first replica, which is still far ahead
    fav.load = 0
    reps[1].load = 60_000
    assert send(router, reps, prompt(1, 3))[0] is fav
    fav.alive = False
    r3, cost3 = send(router, reps, prompt(1, 4))
    assert r3 is reps[1] and cost3 == 688
