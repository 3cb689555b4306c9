"""llama.cpp peer baseline: continuous batching of many sequences through llama-cpp-python's low-level API.

The high-level ``Llama`` class serves one sequence at a time, which would understate llama.cpp badly on a
throughput benchmark; instead we drive ``llama_decode`` directly (like llama.cpp's own ``batched-bench`` /
``parallel`` examples): up to ``n_parallel`` sequences in flight, one decode token per running sequence
per step, prompt prefill chunked into the remaining batch room, greedy argmax, EOS ignored.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from nanoflow.bench.workloads import BenchRequest, throughput_metrics

_CTX_ALIGN = 256  # llama.cpp pads context sizes to 256; keep per-sequence slices aligned too


def llamacpp_available() -> bool:
    """True when llama-cpp-python is installed (it is an optional `bench` extra)."""
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class _Slot:
    seq_id: int
    req: BenchRequest
    n_fed: int = 0       # prompt tokens already submitted
    generated: int = 0   # output tokens sampled so far
    last_token: int = 0
    tokens: list[int] | None = None  # sampled ids, only when the caller asked to keep them

    @property
    def decoding(self) -> bool:
        return self.generated > 0


class _LlamaCtx:
    """Owns model/context/batch handles and frees them in reverse order."""

    def __init__(self, gguf_path: str, n_seq: int, n_ctx: int, n_threads: int, n_batch: int,
                 flash_attn: bool | None):
        # ggml's OpenMP workers spin-wait at barriers by default; when another process holds a core (shared
        # CI/dev boxes) a 2-thread decode then stalls for seconds. Passive waiting is robust and costs little.
        # libgomp reads this once, when llama.cpp first loads it, so it must precede the import.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import llama_cpp as lc
        self.lc = lc
        # The bindings print every load message to stderr unless their logger is raised above INFO.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        # Extra buffer types put Q4_1 weights in AMX buffers when the CPU advertises AMX; on VMs that
        # advertise but don't enable it (this dev box) the AMX kernels die with SIGILL. Plain CPU path.
        mparams.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(gguf_path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx, cparams.n_seq_max = n_ctx, n_seq
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = n_threads
        # Per-sequence KV streams: each token attends only to its own sequence's cache instead of the
        # whole shared buffer (masked), which is what makes many-sequence decoding cheap in llama.cpp.
        cparams.kv_unified = False
        # Measured here (64 sequences, 2 cores): flash attention off decodes ~20% faster than on/auto.
        fa_types = {None: lc.LLAMA_FLASH_ATTN_TYPE_AUTO, True: lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                    False: lc.LLAMA_FLASH_ATTN_TYPE_DISABLED}
        cparams.flash_attn_type = fa_types[flash_attn]
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context (n_ctx too large?)")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_ctx_seq = lc.llama_n_ctx_seq(self.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def _add(batch, k: int, token: int, pos: int, seq_id: int, want_logits: bool) -> None:
    batch.token[k] = token
    batch.pos[k] = pos
    batch.n_seq_id[k] = 1
    batch.seq_id[k][0] = seq_id
    batch.logits[k] = want_logits


def _fill_batch(batch, slots: list[_Slot], n_batch: int) -> list[tuple[_Slot, int]]:
    """Decode tokens first (one per running sequence), then prompt chunks in the remaining room.
    Returns (slot, batch index) for every position whose logits we sample from."""
    k, outputs = 0, []
    for s in slots:
        if s.decoding and k < n_batch:
            _add(batch, k, s.last_token, s.req.input_len + s.generated - 1, s.seq_id, True)
            outputs.append((s, k))
            k += 1
    for s in slots:
        if s.decoding:
            continue
        take = min(s.req.input_len - s.n_fed, n_batch - k)
        for j in range(take):
            last = s.n_fed + j == s.req.input_len - 1
            _add(batch, k, s.req.prompt_token_ids[s.n_fed + j], s.n_fed + j, s.seq_id, last)
            if last:
                outputs.append((s, k))
            k += 1
        s.n_fed += take
    batch.n_tokens = k
    return outputs


def _serve(lx: _LlamaCtx, requests: list[BenchRequest], n_parallel: int, n_batch: int,
           kept: list[list[int]] | None) -> int:
    """Run every request to exactly its output_len tokens; returns the number of llama_decode calls.
    If ``kept`` is a list of per-request lists, sampled token ids are appended to them."""
    lc = lx.lc
    pending = list(reversed(range(len(requests))))

    def admit(seq_id: int) -> _Slot:
        i = pending.pop()
        return _Slot(seq_id, requests[i], tokens=None if kept is None else kept[i])

    slots = [admit(i) for i in range(min(n_parallel, len(pending)))]
    steps = 0
    while slots:
        outputs = _fill_batch(lx.batch, slots, n_batch)
        rc = lc.llama_decode(lx.ctx, lx.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (1 = no KV slot: raise n_ctx)")
        steps += 1
        finished = []
        for s, k in outputs:
            row = np.ctypeslib.as_array(lc.llama_get_logits_ith(lx.ctx, k), shape=(lx.n_vocab,))
            s.last_token = int(row.argmax())  # greedy; EOS is just another token here (ignore_eos)
            s.generated += 1
            if s.tokens is not None:
                s.tokens.append(s.last_token)
            if s.generated >= s.req.output_len:
                finished.append(s)
        for s in finished:
            lc.llama_memory_seq_rm(lx.mem, s.seq_id, -1, -1)  # free this sequence's KV for the next request
            slots.remove(s)
            if pending:
                slots.append(admit(s.seq_id))
    return steps


def _warmup(lx: _LlamaCtx) -> None:
    """One tiny decode so graph allocation / first-touch isn't billed to the measured run."""
    _add(lx.batch, 0, 1, 0, 0, True)
    lx.batch.n_tokens = 1
    lx.lc.llama_decode(lx.ctx, lx.batch)
    lx.lc.llama_memory_clear(lx.mem, True)


