"""Host/disk KV tiers on the real default model: a finished conversation's KV is offloaded, reloaded instead
of recomputed (host tier, then disk tier in a new engine = a restart), and a corrupt or truncated disk file is
detected and ignored (recomputed). Greedy outputs never change."""
import torch
import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.engine.kv_disk import DiskTier
from nanoflow.engine.kv_tiers import KVTiers

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SYSTEM = ("You are a careful assistant. Answer briefly and precisely, never make up facts, and say so when "
          "you do not know. ")
# No shared-prefix grouping: the preemption test needs the requests admitted together (grouped, the first one's
# prefix would be cached before the others start and the pool would no longer overflow).
KW = dict(dtype="float32", block_size=8, num_kv_blocks=48, prefix_grouping=False)


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def llm(kv_dir):
    return LLM("default", host_kv_cache_gb=0.05, disk_kv_cache_gb=0.05, kv_cache_dir=str(kv_dir), **KW)


@pytest.fixture(scope="module")
def conversation(llm):
    """Round 1 (offloaded when it finishes), round 2's prompt extending it, and round 2's greedy output
    computed without any reuse (the reference), plus how many tokens of history round 1 left cached."""
    first = llm.encode(SYSTEM + "Count from one to five.")
    out1 = greedy(llm, [first])[0]
    assert llm.engine.stats.prefix_hit_tokens == llm.engine.stats.tier_hit_tokens == 0
    second = first + out1 + llm.encode(" Now count backwards.")
    bm = llm.engine.scheduler.block_manager
    bm.enable_caching = False  # reference run: no lookup, nothing cached or offloaded
    expect = greedy(llm, [second])[0]
    bm.enable_caching = True
    assert llm.engine.stats.prefix_hit_tokens == llm.engine.stats.tier_hit_tokens == 0
    return second, expect, (len(first) + len(out1) - 1) // 8 * 8


