"""Shared helpers of the flow tests: a tiny random model and a mixed decode + chunked-prefill step."""
from __future__ import annotations

import torch

from nanoflow.kernels.attention import AttentionMetadata, PrefillChunk
from nanoflow.models.config import ModelConfig
from nanoflow.models.loader import ModelSource, build_model

BLOCK = 4
TINY = ModelConfig("qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=256, qkv_bias=True, name="tiny")


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model(ModelSource("dummy", "tiny"), TINY, dtype, seed=0)
    for p in model.parameters():  # larger weights than the dummy init, so errors would show
        p.data.normal_(0, 0.2)
    return model


def _tables(starts: list[int], lens: list[int]):
    return [list(range(s, s + -(-n // BLOCK))) for s, n in zip(starts, lens)]


def mixed_step(decode_ctx=(5, 9, 3), prefill=((0, 7), (6, 5)), seed=0):
    """Token rows of one step: one decode token per request with `decode_ctx` tokens of context (KV of all but
    the last already cached), then prefill chunks (prefix already cached, chunk length). Returns
    (input_ids, positions, meta, kv_caches after the cached part is filled by the plain forward)."""
    g = torch.Generator().manual_seed(seed)
    model_blocks = 64
    lens = list(decode_ctx) + [p + c for p, c in prefill]
    starts, at = [], 0
    for n in lens:
        starts.append(at)
        at += -(-n // BLOCK)
    tables = _tables(starts, lens)
    kv = [torch.zeros(2, model_blocks, BLOCK, TINY.num_kv_heads, TINY.head_dim) for _ in range(TINY.num_layers)]
    # Cached part: random K/V stand in for earlier steps (what attention reads is all that matters).
    for c in kv:
        c.normal_(0, 1, generator=g)
    ids, pos, slots = [], [], []
    for r, n in enumerate(decode_ctx):
        ids.append(int(torch.randint(0, TINY.vocab_size, (1,), generator=g)))
        pos.append(n - 1)
        slots.append(tables[r][(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK)
    meta = AttentionMetadata(torch.tensor(0))
    nd = len(decode_ctx)
    if nd:
        w = max(len(t) for t in tables[:nd])
        meta.num_decode = nd
        meta.decode_block_tables = torch.tensor([t + [0] * (w - len(t)) for t in tables[:nd]])
        meta.decode_context_lens = torch.tensor(list(decode_ctx))
        meta.decode_max_len = max(decode_ctx)
    for k, (prefix, chunk) in enumerate(prefill):
        r = nd + k
        meta.prefills.append(PrefillChunk(len(ids), chunk, prefix + chunk, torch.tensor(tables[r])))
        for p in range(prefix, prefix + chunk):
            ids.append(int(torch.randint(0, TINY.vocab_size, (1,), generator=g)))
            pos.append(p)
            slots.append(tables[r][p // BLOCK] * BLOCK + p % BLOCK)
    meta.slot_mapping = torch.tensor(slots)
    return torch.tensor(ids), torch.tensor(pos), meta, kv
