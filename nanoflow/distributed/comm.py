"""The tensor-parallel process group: torch.distributed (gloo on a CPU, NCCL on CUDA) and the few collectives
the engine uses. Every rank issues the same collectives in the same order (the forward's operations, then the
per-step messages), which is what gloo and NCCL match on; a collective that cannot finish within the group's
timeout raises instead of waiting forever (a dead peer usually raises at once: its sockets close)."""
from __future__ import annotations

import datetime
import pickle
import time

import torch
import torch.distributed as dist

from nanoflow.distributed.shard import TPShard


class TPGroup:
    def __init__(self, shard: TPShard, device: torch.device) -> None:
        self.shard, self.device = shard, device
        self.rank, self.world_size = shard.rank, shard.world_size
        # Step messages are host bytes: NCCL moves only device tensors, so on CUDA they take a gloo group.
        self.host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
        self.all_reduce_s, self.all_reduce_calls = 0.0, 0  # host time in the forward's all-reduces (benchmarks)

    @classmethod
    def connect(cls, shard: TPShard, device: torch.device, init_method: str, timeout_s: float) -> "TPGroup":
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=shard.rank, world_size=shard.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return cls(shard, device)

    # ---- inside the forward ----
    def all_reduce_(self, t: torch.Tensor) -> None:
        """Sum `t` over the ranks, in place (rows of a step buffer are contiguous)."""
        t0 = time.perf_counter()
        dist.all_reduce(t)
        self.all_reduce_s += time.perf_counter() - t0
        self.all_reduce_calls += 1

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Logits [T, local vocab] of every rank -> [T, vocab] on rank 0 (None elsewhere). gloo's gather wants
        equal shapes: uneven vocabulary ranges are padded to the largest and cut after."""
        width = -(-vocab_size // self.world_size)
        if local.shape[1] < width:
            local = torch.nn.functional.pad(local, (0, width - local.shape[1]))
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(local, parts, dst=0)
        if self.rank != 0:
            return None
        from nanoflow.distributed.shard import even_ranges
        return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, even_ranges(vocab_size, self.world_size))], 1)

    # ---- per-step messages (rank 0 -> workers) ----
    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled bytes, one broadcast of the size and one of the data)."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, 0, group=self.host_group)
        if self.rank != 0:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, 0, group=self.host_group)
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def broadcast_tokens(self, tokens: torch.Tensor | None, n: int) -> torch.Tensor:
        """The step's sampled tokens from rank 0 (async scheduling: the next step's inputs read them)."""
        t = tokens.contiguous() if self.rank == 0 else torch.empty(n, dtype=torch.long, device=self.device)
        dist.broadcast(t, 0)
        return t

    def barrier(self) -> None:
        dist.barrier(group=self.host_group)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
