"""The MoE layer's GPU path: routing, layout, permute, the two expert-grouped GEMMs
(``expert_gemm``: CUTLASS for bf16 on CUDA) and the weighted combine, all on the device with no
host synchronization (the CPU path in ``model.MoE`` reads per-expert counts on the host to pick
between a padded batched matmul and per-expert matmuls; here one grouped GEMM covers both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops


def _grouped_weights(moe):
    """``[E, N, K]`` copies of the expert weights (``nn.Linear`` layout, as ``expert_gemm``
    takes them), made once per layer and device."""
    cached = getattr(moe, "_gpu_grouped", None)
    if cached is None or cached[0].device != moe.w13.device:
        # float32 copies of bf16 experts kept narrow for the CPU kernel (_expert_weight_dtype)
        dt = moe.gate.dtype
        cached = (moe.w13.transpose(1, 2).to(dt).contiguous(),
                  moe.w2.transpose(1, 2).to(dt).contiguous())
        moe._gpu_grouped = cached
    return cached


def moe_forward_gpu(moe, x: torch.Tensor) -> torch.Tensor:
    """``model.MoE.__call__`` for CUDA tensors; same results up to matmul rounding."""
    w_gate_up, w_down = _grouped_weights(moe)
    logits = F.linear(x, moe.gate)
    r = ops.route(logits, moe.top_k, renormalize=moe.renormalize)
    lay = ops.moe_layout(r.ids, moe.num_experts)
    xp = ops.moe_permute(x, lay.src, moe.top_k)
    h = ops.expert_gemm(xp, w_gate_up, lay.expert_offsets)
    inter = moe.inter
    a = (moe.act(h[:, :inter]) * h[:, inter:]).contiguous()
    y = ops.expert_gemm(a, w_down, lay.expert_offsets)
    out = ops.moe_combine(y, lay.dest, r.weights, out_dtype=x.dtype)
    if moe.shared is not None:
        out = out + torch.sigmoid(F.linear(x, moe.shared_gate)) * moe.shared(x)
    return out