def greedy(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def forget_device_cache(llm):
    tiers = llm.engine.kv_tiers
    if tiers is not None:  # unpin what the offload thread has copied
        for b in tiers.completed(wait=True):
            llm.engine.scheduler.block_manager.release(b)
    llm.engine.scheduler.block_manager.reset_prefix_cache()


@pytest.mark.slow
def test_reload_from_host_tier(llm, conversation):
    prompt, expect, history = conversation
    forget_device_cache(llm)
    tiers, stats = llm.engine.kv_tiers, llm.engine.stats
    assert tiers.num_offloaded > 0 and len(tiers._host) > 0
    before, hits = stats.tier_hit_tokens, tiers.num_host_hits
    assert greedy(llm, [prompt])[0] == expect
    assert stats.tier_hit_tokens - before >= history  # round 1's whole history reloaded, not recomputed
    assert tiers.num_host_hits > hits
    forget_device_cache(llm)
    bm = llm.engine.scheduler.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and all(rc == 0 for rc in bm.ref_counts)


@pytest.mark.slow
def test_preemption_swaps_out_to_the_tier(llm):
    """Five requests outgrow the 48-block pool: the preempted ones' computed blocks are copied to the host tier
    at once (swap-out), and their recompute reloads them; outputs equal a run without any reuse."""
    prompts = [SYSTEM * 2 + f" Tell story number {i}." for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    bm, sched = llm.engine.scheduler.block_manager, llm.engine.scheduler
    bm.enable_caching = False
    expect = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    bm.enable_caching = True
    forget_device_cache(llm)
    preempted, offloaded = sched.num_preemptions, llm.engine.kv_tiers.num_offloaded
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expect
    assert sched.num_preemptions > preempted and llm.engine.kv_tiers.num_offloaded > offloaded
    forget_device_cache(llm)
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks


@pytest.fixture(scope="module")
def restarted(llm, kv_dir, conversation):
    """A new engine on the same directory, after the first one shut down (host tier persisted to disk)."""
    llm.engine.kv_tiers.close()
    assert len(list(kv_dir.glob("*.safetensors"))) > 0
    return LLM("default", host_kv_cache_gb=0.05, disk_kv_cache_gb=0.05, kv_cache_dir=str(kv_dir), **KW)


@pytest.mark.slow
def test_reload_from_disk_after_restart(restarted, conversation):
    prompt, expect, history = conversation
    tiers, stats = restarted.engine.kv_tiers, restarted.engine.stats
    assert len(tiers.disk) > 0  # index rebuilt from the directory
    assert greedy(restarted, [prompt])[0] == expect
    assert stats.tier_hit_tokens >= history and tiers.num_disk_hits > 0
    assert stats.prompt_tokens < len(prompt) // 2  # only the tail was computed


@pytest.mark.slow
@pytest.mark.parametrize("damage, block", [("corrupt", 1), ("truncate", 2)])
def test_damaged_disk_file_is_ignored(restarted, kv_dir, conversation, damage, block):
    prompt, expect, _ = conversation
    forget_device_cache(restarted)
    tiers = restarted.engine.kv_tiers
    with tiers._lock:  # move host copies (of blocks recomputed by the last test) to disk: only disk serves
        host, tiers._host = list(tiers._host.items()), type(tiers._host)()
    for h, data in host:
        tiers.disk.put(h, data)
    hashes = restarted.engine.scheduler.block_manager.compute_hashes(_req(prompt), (len(prompt) - 1) // 8)
    path = kv_dir / (hashes[block].hex() + ".safetensors")
    data = bytearray(path.read_bytes())
    if damage == "corrupt":
        data[-100] ^= 0xFF  # one byte of KV flipped: the header still parses, the checksum does not match
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    before, rejected = restarted.engine.stats.tier_hit_tokens, tiers.disk.num_rejected
    assert greedy(restarted, [prompt])[0] == expect
    assert tiers.disk.num_rejected == rejected + 1
    assert restarted.engine.stats.tier_hit_tokens - before == 8 * block  # only the blocks before the damage
    assert not path.exists() or hashes[block] in tiers  # dropped (or re-offloaded afresh by this run)


def test_disk_tier_is_bounded_lru(tmp_path):
    shape = (2, 2, 4, 1, 8)
    block = torch.ones(shape)
    keys = [bytes([i]) * 16 for i in range(4)]
    disk = DiskTier(tmp_path, capacity_bytes=1 << 30, block_shape=shape, dtype=torch.float32)
    for i in range(3):
        disk.put(keys[i], block * i)
    size = disk.num_bytes // 3
    disk.capacity = 2 * size
    assert torch.equal(disk.get(keys[0]), block * 0)  # touched: now the most recently used
    disk.put(keys[3], block * 3)  # over budget: the least recently used files go
    assert [k in disk for k in keys] == [True, False, False, True] and disk.num_bytes <= 2 * size
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    again = DiskTier(tmp_path, capacity_bytes=2 * size, block_shape=shape, dtype=torch.float32)  # a restart
    assert len(again) == 2 and torch.equal(again.get(keys[3]), block * 3)


def test_tiers_gather_and_scatter_roundtrip():
    caches = [torch.randn(2, 6, 4, 1, 8) for _ in range(3)]
    tiers = KVTiers(caches, host_bytes=1 << 20)
    tiers.offload([(b"a" * 16, 1), (b"b" * 16, 4)])
    assert sorted(tiers.completed(wait=True)) == [1, 4]
    assert tiers.count_prefix([b"a" * 16, b"b" * 16, b"c" * 16]) == 2
    staging, n = tiers.fetch([b"a" * 16, b"b" * 16])
    assert n == 2 and staging.shape == (3, 2, 2, 4, 1, 8)
    from nanoflow.engine.kv_tiers import scatter_blocks
    scatter_blocks(caches, [0, 5], staging)
    for kv in caches:
        assert torch.equal(kv[:, 0], kv[:, 1]) and torch.equal(kv[:, 5], kv[:, 4])
    tiers.close()


def _req(prompt):
    from nanoflow.engine.request import Request
    return Request(list(prompt), SamplingParams())
