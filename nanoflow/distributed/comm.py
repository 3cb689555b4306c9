"""The tensor-parallel process group: torch.distributed (gloo on a CPU, NCCL on CUDA) and the few collectives
the engine uses. Every rank issues the same collectives in the same order (the forward's operations, the
logits' gather, the tokens' broadcast), which is what gloo and NCCL match on; a collective that cannot finish
within the group's timeout raises instead of waiting forever (a dead peer usually raises at once: its sockets
close). Each step's inputs go through the rendezvous store instead, where an idle worker may wait for days."""
from __future__ import annotations

import datetime
import pickle
import time

import torch
import torch.distributed as dist

from nanoflow.distributed.shard import TPShard, even_ranges


STARTUP_TIMEOUT_S = 900.0  # the ranks' rendezvous and the barrier after loading: processes start, weights load


class TPGroup:
    def __init__(self, shard: TPShard, device: torch.device, timeout_s: float) -> None:
        self.shard, self.device = shard, device
        self.rank, self.world_size = shard.rank, shard.world_size
        # The steps' collectives run in their own group, whose timeout turns a hung rank into an error.
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        self.all_reduce_s, self.all_reduce_calls = 0.0, 0  # host time in the forward's all-reduces (benchmarks)
        self._steps = dist.PrefixStore("nanoflow-steps/", dist.distributed_c10d._get_default_store())
        self._steps.set_timeout(datetime.timedelta(days=365))
        self._seq = 0

    @classmethod
    def connect(cls, shard: TPShard, device: torch.device, init_method: str, timeout_s: float) -> "TPGroup":
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=shard.rank, world_size=shard.world_size,
                                timeout=datetime.timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S)))
        return cls(shard, device, timeout_s)

    # ---- inside the forward ----
    def all_reduce_(self, t: torch.Tensor) -> None:
        """Sum `t` over the ranks, in place (rows of a step buffer are contiguous)."""
        t0 = time.perf_counter()
        dist.all_reduce(t, group=self.group)
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
        dist.gather(local, parts, dst=0, group=self.group)
        if self.rank != 0:
            return None
        return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, even_ranges(vocab_size, self.world_size))], 1)

    # ---- per-step messages (rank 0 -> workers) ----
    def post_step(self, obj) -> None:
        """Rank 0: the next step's inputs (None: shut down) for the workers, through the rendezvous store: a
        worker waits there for the next step as long as the engine idles (a collective would time out)."""
        self._seq += 1
        self._steps.set(str(self._seq), pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        if self._seq > 2:  # every rank joined step seq-1's collectives, so it has read step seq-2
            self._steps.delete_key(str(self._seq - 2))

    def next_step(self):
        """A worker: wait for rank 0's next step (None: shut down)."""
        self._seq += 1
        return pickle.loads(self._steps.get(str(self._seq)))

    def broadcast_tokens(self, tokens: torch.Tensor | None, n: int) -> torch.Tensor:
        """The step's sampled tokens from rank 0 (async scheduling: the next step's inputs read them)."""
        t = tokens.contiguous() if self.rank == 0 else torch.empty(n, dtype=torch.long, device=self.device)
        dist.broadcast(t, 0, group=self.group)
        return t

    def barrier(self) -> None:
        """Every rank got here (the startup group: loading weights may take minutes)."""
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
