"""The on-disk KV tier behind the host tier (kv_tiers.KVTiers): a bounded LRU of KV blocks, one file per block.

Disk format: one safetensors file per block, `<hash hex>.safetensors`, with the block's length, shape,
dtype and a CRC32 of its bytes in the header metadata. A file that does not parse, is truncated or fails
its checksum is deleted and reported as a miss (the tokens are recomputed), never used. The index is
rebuilt from the directory at start-up (LRU order = file modification time), so the tier survives a restart.
"""
from __future__ import annotations

import os
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_SUFFIX = ".safetensors"


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy())


class DiskTier:
    """Bounded on-disk LRU of KV blocks, one checksummed safetensors file per block."""

    def __init__(self, directory: str | os.PathLike, capacity_bytes: int, block_shape: tuple, dtype: torch.dtype):
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity, self.block_shape, self.dtype = capacity_bytes, tuple(block_shape), dtype
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size; first = least recently used
        self.num_bytes = 0
        self.num_rejected = 0  # corrupt / truncated / foreign files detected and dropped
        self._rebuild()

    def _path(self, h: bytes) -> Path:
        return self.dir / (h.hex() + _SUFFIX)

    def _rebuild(self) -> None:
        for tmp in self.dir.glob("*.tmp"):  # a write that a crash interrupted
            tmp.unlink(missing_ok=True)
        files = []
        for f in self.dir.glob("*" + _SUFFIX):
            try:
                files.append((f.stat().st_mtime_ns, bytes.fromhex(f.name[:-len(_SUFFIX)]), f.stat().st_size))
            except (ValueError, OSError):
                continue  # not one of ours
        for _, h, size in sorted(files):
            self._index[h] = size
            self.num_bytes += size
        with self._lock:
            self._evict_locked()

    def __contains__(self, h: bytes) -> bool:
        return h in self._index

    def __len__(self) -> int:
        return len(self._index)

    def put(self, h: bytes, block: torch.Tensor) -> None:
        if h in self._index:
            return
        block = block.contiguous()
        meta = {"nbytes": str(block.numel() * block.element_size()), "crc32": str(_crc(block)),
                "shape": ",".join(map(str, block.shape)), "dtype": str(block.dtype)}
        path = self._path(h)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"kv": block}, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: readers never see a half-written file under the real name
        with self._lock:
            self._index[h] = path.stat().st_size
            self.num_bytes += self._index[h]
            self._evict_locked()

    def get(self, h: bytes) -> torch.Tensor | None:
        """The block, or None if absent or if its file is corrupt/truncated (then it is deleted)."""
        if h not in self._index:
            return None
        path = self._path(h)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                block = f.get_tensor("kv")
            ok = (tuple(block.shape) == self.block_shape and block.dtype == self.dtype
                  and int(meta["nbytes"]) == block.numel() * block.element_size()
                  and int(meta["crc32"]) == _crc(block))
        except Exception:  # safetensors raises on a truncated buffer or a broken header
            ok = False
        if not ok:
            self.num_rejected += 1
            self._drop(h)
            return None
        with self._lock:
            if h in self._index:
                self._index.move_to_end(h)
        try:
            os.utime(path)  # the LRU order survives a restart
        except OSError:
            pass
        return block

    def _drop(self, h: bytes) -> None:
        with self._lock:
            size = self._index.pop(h, None)
            if size is not None:
                self.num_bytes -= size
        self._path(h).unlink(missing_ok=True)

    def _evict_locked(self) -> None:
        while self._index and self.num_bytes > self.capacity:
            h, size = self._index.popitem(last=False)
            self.num_bytes -= size
            self._path(h).unlink(missing_ok=True)
