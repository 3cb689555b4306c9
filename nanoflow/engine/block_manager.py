"""Paged KV memory bookkeeping: fixed-size blocks with reference counts and a prefix cache. Pure Python.

Prefix caching (vLLM-style): a *full* block whose tokens are known and whose KV is computed gets a hash from
the chain ``hash(parent_hash, block_tokens, salt)``; ``hash -> block`` lets a new request reuse it. Blocks are
shared by reference count. A freed block that has a hash stays cached (ref count 0) in an LRU of evictable
blocks and is only reused for new data when no free block is left (then its hash is dropped).

Free blocks are handed out so that a request's blocks lie next to each other: a growing request takes the block
after its last one when that is free, and a new request starts after the previous one plus room to grow (next
fit over the pool, wrapping around). Decode attention on a CPU then reads each request's KV as long runs: random
6 KiB pages read at ~15 GB/s on 2 cores, 48 KiB runs at ~32 GB/s.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from nanoflow.engine.request import Request


MAX_GROWTH_ROOM = 64  # blocks left free after a new request for it to grow into (runs longer than that gain little)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def hash_block(parent: bytes, tokens: list[int]) -> bytes:
    """One link of the hash chain. 128-bit blake2b: stable across processes (the disk tier keys on it)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False, salt: bytes = b"",
                 contiguous: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # The chain's root: anything else that changes the KV (model, dtype, block size) goes in the salt.
        self.root_hash = hashlib.blake2b(b"nanoflow-kv\0" + salt, digest_size=16).digest()
        self.ref_counts = [0] * num_blocks
        self._free = bytearray(b"\x01") * num_blocks  # 1: ref 0 and no hash
        self._num_free = num_blocks
        self._cursor = 0  # next fit: where the next new request's blocks start looking
        self.contiguous = contiguous  # off (ablation): blocks in pool order, interleaved across requests
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; first = least recently used
        self._hash_of: dict[int, bytes] = {}  # block -> hash, for cached blocks
        self._cached: dict[bytes, int] = {}  # hash -> block

    @property
    def num_free_blocks(self) -> int:
        """Blocks available for new data (free + evictable cached ones)."""
        return self._num_free + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ---- allocation ----
    def _allocate(self, prefer: int = -1) -> int:
        """A block for new data: `prefer` if it is free, else the next free one from the cursor, else the least
        recently used cached block (its content and hash are dropped)."""
        if 0 <= prefer < self.num_blocks and self._free[prefer]:
            block = prefer
        elif self._num_free:
            block = self._free.find(1, self._cursor)
            if block < 0:
                block = self._free.find(1)
            self._cursor = block + 1
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
        if self._free[block]:
            self._free[block] = 0
            self._num_free -= 1
        assert self.ref_counts[block] == 0, f"block {block} handed out while still referenced"
        self.ref_counts[block] = 1
        return block

    def _set_free(self, block: int) -> None:
        """Back on the free map (ref 0, no hash), counted."""
        self._free[block] = 1
        self._num_free += 1

    def _append_blocks(self, req: Request, n: int, admitting: bool) -> None:
        """`n` fresh blocks at the end of req.block_table, each preferring the one after the last. A request
        being admitted leaves room after its blocks to grow into (up to its max_tokens, at most MAX_GROWTH_ROOM
        blocks): the next request starts after that."""
        for _ in range(n):
            prefer = req.block_table[-1] + 1 if req.block_table and self.contiguous else -1
            req.block_table.append(self._allocate(prefer))
        if admitting and n and self.contiguous:
            room = blocks_needed(req.max_total_tokens, self.block_size) - len(req.block_table)
            self._cursor = req.block_table[-1] + 1 + min(max(room, 0), MAX_GROWTH_ROOM)

    def add_ref(self, block: int) -> None:
        """Another owner takes a reference (prefix hit or an offload in flight); revives an evictable block."""
        if self.ref_counts[block] == 0:
            del self._evictable[block]  # KeyError here means a free, uncached block: a bug
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None  # most recently used end
            else:
                self._set_free(block)

    def blocks_to_grow(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, blocks_needed(total, self.block_size) - len(req.block_table))

    def grow(self, req: Request, num_new_tokens: int) -> bool:
        """Give `req` slots for `num_new_tokens` more tokens; False (and no change) if memory is short."""
        need = self.blocks_to_grow(req, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        self._append_blocks(req, need, admitting=not req.block_table)
        return True

    def free(self, req: Request) -> None:
        """Drop the request's references. Computed full blocks are cached first, so they stay reusable."""
        self.cache_full_blocks(req)
        # Release in reverse so the tail of a chain (least likely to be reused) is evicted first.
        for block in reversed(req.block_table):
            self.release(block)
        req.block_table = []
        req.num_cached_blocks = 0

    # ---- prefix cache ----
    def compute_hashes(self, req: Request, num_blocks: int) -> list[bytes]:
        """Extend req.block_hashes to cover `num_blocks` full blocks of *known* tokens (incremental, O(new))."""
        bs, hashes = self.block_size, req.block_hashes
        num_blocks = min(num_blocks, req.num_tokens // bs)
        if len(hashes) < num_blocks:
            tokens = req.all_token_ids
            parent = hashes[-1] if hashes else self.root_hash
            for i in range(len(hashes), num_blocks):
                parent = hash_block(parent, tokens[i * bs:(i + 1) * bs])
                hashes.append(parent)
        return hashes[:num_blocks]

    def max_reusable_blocks(self, req: Request) -> int:
        """Never the whole sequence: at least one token is computed so there are logits to sample. None for a
        request that wants prompt logprobs: a cached block has no logits (prompt_logprobs.py)."""
        if req.params.prompt_logprobs is not None:
            return 0
        return (req.num_tokens - 1) // self.block_size

    def match_prefix(self, req: Request) -> list[int]:
        """The cached blocks holding the longest full-block prefix of the request's known tokens."""
        if not self.enable_caching:
            return []
        hits = []
        for h in self.compute_hashes(req, self.max_reusable_blocks(req)):
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_with_prefix(self, req: Request, hits: list[int], num_loaded: int, num_new_tokens: int) -> bool:
        """Admit `req` on cached `hits`, plus fresh blocks for `num_loaded` blocks reloaded from a KV tier and
        `num_new_tokens` tokens to compute. False (and no change) if memory is short."""
        assert not req.block_table, "admitting a request that still holds blocks"
        bs = self.block_size
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # these leave the free capacity
        need = blocks_needed((len(hits) + num_loaded) * bs + num_new_tokens, bs) - len(hits)
        if need > self.num_free_blocks - revived:
            return False
        for b in hits:
            self.add_ref(b)
        req.block_table = list(hits)
        req.num_cached_blocks = len(hits)
        self._append_blocks(req, need, admitting=True)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's full blocks whose tokens are known and whose KV is computed (or launched:
        every later step is ordered after it). Called between steps, never for tokens not yet sampled."""
        if not self.enable_caching:
            return
        n = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        n = min(n, len(req.block_table))
        if n <= req.num_cached_blocks:
            return
        hashes = self.compute_hashes(req, n)
        for i in range(req.num_cached_blocks, n):
            block, h = req.block_table[i], hashes[i]
            if h not in self._cached and block not in self._hash_of:
                self._cached[h] = block
                self._hash_of[block] = h
            # else: the same content is already cached in another block; this one stays a private copy
        req.num_cached_blocks = n

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached block (benchmarks, tests); blocks in use keep their hash."""
        n = len(self._evictable)
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
            self._set_free(block)
        return n

    def cached_hash(self, block: int) -> bytes | None:
        return self._hash_of.get(block)

    def check_invariants(self) -> None:
        free, evictable = {b for b, f in enumerate(self._free) if f}, set(self._evictable)
        assert len(free) == self._num_free, "free count out of sync"
        assert not free & evictable, "a block is both free and evictable"
        for b, rc in enumerate(self.ref_counts):
            assert rc >= 0, f"block {b}: negative ref count {rc}"
            assert (rc == 0) == (b in free or b in evictable), f"block {b}: ref count {rc}, free={b in free}"
            assert (b in evictable) <= (b in self._hash_of), f"evictable block {b} has no hash"
            assert (b in free) <= (b not in self._hash_of), f"free block {b} still has a hash"
        assert len(self._cached) == len(self._hash_of), "hash maps out of sync"
        assert all(self._hash_of[b] == h for h, b in self._cached.items()), "hash maps disagree"
        assert len(free) + len(evictable) == self.num_free_blocks <= self.num_blocks
