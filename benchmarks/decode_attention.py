"""Micro-benchmark of the C++ paged decode-attention kernel: one layer's decode attention for B sequences of L
tokens (SmolLM2-135M's heads: 9 query, 3 KV, head_dim 64), scattered 16-token pages, best of 30 calls.

    .venv/bin/python benchmarks/decode_attention.py [--dtype float32|bfloat16] [--batch 64] [--len 200]
"""
import argparse
import time

import torch

from nanoflow.kernels import cpu_ext


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--len", type=int, default=200)
    args = ap.parse_args()
    ext = cpu_ext.load()
    if ext is None:
        raise SystemExit("the C++ kernels could not be built here")
    dtype, (B, L), (hq, hkv, d, bs) = getattr(torch, args.dtype), (args.batch, args.len), (9, 3, 64, 16)
    gen = torch.Generator().manual_seed(0)
    nblk = B * -(-L // bs)
    kc = torch.randn(nblk + 10, bs, hkv, d, generator=gen).to(dtype)
    vc = torch.randn(nblk + 10, bs, hkv, d, generator=gen).to(dtype)
    q = torch.randn(B, hq, d, generator=gen).to(dtype)
    tables = torch.randperm(nblk + 10, generator=gen)[:nblk].view(B, -1).to(torch.int32)
    lens = torch.full((B,), L, dtype=torch.int32)
    best = float("inf")
    for i in range(33):
        t0 = time.perf_counter()
        ext.paged_decode(q, kc, vc, tables, lens, d ** -0.5)
        if i >= 3:  # warm-up calls excluded
            best = min(best, time.perf_counter() - t0)
    kv_bytes = 2 * B * L * hkv * d * kc.element_size()
    print(f"{args.dtype} B={B} L={L}: {best * 1e3:.2f} ms per layer, {kv_bytes / best / 1e9:.1f} GB/s of K/V")


if __name__ == "__main__":
    main()
