"""Shared test helpers: the one tiny random model, a mixed decode + chunked-prefill step, and a loop that drives
the scheduler without a model."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from nanoflow.engine.request import Request, RequestStatus
from nanoflow.engine.scheduler import ScheduledBatch, Scheduler
from nanoflow.kernels.attention import AttentionMetadata, PrefillChunk
from nanoflow.models.config import ModelConfig
from nanoflow.models.loader import ModelSource, build_model

BLOCK = 4
TINY = ModelConfig("qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=256, qkv_bias=True, name="tiny")


def tiny_model(dtype: torch.dtype = torch.float32):
    """TINY with random weights (seeded)."""
    torch.manual_seed(0)
    model = build_model(ModelSource("dummy", "tiny"), TINY, dtype, seed=0)
    for p in model.parameters():  # larger weights than the dummy init, so errors would show
        p.data.normal_(0, 0.2)
    return model


def tiny_hf_config(**overrides) -> dict:
    """TINY (with `overrides`) as the keyword arguments of a transformers `*Config`."""
    cfg = replace(TINY, **overrides)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings)


def save_tiny_hf_model(path, tokenizer=None, **overrides) -> str:
    """A random Llama of TINY's shape (with `overrides`) saved as an HF directory; with `tokenizer`, that
    tokenizer is saved beside it and sets the vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if tokenizer is not None:
        overrides.setdefault("vocab_size", len(tokenizer))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**tiny_hf_config(**overrides))).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


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


def drive_scheduler(sched: Scheduler, pending: list[Request], *, next_token: Callable[[Request], int] = lambda r: 7,
                    on_batch: Callable[[ScheduledBatch], None] | None = None,
                    on_finish: Callable[[Request, list[Request]], None] | None = None,
                    abort_every: int = 0, max_steps: int = 5000) -> list[Request]:
    """Run the scheduler without a model until every request is done: add one of `pending` (popped from the end)
    every other step, fake-sample `next_token(req)` for every sampling chunk and finish at max_tokens, abort the
    oldest running request every `abort_every` steps. Checks the token budget, that every scheduled request
    runs, the block manager's invariants and progress; `on_batch` adds checks of each batch before its tokens
    are sampled, `on_finish(req, finished)` sees each request finished at max_tokens. Returns the finished
    requests (aborted ones included)."""
    cfg, bm, finished, step = sched.config, sched.block_manager, [], 0
    while pending or sched.has_unfinished():
        if pending and step % 2 == 0:
            sched.add(pending.pop())
        batch = sched.schedule()
        assert batch.num_tokens <= cfg.dense_batch, "token budget exceeded"
        if on_batch is not None:
            on_batch(batch)
        for c in batch.chunks:
            req = c.req
            assert req.status == RequestStatus.RUNNING
            if c.samples:
                req.output_token_ids.append(next_token(req))
                if len(req.output_token_ids) >= req.params.max_tokens:
                    sched.finish(req, "length")
                    sched.free_kv(req)
                    finished.append(req)
                    if on_finish is not None:
                        on_finish(req, finished)
        if abort_every and step % abort_every == abort_every - 1 and sched.running:
            victim = sched.running[0]
            sched.finish(victim, "abort")
            sched.free_kv(victim)
            finished.append(victim)
        bm.check_invariants()
        step += 1
        assert step < max_steps, "no progress: a request was never finished"
    return finished
