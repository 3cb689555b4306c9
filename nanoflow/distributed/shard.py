"""What one tensor-parallel rank holds (Megatron-style): pure arithmetic on a ModelConfig, no tensors.

- attention: whole KV groups per rank (a KV head with its query heads), split as evenly as possible and
  unevenly where they do not divide (SmolLM2's 3 groups on 2 ranks: 2 + 1; vLLM refuses such shapes). With
  fewer KV heads than ranks, each KV head is replicated on world/num_kv_heads ranks, which split its query heads.
- qkv_proj, gate_up_proj: column-parallel (this rank's output rows); o_proj, down_proj: row-parallel (this
  rank's input columns), followed by an all-reduce; norms replicated.
- embedding and LM head: vocabulary-parallel (a contiguous range of vocabulary rows per rank).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from nanoflow.models.config import ModelConfig

_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def even_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` contiguous pieces of `total`, sizes differing by at most one (bigger first)."""
    base, extra = divmod(total, parts)
    out, at = [], 0
    for p in range(parts):
        n = base + (1 if p < extra else 0)
        out.append((at, at + n))
        at += n
    return out


@dataclass(frozen=True)
class TPShard:
    rank: int
    world_size: int
    kv_heads: tuple[int, int]  # [start, end) of the KV heads this rank stores
    q_heads: tuple[int, int]  # [start, end) of its query heads
    intermediate: tuple[int, int]  # its columns of gate/up (rows of down's input)
    vocab: tuple[int, int]  # its rows of the embedding and the LM head

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, world_size: int) -> "TPShard":
        check_shardable(cfg, world_size)
        hkv, group = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        if hkv >= world_size:
            kv = even_ranges(hkv, world_size)[rank]
            q = (kv[0] * group, kv[1] * group)
        else:  # each KV head replicated on `copies` ranks, which split its query heads
            copies = world_size // hkv
            head, part = divmod(rank, copies)
            kv = (head, head + 1)
            a, b = even_ranges(group, copies)[part]
            q = (head * group + a, head * group + b)
        return cls(rank, world_size, kv, q, even_ranges(cfg.intermediate_size, world_size)[rank],
                   even_ranges(cfg.vocab_size, world_size)[rank])

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The shapes this rank's layers are built with (the vocabulary stays global: see `vocab`)."""
        return replace(cfg, num_heads=self.q_heads[1] - self.q_heads[0],
                       num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
                       intermediate_size=self.intermediate[1] - self.intermediate[0], head_dim=cfg.head_dim)

    def slice_of(self, name: str, cfg: ModelConfig) -> tuple[int, int, int] | None:
        """(dim, start, end) of checkpoint tensor `name` (HF naming, unfused) that this rank keeps; None:
        the whole tensor (replicated)."""
        d = cfg.head_dim
        leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        rows = {"q_proj": (self.q_heads[0] * d, self.q_heads[1] * d),
                "k_proj": (self.kv_heads[0] * d, self.kv_heads[1] * d),
                "v_proj": (self.kv_heads[0] * d, self.kv_heads[1] * d),
                "gate_proj": self.intermediate, "up_proj": self.intermediate}
        if leaf in rows:
            return (0, *rows[leaf])  # weight [out, in] rows, or bias [out]
        if leaf == "o_proj" and name.endswith("weight"):
            return (1, self.q_heads[0] * d, self.q_heads[1] * d)
        if leaf == "down_proj" and name.endswith("weight"):
            return (1, *self.intermediate)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return (0, *self.vocab)
        return None

    def narrow(self, name: str, full: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """This rank's part of tensor `name` of the whole model: a checkpoint name, or one of our fused
        parameters (qkv_proj, gate_up_proj: each part cut by its own rule)."""
        prefix, leaf, kind = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", name)
        if leaf in _FUSED:
            c = cfg
            sizes = [c.q_size, c.kv_size, c.kv_size] if leaf == "qkv_proj" else [c.intermediate_size] * 2
            return torch.cat([self.narrow(f"{prefix}.{part}.{kind}", t, cfg)
                              for part, t in zip(_FUSED[leaf], full.split(sizes, 0))])
        where = self.slice_of(name, cfg)
        return full if where is None else full.narrow(where[0], where[1], where[2] - where[1])


def check_shardable(cfg: ModelConfig, world_size: int) -> None:
    """One clear line when `world_size` ranks cannot split this model."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {world_size}")
    hkv = cfg.num_kv_heads
    if world_size > hkv and (world_size % hkv or (cfg.num_heads // hkv) % (world_size // hkv)):
        raise ValueError(f"tensor_parallel_size {world_size} cannot split {cfg.num_kv_heads} KV heads "
                         f"({cfg.num_heads} query heads): with more ranks than KV heads, the rank count must be a "
                         f"multiple of the KV heads and divide each KV group's query heads")
    if world_size > cfg.intermediate_size or world_size > cfg.vocab_size:
        raise ValueError(f"tensor_parallel_size {world_size} is larger than the model's MLP or vocabulary")
