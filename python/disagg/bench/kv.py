"""Paged KV cache: kv_pack / kv_unpack (plain and quantized) and kv_compact vs the PyTorch composite.

The composite is what an engine writes today: per-layer ``index_select`` of the request's blocks
and a ``cat`` into one buffer to send, and per-layer ``index_copy_`` back on the receiver.
Bytes are those read plus written by the op; ``copy_ratio`` compares with one plain copy of the
same number of bytes measured in the same run.
"""
from __future__ import annotations

import argparse

import torch

from .. import ops
from .. import reference as ref
from .common import copy_time, median_time, row

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--spare-blocks", type=int, default=64,
                   help="extra blocks in each cache, so the request's blocks are scattered")


def _composite_pack(caches, table, quant):
    # what an engine writes without the op: whole blocks of every layer, concatenated
    x = torch.cat([c.index_select(0, table) for c in caches])
    if quant == "none":
        return x
    # per (layer x block, K/V, head) scale, as kv_pack computes it
    xf = x.float()
    amax = xf.abs().amax(dim=(2, 4), keepdim=True)
    inv = torch.where(amax > 0, _QMAX[quant] / amax, torch.zeros_like(amax))
    y = xf * inv
    q = y.round().clamp_(-127, 127).to(torch.int8) if quant == "int8" else y.to(torch.float8_e4m3fn)
    return q, amax / _QMAX[quant]


def _composite_unpack(x, caches, table, quant, scale=None):
    L = len(caches)
    x = x.view(L, -1, *caches[0].shape[1:])
    for i, c in enumerate(caches):
        xi = x[i]
        if quant != "none":
            xi = (xi.float() * scale.view(L, -1, *scale.shape[1:])[i]).to(c.dtype)
        c.index_copy_(0, table, xi)


def run(args) -> list[dict]:
    dev = args.device
    dtype = _DTYPES[args.dtype]
    L, H, D, T, bs = args.layers, args.kv_heads, args.head_dim, args.tokens, args.block_size
    nblk = -(-T // bs)
    nb = nblk + args.spare_blocks
    g = torch.Generator().manual_seed(0)
    src = [torch.randn((nb, 2, bs, H, D), generator=g).to(dtype).to(dev) for _ in range(L)]
    dst = [torch.randn((nb, 2, bs, H, D), generator=g).to(dtype).to(dev) for _ in range(L)]
    table = torch.randperm(nb, generator=g)[:nblk].to(dev)
    table32 = table.to(torch.int32)
    shape = {"layers": L, "kv_heads": H, "head_dim": D, "tokens": T, "block_size": bs}
    mrt = args.min_run_time
    payload = L * 2 * T * H * D * dtype.itemsize
    rows = []

    if args.check:
        for quant in ("none", "int8", "fp8_e4m3"):
            got = ops.kv_pack(src[:2], table32, T, quant=quant)
            if not torch.equal(got.cpu(), ref.kv_pack([c.cpu() for c in src[:2]], table32.cpu(), T,
                                                       quant=quant)):
                raise AssertionError(f"kv_pack(quant={quant}) differs from the reference")
            a = [c.clone() for c in dst[:2]]
            b = [c.cpu().clone() for c in dst[:2]]
            ops.kv_unpack(got, a, table32)
            ref.kv_unpack(got.cpu(), b, table32.cpu())
            if not all(torch.equal(x.cpu(), y) for x, y in zip(a, b)):
                raise AssertionError(f"kv_unpack(quant={quant}) differs from the reference")

    # ---- plain pack / unpack: payload read once, written once -----------------------------
    nbytes = 2 * payload
    t_copy = copy_time(nbytes, dev, mrt)
    t_comp_pack = median_time(lambda: _composite_pack(src, table, "none"), dev, mrt)
    t_pack = median_time(lambda: ops.kv_pack(src, table32, T), dev, mrt)
    rows.append(row(op="kv_pack", device=dev, shape=shape, dtype=dtype, median_s=t_pack,
                    baseline="index_select+cat per layer", baseline_median_s=t_comp_pack,
                    nbytes=nbytes, copy_s=t_copy))
    out = torch.empty(ops.kv_pack_nbytes(L, T, H, D, dtype), dtype=torch.uint8, device=dev)
    t_into = median_time(lambda: ops.kv_pack_into(src, table32, T, out), dev, mrt)
    rows.append(row(op="kv_pack_into", device=dev, shape=shape, dtype=dtype, median_s=t_into,
                    baseline="index_select+cat per layer", baseline_median_s=t_comp_pack,
                    nbytes=nbytes, copy_s=t_copy))
    buf = ops.kv_pack(src, table32, T)
    flat = _composite_pack(src, table, "none")
    t_comp_unpack = median_time(lambda: _composite_unpack(flat, dst, table, "none"), dev, mrt)
    t_unpack = median_time(lambda: ops.kv_unpack(buf, dst, table32), dev, mrt)
    rows.append(row(op="kv_unpack", device=dev, shape=shape, dtype=dtype, median_s=t_unpack,
                    baseline="index_copy_ per layer", baseline_median_s=t_comp_unpack,
                    nbytes=nbytes, copy_s=t_copy))

    # ---- quantized: read the payload, write 1 byte per element (+ scales) -----------------
    for quant in ("int8", "fp8_e4m3"):
        qbytes = payload + ops.kv_pack_nbytes(L, T, H, D, dtype, quant, bs)
        t_qcopy = copy_time(qbytes, dev, mrt)
        t_comp = median_time(lambda: _composite_pack(src, table, quant), dev, mrt)
        t_q = median_time(lambda: ops.kv_pack(src, table32, T, quant=quant), dev, mrt)
        rows.append(row(op=f"kv_pack[{quant}]", device=dev, shape=shape, dtype=dtype,
                        median_s=t_q, baseline="index_select+cat+quantize", baseline_median_s=t_comp,
                        nbytes=qbytes, copy_s=t_qcopy))
        qbuf = ops.kv_pack(src, table32, T, quant=quant)
        cq, cs = _composite_pack(src, table, quant)
        t_comp_u = median_time(lambda: _composite_unpack(cq, dst, table, quant, cs), dev, mrt)
        t_u = median_time(lambda: ops.kv_unpack(qbuf, dst, table32), dev, mrt)
        rows.append(row(op=f"kv_unpack[{quant}]", device=dev, shape=shape, dtype=dtype,
                        median_s=t_u, baseline="dequantize+index_copy_", baseline_median_s=t_comp_u,
                        nbytes=qbytes, copy_s=t_qcopy))

    # ---- compact: 7 accepted tree nodes after the prompt, all layers ---------------------
    acc = torch.tensor([T - 15, T - 12, T - 11, T - 7, T - 5, T - 2, T - 1], device=dev)
    dst_start = T - 16

    def composite_compact():
        dpos = torch.arange(dst_start, dst_start + acc.numel(), device=dev)
        sb, so = table[acc // bs], acc % bs
        db, do = table[dpos // bs], dpos % bs
        for c in dst:
            c[db, :, do] = c[sb, :, so]

    cbytes = 2 * L * 2 * acc.numel() * H * D * dtype.itemsize
    t_cc = median_time(composite_compact, dev, mrt)
    t_c = median_time(lambda: ops.kv_compact(dst, table32, acc, dst_start), dev, mrt)
    rows.append(row(op="kv_compact", device=dev, shape=dict(shape, accepted=acc.numel()),
                    dtype=dtype, median_s=t_c, baseline="advanced indexing per layer",
                    baseline_median_s=t_cc, nbytes=cbytes, copy_s=copy_time(cbytes, dev, mrt)))
    return rows
