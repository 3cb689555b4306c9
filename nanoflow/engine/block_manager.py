"""Paged KV memory bookkeeping: fixed-size blocks with reference counts. Pure Python."""
from __future__ import annotations

from collections import deque

from nanoflow.engine.request import Request


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_to_grow(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, blocks_needed(total, self.block_size) - len(req.block_table))

    def can_grow(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_to_grow(req, num_new_tokens) <= self.num_free_blocks

    def grow(self, req: Request, num_new_tokens: int) -> bool:
        """Give `req` slots for `num_new_tokens` more tokens; False (and no change) if memory is short."""
        need = self.blocks_to_grow(req, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            block = self._free.popleft()
            assert self.ref_counts[block] == 0, f"block {block} on the free list is still referenced"
            self.ref_counts[block] = 1
            req.block_table.append(block)
        return True

    def share(self, block: int) -> None:
        """Another owner takes a reference (prefix reuse)."""
        assert self.ref_counts[block] > 0, f"sharing free block {block}"
        self.ref_counts[block] += 1

    def free(self, req: Request) -> None:
        # Release in reverse so the tail (least likely to be shared) is reused first.
        for block in reversed(req.block_table):
            assert self.ref_counts[block] > 0, f"double free of block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)
        req.block_table = []

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, rc in enumerate(self.ref_counts):
            assert rc >= 0 and (rc == 0) == (b in free), f"block {b}: ref count {rc}, free={b in free}"
