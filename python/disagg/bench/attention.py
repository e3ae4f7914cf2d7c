"""Paged decode attention against gathering the pages and calling SDPA (what an engine without
a paged kernel writes), and against a plain copy of the KV bytes it reads."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .. import reference as ref
from .common import copy_time, median_time, row

SHAPES = [  # (B, Hq, Hkv, D, block_size, ctx): KV read of 0.5-1 GB in bf16 for the larger ones
    (64, 32, 8, 128, 16, 2048),
    (8, 32, 8, 128, 16, 16384),   # long contexts: split-K over many chunks
    (256, 64, 8, 128, 16, 512),   # big batch, GQA 8
    (32, 32, 32, 128, 16, 1024),  # MHA
]
QUICK = [(4, 8, 2, 64, 16, 256), (2, 8, 2, 128, 16, 1024)]


def add_arguments(p) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")


def gather_sdpa(q, cache, table, lens, scale):
    """Gather each sequence's pages into [B, Hkv, L, D], then SDPA with a length mask."""
    B, Hq, D = q.shape
    Hkv = cache.shape[3]
    kv = cache[table.long()]  # [B, M, 2, bs, Hkv, D]
    k = kv[:, :, 0].reshape(B, -1, Hkv, D).transpose(1, 2)
    v = kv[:, :, 1].reshape(B, -1, Hkv, D).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < lens.long()[:, None]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=Hq != Hkv)
    return out.squeeze(2)


def run(args) -> list:
    device, dtype = args.device, getattr(torch, args.dtype)
    rows = []
    for B, Hq, Hkv, D, bs, ctx in (QUICK if args.quick or device.type == "cpu" else SHAPES):
        g = torch.Generator().manual_seed(B + ctx)
        lens = torch.randint(ctx // 2, ctx + 1, (B,), generator=g)
        mb = -(-ctx // bs)
        nb = B * mb
        cache = torch.randn(nb, 2, bs, Hkv, D, generator=g).to(dtype).to(device)
        table = torch.randperm(nb, generator=g).view(B, mb).to(torch.int32).to(device)
        q = torch.randn(B, Hq, D, generator=g).to(dtype).to(device)
        lens = lens.to(torch.int32).to(device)
        scale = D ** -0.5
        if args.check:
            got = ops.paged_decode_attention(q, cache, table, lens, scale)
            want = ref.paged_decode_attention(q, cache, table, lens, scale)
            tol = 2e-2 if dtype != torch.float32 else 1e-4
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        nbytes = int(lens.sum()) * 2 * Hkv * D * cache.element_size()
        t_copy = copy_time(nbytes, device, args.min_run_time)
        t_op = median_time(lambda: ops.paged_decode_attention(q, cache, table, lens, scale), device,
                           args.min_run_time)
        t_base = median_time(lambda: gather_sdpa(q, cache, table, lens, scale), device,
                             args.min_run_time)
        rows.append(row(op="paged_decode_attention", device=device,
                        shape=dict(B=B, Hq=Hq, Hkv=Hkv, D=D, bs=bs, ctx=ctx), dtype=dtype,
                        median_s=t_op, nbytes=nbytes, copy_s=t_copy,
                        baseline="gather pages + SDPA (length mask)", baseline_median_s=t_base))
    return rows
