"""A second tier for KV blocks: a bounded host-memory LRU that spills to a bounded on-disk LRU.

Keyed by the prefix-cache block hash (block_manager.hash_block), so a later request whose prompt extends a
finished conversation finds its history here when the device blocks have been evicted, and reloads it
(one contiguous staging tensor, then a scatter into freshly allocated pages) instead of recomputing it.

Offload is off the critical path: the scheduler pins a finished request's blocks and hands them to a
background thread, which gathers them into host memory and later spills LRU entries to disk; the blocks
are unpinned between steps once copied. On a CPU-only machine "device" and "host" are the same RAM: the
tiers still hold separate, bounded copies, exactly as on a GPU.

The disk tier (its file format, checksums, restart) is kv_disk.DiskTier.
"""
from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from collections import OrderedDict

import torch

from nanoflow import env
from nanoflow.engine.kv_disk import DiskTier
from nanoflow.engine.transfer import host_to_device


def gather_blocks(kv_caches: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """Device pages -> one contiguous tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
    return torch.stack([kv.index_select(1, ids) for kv in kv_caches])


def scatter_blocks(kv_caches: list[torch.Tensor], block_ids: list[int], staging: torch.Tensor) -> None:
    """Reload: one contiguous host->device copy of the staging tensor, then index_copy_ into the pages."""
    device = kv_caches[0].device
    ids = host_to_device(torch.tensor(block_ids, dtype=torch.long), device)  # ordered on the step stream
    staging = staging.to(device, non_blocking=True)
    for layer, kv in enumerate(kv_caches):
        kv.index_copy_(1, ids, staging[layer])


class KVTiers:
    """Host-memory LRU (bounded) in front of an optional DiskTier, with a background offload thread.

    Engine-thread API (the scheduler's): wants / offload / completed / count_prefix / fetch.
    """

    def __init__(self, kv_caches: list[torch.Tensor], host_bytes: int, disk_bytes: int = 0,
                 cache_dir: str | os.PathLike | None = None, step_stream=None) -> None:
        self.kv_caches = kv_caches
        self.step_stream = step_stream  # CUDA: the stream the steps (which write the KV) run on
        _, _, bs, h, d = kv_caches[0].shape
        self.block_shape = (len(kv_caches), 2, bs, h, d)
        self.dtype = kv_caches[0].dtype
        self.block_bytes = len(kv_caches) * kv_caches[0][:, 0].numel() * kv_caches[0].element_size()
        self.host_capacity = host_bytes // self.block_bytes  # in blocks
        self.disk = None
        if disk_bytes > 0:
            self.disk = DiskTier(cache_dir or env.cache_dir("kv"), disk_bytes, self.block_shape, self.dtype)
        self._host: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # first = least recently used
        self._pin = torch.cuda.is_available() and kv_caches[0].is_cuda  # pinned host memory for async copies
        self._lock = threading.Condition()
        self._inflight: set[bytes] = set()
        self._pending = 0  # offload jobs not yet gathered
        self._done: list[int] = []  # device blocks whose copy finished (to unpin)
        self.num_offloaded = self.num_spilled = self.num_host_hits = self.num_disk_hits = 0
        self.copy_s = 0.0  # background thread time spent copying (gather, host copy, disk writes)
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name="nanoflow-kv-offload", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # stop the thread before the interpreter tears torch down

    # ---- engine thread ----
    def __contains__(self, h: bytes) -> bool:
        with self._lock:
            return h in self._host or (self.disk is not None and h in self.disk)

    def wants(self, h: bytes) -> bool:
        with self._lock:
            return h not in self._inflight and h not in self._host and not (self.disk is not None and h in self.disk)

    def offload(self, pairs: list[tuple[bytes, int]]) -> None:
        """Copy these (hash, device block) pairs in the background; the caller keeps the blocks pinned until
        completed() returns them."""
        event = None
        if self.kv_caches[0].is_cuda:  # the copy must see the KV the launched steps write
            event = torch.cuda.Event()
            event.record(self.step_stream or torch.cuda.current_stream(self.kv_caches[0].device))
        with self._lock:
            self._inflight.update(h for h, _ in pairs)
            self._pending += 1
        self._jobs.put((pairs, event))

    def store_now(self, pairs: list[tuple[bytes, int]]) -> None:
        """Copy these blocks before returning (preemption swap-out); spilling to disk stays in the background."""
        if self.kv_caches[0].is_cuda:  # every stream: the steps' own and the default one
            torch.cuda.synchronize(self.kv_caches[0].device)
        data = gather_blocks(self.kv_caches, [b for _, b in pairs]).cpu()
        self._jobs.put((None, self._insert(pairs, data)))

    def completed(self, wait: bool = False) -> list[int]:
        """Device blocks whose copy is done. wait=True: first wait for every copy in flight."""
        with self._lock:
            if wait:
                self._lock.wait_for(lambda: self._pending == 0)
            done, self._done = self._done, []
            return done

    def count_prefix(self, hashes: list[bytes]) -> int:
        n = 0
        with self._lock:
            for h in hashes:
                if h not in self._host and not (self.disk is not None and h in self.disk):
                    break
                n += 1
        return n

    def fetch(self, hashes: list[bytes]) -> tuple[torch.Tensor | None, int]:
        """The longest run of these blocks still held (and valid), as one contiguous staging tensor
        [num_layers, 2, n, block_size, heads, head_dim], and n."""
        blocks = []
        for h in hashes:
            with self._lock:
                block = self._host.get(h)
                if block is not None:
                    self._host.move_to_end(h)
                    self.num_host_hits += 1
            if block is None and self.disk is not None:
                block = self.disk.get(h)
                self.num_disk_hits += block is not None
            if block is None:
                break
            blocks.append(block)
        if not blocks:
            return None, 0
        staging = torch.stack(blocks, dim=2)
        return (staging.pin_memory() if self._pin else staging), len(blocks)

    def close(self, persist: bool = True) -> None:
        """Finish the copies in flight and stop the thread (idempotent). persist: write what the host tier
        holds to the disk tier, so a restarted process finds it (also done at interpreter exit)."""
        if self._thread.is_alive():
            self.completed(wait=True)
            self._jobs.put(None)
            self._thread.join(timeout=60)
        atexit.unregister(self.close)
        if persist and self.disk is not None:
            with self._lock:
                entries, self._host = list(self._host.items()), OrderedDict()
            for h, block in entries:  # oldest first: the disk LRU order follows the host's
                try:
                    self.disk.put(h, block)
                except OSError:
                    break

    # ---- background thread ----
    def _worker(self) -> None:
        stream = torch.cuda.Stream(self.kv_caches[0].device) if self.kv_caches[0].is_cuda else None
        while (job := self._jobs.get()) is not None:
            pairs, event = job
            if pairs is None:  # blocks store_now() copied: only the disk spill is left
                self._spill(event)
                continue
            data, t0 = None, time.perf_counter()
            try:
                data = self._gather(pairs, event, stream)
            except Exception:  # never kill the offload thread: these blocks are just not kept
                pass
            finally:
                with self._lock:
                    self._done.extend(b for _, b in pairs)  # copied (or failed): unpin
                    self._pending -= 1
                    self._lock.notify_all()
            self._spill(self._insert(pairs, data))
            self.copy_s += time.perf_counter() - t0

    def _insert(self, pairs, data) -> list:
        """Into the host LRU; returns what must go to disk (LRU victims, or everything without a host tier)."""
        spill = []
        with self._lock:
            for j, (h, _) in enumerate(pairs):
                self._inflight.discard(h)
                if data is None:
                    continue
                if self.host_capacity > 0:
                    self._host[h] = data[:, :, j].clone()
                else:
                    spill.append((h, data[:, :, j]))
                self.num_offloaded += 1
            while len(self._host) > self.host_capacity:
                spill.append(self._host.popitem(last=False))
        return spill

    def _spill(self, spill: list) -> None:
        for h, block in spill:  # disk I/O outside the lock
            if self.disk is not None:
                try:
                    self.disk.put(h, block)
                    self.num_spilled += 1
                except OSError:  # disk full or gone: the block is simply not kept
                    pass

    def _gather(self, pairs, event, stream) -> torch.Tensor:
        ids = [b for _, b in pairs]
        if stream is None:
            return gather_blocks(self.kv_caches, ids)
        with torch.cuda.stream(stream):
            stream.wait_event(event)
            data = gather_blocks(self.kv_caches, ids)
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            host.copy_(data, non_blocking=True)
            stream.synchronize()
        return host


def kv_cache_salt(src, dtype: torch.dtype, block_size: int, seed: int, device: str = "cpu",
                  kv_packed: bool = False) -> bytes:
    """Everything besides the tokens that decides a block's KV: the weights (path, size, mtime; the seed
    for random dummy weights), dtype, block size, the KV pages' layout and a non-CPU device type (other kernels,
    other dummy draws). Goes into every block hash, so also into disk keys."""
    ident = src.path
    if os.path.exists(src.path):
        st = os.stat(src.path)
        ident += f"|{st.st_size}|{st.st_mtime_ns}"
    kind = torch.device(device).type
    salt = f"{src.kind}|{ident}|{dtype}|{block_size}|{seed if src.kind == 'dummy' else ''}"
    salt += "|kv-packed" if kv_packed else ""
    return (salt if kind == "cpu" else f"{salt}|{kind}").encode()  # CPU keys stay as they were


def make_kv_tiers(config, kv_caches: list[torch.Tensor], step_stream=None) -> KVTiers | None:
    """The tiers an EngineConfig asks for, or None (both sizes 0)."""
    if not (config.host_kv_cache_gb > 0 or config.disk_kv_cache_gb > 0):
        return None
    return KVTiers(kv_caches, int(config.host_kv_cache_gb * (1 << 30)), int(config.disk_kv_cache_gb * (1 << 30)),
                   config.kv_cache_dir, step_stream)
