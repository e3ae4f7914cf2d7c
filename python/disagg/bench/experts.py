"""expert_gemm (the MoE FFN's grouped GEMM) against one torch matmul per expert, and against
one dense torch.matmul of the same total FLOPs (``dense_ratio``: the dense matmul's time over
the op's; 1.0 means the grouping costs nothing). On CPUs with AVX-512 also the model's CPU
experts: moe_experts_packed (weights packed at load) against moe_experts on the HF layout,
top-2 of 8 experts, float32 tokens."""
from __future__ import annotations

import os

import torch

from .. import ops
from .. import reference as ref
from .common import median_time, row

SHAPES = [  # (T, E, k, K, N): tokens, experts, top-k, input and output width of one GEMM
    (4096, 64, 8, 2048, 2816),    # DeepSeek-V2-Lite-like gate_up (2 x 1408)
    (4096, 64, 8, 1408, 2048),    # and its down projection
    (8192, 8, 2, 4096, 28672),    # Mixtral-8x7B-like gate_up (2 x 14336)
    (256, 64, 8, 2048, 2816),     # a decode-sized batch: many small problems
]
QUICK = [(256, 8, 2, 256, 512), (64, 16, 4, 128, 256)]
# (T, H, I, weight dtype): the tiny Mixtral's and the packaged model's expert sizes
PACKED = [(1, 128, 256, "float32"), (16, 128, 256, "float32"), (1024, 128, 256, "float32"),
          (1, 256, 512, "bfloat16"), (16, 256, 512, "bfloat16"), (1024, 256, 512, "bfloat16")]


def add_arguments(p) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")


def run(args) -> list:
    device, dtype = args.device, getattr(torch, args.dtype)
    rows = []
    for T, E, k, K, N in (QUICK if args.quick or device.type == "cpu" else SHAPES):
        g = torch.Generator().manual_seed(T + E + K)
        r = ops.route(torch.randn(T, E, generator=g).to(device), k)
        lay = ops.moe_layout(r.ids, E)
        M = T * k
        x = torch.randn(M, K, generator=g).to(dtype).to(device)
        w = (torch.randn(E, N, K, generator=g) / K ** 0.5).to(dtype).to(device)
        off = lay.expert_offsets
        if args.check:
            tol = 3e-2 if dtype != torch.float32 else 1e-3
            torch.testing.assert_close(ops.expert_gemm(x, w, off).float(),
                                       ref.expert_gemm(x, w, off).float(), atol=tol, rtol=tol)
        o = off.tolist()

        def per_expert():
            out = torch.zeros(M, N, dtype=dtype, device=device)
            for e in range(E):
                if o[e + 1] > o[e]:
                    torch.mm(x[o[e]:o[e + 1]], w[e].t(), out=out[o[e]:o[e + 1]])
            return out

        wd = w[0].t().contiguous()  # [K, N]: one dense GEMM with all M rows, same FLOPs
        t_op = median_time(lambda: ops.expert_gemm(x, w, off), device, args.min_run_time)
        extra = {}
        if device.type == "cuda" and dtype == torch.bfloat16:
            # the SM80 CUTLASS kernel too (the default on a 9.x device is the Hopper one)
            prev = os.environ.get("DISAGG_GROUPED_GEMM")
            os.environ["DISAGG_GROUPED_GEMM"] = "sm80"
            try:
                extra["sm80_median_s"] = median_time(lambda: ops.expert_gemm(x, w, off), device,
                                                     args.min_run_time)
            finally:
                if prev is None:
                    del os.environ["DISAGG_GROUPED_GEMM"]
                else:
                    os.environ["DISAGG_GROUPED_GEMM"] = prev
        t_loop = median_time(per_expert, device, args.min_run_time)
        t_dense = median_time(lambda: torch.matmul(x, wd), device, args.min_run_time)
        flops = 2.0 * M * N * K
        rows.append(row(op="expert_gemm", device=device, shape=dict(T=T, E=E, k=k, K=K, N=N),
                        dtype=dtype, median_s=t_op, baseline="torch.mm per expert",
                        baseline_median_s=t_loop, tflops=flops / t_op / 1e12,
                        dense_median_s=t_dense, dense_ratio=t_dense / t_op, **extra))
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512":
        rows += _packed_rows(args)
    return rows


def _packed_rows(args) -> list:
    rows = []
    for T, H, I, wdt in PACKED[1::3] if args.quick else PACKED:
        g = torch.Generator().manual_seed(T + H)
        E = 8
        x = torch.randn(T, H, generator=g)
        w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(getattr(torch, wdt))
        w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(getattr(torch, wdt))
        r = ops.route(torch.randn(T, E, generator=g), 2)
        w13p, w2p = ops.pack_moe_weights(w13, w2)
        if args.check:
            assert torch.equal(ops.moe_experts_packed(x, r.ids, r.weights, w13p, w2p, I),
                               ops.moe_experts(x, r.ids, r.weights, w13, w2))
        t_op = median_time(lambda: ops.moe_experts_packed(x, r.ids, r.weights, w13p, w2p, I),
                           args.device, args.min_run_time)
        t_base = median_time(lambda: ops.moe_experts(x, r.ids, r.weights, w13, w2), args.device,
                             args.min_run_time)
        rows.append(row(op="moe_experts_packed", device=args.device,
                        shape=dict(T=T, E=E, k=2, H=H, I=I, weights=wdt), dtype=torch.float32,
                        median_s=t_op, baseline="moe_experts (HF layout)",
                        baseline_median_s=t_base,
                        tflops=2.0 * T * 2 * 3 * H * I / t_op / 1e12))
    return rows