def run_llamacpp(gguf_path: str, requests: list[BenchRequest], n_parallel: int = 64, n_threads: int = 2,
                 n_ctx: int | None = None, keep_tokens: bool = False, flash_attn: bool | None = False) -> dict:
    """Serve ``requests`` with llama.cpp continuous batching; returns the shared throughput metric dict
    (plus ``output_token_ids`` per request when ``keep_tokens``, for parity checks).
    ``flash_attn=None`` lets llama.cpp decide."""
    if not llamacpp_available():
        raise ImportError("llama-cpp-python is not installed: pip install 'nanoflow-serve[bench]'")
    if not requests:
        raise ValueError("no requests")
    n_seq = max(1, min(n_parallel, len(requests)))
    max_len = max(r.input_len + r.output_len for r in requests)
    per_seq = -(-max_len // _CTX_ALIGN) * _CTX_ALIGN
    n_ctx = n_ctx or n_seq * per_seq
    n_batch = max(512, n_seq)  # a decode step of all sequences must fit in one batch
    lx = _LlamaCtx(gguf_path, n_seq, n_ctx, n_threads, n_batch, flash_attn)
    try:
        if lx.n_ctx_seq < max_len:
            raise ValueError(f"per-sequence context {lx.n_ctx_seq} < longest request {max_len}; raise n_ctx")
        _warmup(lx)
        t0 = time.perf_counter()
        kept = [[] for _ in requests] if keep_tokens else None
        steps = _serve(lx, requests, n_seq, n_batch, kept)
        elapsed = time.perf_counter() - t0
    finally:
        lx.close()
    result = {"system": "llama.cpp", **throughput_metrics(requests, elapsed)}
    result.update(n_parallel=n_seq, n_threads=n_threads, n_ctx=n_ctx, n_batch=n_batch, decode_calls=steps,
                  flash_attn=flash_attn,
                  method="llama-cpp-python low-level API, continuous batching, per-sequence KV streams, "
                         "chunked prefill, greedy argmax, EOS ignored; timed after one warm-up decode")
    if keep_tokens:
        result["output_token_ids"] = kept
    return result
