"""Routing ops (route, moe_permute, moe_combine) against the PyTorch an engine would write.

Two yardsticks for the memory-bound ops, both measured in the same run on the same number of
bytes: ``vs copy_`` is a copy between two preallocated buffers (the bandwidth roofline; the fair
comparison for the ``_into`` ops, which write a caller-owned buffer) and ``vs clone`` a copy into
a newly allocated tensor (what any op returning a new tensor pays in page faults).
"""
from __future__ import annotations

import torch

from .. import ops
from .. import reference as ref
from .common import copy_time, median_time, row

ROUTE_SHAPES = [  # (T, E, k, capacity_factor)
    (1, 8, 2, 0.0),
    (128, 8, 2, 1.25),
    (4096, 64, 8, 1.0),
    (4096, 64, 8, 0.0),
    (16384, 256, 8, 1.0),
    (2048, 1024, 6, 1.25),
]
PERMUTE_SHAPES = [  # (T, k, H): expert rows of 64-117 MB, past a 32 MB L3, so the copy they
    (4096, 2, 4096),  # are compared with measures memory bandwidth, not a cache
    (4096, 8, 1024),
    (1024, 8, 7168),
]


def add_arguments(p) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")


def composite_route(logits: torch.Tensor, k: int, capacity: int):
    """Megatron-style routing: softmax -> topk -> renormalise -> capacity by a cumsum over the
    one-hot routing map (token order). Returns the same information as ``ops.route``."""
    T, E = logits.shape
    scores = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(scores, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    if capacity <= 0:
        counts = torch.bincount(idx.reshape(-1), minlength=E)
        return w, idx, counts
    routing_map = torch.zeros(T, E, dtype=torch.int32, device=logits.device).scatter_(1, idx, 1)
    position = torch.cumsum(routing_map, dim=0) * routing_map  # 1-based slot, 0 = not routed
    keep = (position > 0) & (position <= capacity)
    slots = torch.gather(position, 1, idx) - 1
    kept = torch.gather(keep, 1, idx)
    ids = torch.where(kept, idx, torch.full_like(idx, -1))
    return w * kept, ids, slots.masked_fill(~kept, -1), keep.sum(0)


def _route_rows(args, device, dtype):
    rows = []
    shapes = ROUTE_SHAPES[:3] if args.quick else ROUTE_SHAPES
    for T, E, k, cf in shapes:
        g = torch.Generator().manual_seed(T + E)
        logits = torch.randn(T, E, generator=g).to(dtype).to(device)
        C = ops.route_capacity(cf, T, k, E)
        if args.check:
            got = ops.route(logits, k, capacity_factor=cf)
            exp = ref.route(logits.cpu(), k, capacity_factor=cf)
            assert torch.equal(got.ids.cpu(), exp.ids) and torch.equal(got.slots.cpu(), exp.slots), \
                f"route mismatch at T={T} E={E} k={k}"
        t_op = median_time(lambda: ops.route(logits, k, capacity_factor=cf), device, args.min_run_time)
        t_base = median_time(lambda: composite_route(logits, k, C), device, args.min_run_time)
        rows.append(row(op="route", device=device, shape=dict(T=T, E=E, k=k, cf=cf), dtype=dtype,
                        median_s=t_op, baseline="softmax+topk+one-hot cumsum (Megatron)",
                        baseline_median_s=t_base))
    return rows


def _permute_rows(args, device, dtype):
    rows = []
    shapes = PERMUTE_SHAPES[:1] if args.quick else PERMUTE_SHAPES
    E = 64
    for T, k, H in shapes:
        g = torch.Generator().manual_seed(T * k)
        x = torch.randn(T, H, generator=g).to(dtype).to(device)
        r = ops.route(torch.randn(T, E, generator=g).to(device), k)
        lay = ops.moe_layout(r.ids, E)
        src = lay.src[: int(lay.expert_offsets[-1])]
        token_idx = (src.long() // k)
        if args.check:
            assert torch.equal(ops.moe_permute(x, src, k).cpu(), ref.moe_permute(x.cpu(), src.cpu(), k))
        elt = x.element_size()
        nbytes = 2 * src.numel() * H * elt  # read + write every row
        t_copy = copy_time(nbytes, device, args.min_run_time)
        t_fresh = copy_time(nbytes, device, args.min_run_time, fresh=True)
        t_op = median_time(lambda: ops.moe_permute(x, src, k), device, args.min_run_time)
        t_base = median_time(lambda: x.index_select(0, token_idx), device, args.min_run_time)
        rows.append(row(op="moe_permute", device=device, shape=dict(T=T, k=k, H=H), dtype=dtype,
                        median_s=t_op, nbytes=nbytes, copy_s=t_copy,
                        fresh_buffer_copy_ratio=t_fresh / t_op,
                        baseline="x.index_select(0, sorted_idx // k)", baseline_median_s=t_base))

        buf = torch.empty(src.numel(), H, dtype=dtype, device=device)
        t_into = median_time(lambda: ops.moe_permute_into(x, src, k, buf), device, args.min_run_time)
        rows.append(row(op="moe_permute_into", device=device, shape=dict(T=T, k=k, H=H),
                        dtype=dtype, median_s=t_into, nbytes=nbytes, copy_s=t_copy,
                        baseline="torch.index_select(x, 0, sorted_idx // k, out=buf)",
                        baseline_median_s=median_time(
                            lambda: torch.index_select(x, 0, token_idx, out=buf), device,
                            args.min_run_time)))

        y = ops.moe_permute(x, src, k)
        dest = lay.dest
        if args.check:
            torch.testing.assert_close(ops.moe_combine(y, dest, r.weights).cpu(),
                                       ref.moe_combine(y.cpu(), dest.cpu(), r.weights.cpu()))
        nbytes = (src.numel() + T) * H * elt
        t_copy = copy_time(nbytes, device, args.min_run_time)
        d = dest.long().view(T, k)

        def composite_combine():
            return (y[d].float() * r.weights.unsqueeze(-1)).sum(1).to(y.dtype)

        t_fresh = copy_time(nbytes, device, args.min_run_time, fresh=True)
        t_op = median_time(lambda: ops.moe_combine(y, dest, r.weights), device, args.min_run_time)
        t_base = median_time(composite_combine, device, args.min_run_time)
        rows.append(row(op="moe_combine", device=device, shape=dict(T=T, k=k, H=H), dtype=dtype,
                        median_s=t_op, nbytes=nbytes, copy_s=t_copy,
                        fresh_buffer_copy_ratio=t_fresh / t_op,
                        baseline="(y[dest].float() * w).sum(1)", baseline_median_s=t_base))

        cbuf = torch.empty(T, H, dtype=dtype, device=device)
        if args.check:
            ops.moe_combine_into(y, dest, r.weights, cbuf)
            assert torch.equal(cbuf, ops.moe_combine(y, dest, r.weights))
        dw = r.weights.unsqueeze(-1).to(dtype)

        def composite_combine_into():
            # the buffer-reusing composite: gather into the kept buffer, weighted sum in y's dtype
            return torch.sum(y[d] * dw, dim=1, out=cbuf)

        t_into = median_time(lambda: ops.moe_combine_into(y, dest, r.weights, cbuf), device,
                             args.min_run_time)
        rows.append(row(op="moe_combine_into", device=device, shape=dict(T=T, k=k, H=H),
                        dtype=dtype, median_s=t_into, nbytes=nbytes, copy_s=t_copy,
                        baseline="torch.sum(y[dest] * w, 1, out=buf)",
                        baseline_median_s=median_time(composite_combine_into, device,
                                                      args.min_run_time)))
    return rows


def run(args) -> list:
    device = args.device
    dtype = getattr(torch, args.dtype)
    return _route_rows(args, device, dtype) + _permute_rows(args, device, dtype)
