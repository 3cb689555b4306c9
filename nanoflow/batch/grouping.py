"""Shared-prefix grouping (BatchLLM's global prefix sharing, within a look-ahead window).

Requests whose first KV blocks are the same token ids are admitted one after another, so the prefix is
computed once and then hit in the prefix cache, instead of being evicted by unrelated requests in between
(the LRU cache alone loses it when the job has more distinct prefixes than the KV pool holds)."""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, Hashable, TypeVar

from nanoflow.engine.block_manager import hash_block

T = TypeVar("T")
KEY_BLOCKS = 4  # prefix blocks a group key covers: past a chat template's header, into the system prompt


def prefix_key(token_ids: list[int], block_size: int, num_blocks: int = KEY_BLOCKS) -> bytes | None:
    """Hash of the first `num_blocks` full KV blocks (fewer if the prompt is shorter); None under one block.
    blake2b like the prefix cache, so it is stable across processes (data-parallel affinity uses it too)."""
    n = min(num_blocks, len(token_ids) // block_size) * block_size
    return hash_block(b"nanoflow-group", token_ids[:n]) if n else None


class AdmissionWindow(Generic[T]):
    """The look-ahead window of a job: items pushed in input order, popped in admission order. Grouping on:
    the current group's items first, then the group of the oldest item left (so nothing waits for more than
    one pass over the window); off: input order."""

    def __init__(self, grouping: bool) -> None:
        self.grouping = grouping
        self._arrival: deque[list] = deque()  # entries [key, item, taken], in input order
        self._groups: dict[Hashable, deque[list]] = {}
        self._current: Hashable | None = None
        self._len = 0
        self._seq = 0
        self._led: OrderedDict[Hashable, None] = OrderedDict()  # groups whose prefix a leader already computed

    def __len__(self) -> int:
        return self._len

    def push(self, item: T, key: Hashable | None) -> None:
        self._seq += 1
        entry = [key if (self.grouping and key is not None) else ("solo", self._seq), item, False]
        self._arrival.append(entry)
        self._groups.setdefault(entry[0], deque()).append(entry)
        self._len += 1

    def pop(self) -> tuple[T, bool]:
        """The next item to admit and whether it starts a new group that has more items waiting (a leader:
        the caller may let its prefix be computed before admitting the rest)."""
        group = self._groups.get(self._current)
        leader = False
        if not group:
            while self._arrival[0][2]:
                self._arrival.popleft()
            self._current = self._arrival[0][0]
            group = self._groups[self._current]
            # Only a group's first run waits for its leader: later runs of the same prefix find it cached.
            leader = len(group) > 1 and self._current not in self._led
            if leader:
                self._led[self._current] = None
                if len(self._led) > 4096:
                    self._led.popitem(last=False)
        entry = group.popleft()
        if not group:
            del self._groups[self._current]
        entry[2] = True
        self._len -= 1
        while self._arrival and self._arrival[0][2]:
            self._arrival.popleft()
        if len(self._arrival) > 2 * self._len + 1024:  # taken entries behind an old one: keep memory bounded
            self._arrival = deque(e for e in self._arrival if not e[2])
        return entry[1], leader
