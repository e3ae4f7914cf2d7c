"""The decoder-only transformer for every supported family, on the library's MoE ops.

Weights are plain tensors (no ``nn.Module``): the runtime only runs inference, and skipping
module dispatch keeps the per-layer Python cost low, which matters for small-batch decode.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from .attention import AttentionMetadata, paged_attention
from .config import ModelConfig
from .loader import WeightStore
from .rope import RotaryEmbedding, apply_rope

# The library's CPU kernels take their AVX-512 paths where torch does, unless DISAGG_NO_AVX512
# or DISAGG_NO_SIMD is set to something other than "" or "0" (include/disagg/cpu_features.h).
_HAVE_AVX512 = (torch.backends.cpu.get_cpu_capability() == "AVX512"
                and not any(os.environ.get(v, "") not in ("", "0")
                            for v in ("DISAGG_NO_AVX512", "DISAGG_NO_SIMD")))

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm (normalise in float32, cast back, then scale), one ``rms_norm`` op call."""
    return ops.rms_norm(x, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` through the library's ``linear`` op (about twice BLAS's speed at the
    sizes of these models on the benchmark CPU, decode and prefill alike); without AVX-512,
    or for a non-contiguous weight (a view some layouts hand in), ``F.linear`` itself."""
    if _HAVE_AVX512 and weight.is_contiguous() and not x.is_cuda:
        return ops.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _act(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu", "gelu_pytorch_tanh"):
        return (lambda x: F.gelu(x, approximate="tanh")) if name.endswith("tanh") else F.gelu
    raise ValueError(f"unsupported hidden_act {name!r}")


class DenseMLP:
    """SwiGLU MLP with gate and up fused into one matmul."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act):
        self.gate_up, self.down, self.act = gate_up, down, act
        self.inter = down.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(x, self.gate_up)
        return linear(self.act(h[:, :self.inter]) * h[:, self.inter:], self.down)


class MoE:
    """Routed experts: ``route``, then the experts, then the weighted combine; plus
    Qwen2-MoE's gated shared expert.

    With SiLU experts (every supported family) one ``moe_experts`` call does the experts and
    the combine for any number of tokens on CPUs with AVX-512 (elsewhere for up to
    ``FUSED_MAX_ROWS`` assignments): it reads each used expert's weights once for all its
    tokens and needs no permuted copy. Measured on one core of the benchmark CPU it beat the
    layout path below at every size tried (top-2 of 8 experts, hidden 128 / 256: 57 vs 215 us
    and 231 vs 1076 us at 16 tokens, 3.8 vs 4.9 ms and 10.7 vs 18.5 ms at 1024 tokens), and
    its result for a token does not depend on the other tokens of the batch. Other
    activations go through ``moe_layout`` -> ``moe_permute`` -> matmuls -> ``moe_combine``: the
    padded ``[E, capacity, H]`` layout with one batched matmul pair while padding stays cheap,
    else the compact layout with one matmul pair per expert over its ``expert_offsets``
    segment.

    Parameters
    ----------
    gate : Tensor [E, H]
        Router weight.
    gate_up : Tensor [E, 2I, H]; down : Tensor [E, H, I]
        As stored by HF; kept packed for ``moe_experts_packed`` on CPUs with AVX-512 (see
        :meth:`set_expert_weights`), else as ``w13``, ``w2`` (the matmul path uses transposed
        views).
    """

    # Without AVX-512 the kernel runs its portable (AVX2) path, which beats the layout path
    # at decode sizes only (191 vs 202 us at 16 tokens, hidden 128; 12.1 vs 4.2 ms at 1024).
    FUSED_MAX_ROWS = None if _HAVE_AVX512 else 64

    def __init__(self, gate, gate_up, down, top_k: int, renormalize: bool, act,
                 shared: Optional[DenseMLP] = None, shared_gate: Optional[torch.Tensor] = None):
        self.gate = gate
        self.num_experts = gate.shape[0]
        self.inter = down.shape[2]
        self.hidden = down.shape[1]
        self.top_k, self.renormalize, self.act = top_k, renormalize, act
        self.shared, self.shared_gate = shared, shared_gate
        self.fused = act is F.silu
        self._w13 = self._w2 = self._packed = None
        self.set_expert_weights(gate_up, down)

    def set_expert_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Install HF-layout expert weights. SiLU experts on a CPU with AVX-512 keep them only
        packed (``pack_moe_weights``, same bytes): ``moe_experts_packed`` then runs the panel
        path for every batch size with ``moe_experts``' results bit for bit, and does not
        repack panels for each prefill."""
        if self.fused and _HAVE_AVX512 and gate_up.device.type == "cpu":
            self._packed = ops.pack_moe_weights(gate_up, down)
            self._w13 = self._w2 = None
        else:
            self._w13, self._w2, self._packed = gate_up.contiguous(), down.contiguous(), None

    @property
    def w13(self) -> torch.Tensor:
        """``[E, 2I, H]`` (unpacked on demand when the weights are kept packed)."""
        if self._packed is not None:
            return ops.unpack_moe_weights(*self._packed, self.hidden, self.inter)[0]
        return self._w13

    @property
    def w2(self) -> torch.Tensor:
        """``[E, H, I]`` (unpacked on demand when the weights are kept packed)."""
        if self._packed is not None:
            return ops.unpack_moe_weights(*self._packed, self.hidden, self.inter)[1]
        return self._w2

    @property
    def expert_dtype(self) -> torch.dtype:
        return (self._packed[0] if self._packed is not None else self._w13).dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.gate)
        r = ops.route(logits, self.top_k, renormalize=self.renormalize)
        E, I, k = self.num_experts, self.inter, self.top_k
        rows = x.shape[0] * k
        # On CUDA moe_experts is the layout -> permute -> grouped GEMMs -> combine composite
        # of the library's CUDA ops, with no host sync.
        if self._packed is not None and not x.is_cuda:
            out = ops.moe_experts_packed(x, r.ids, r.weights, *self._packed, I)
        elif self.fused and (x.is_cuda or self.FUSED_MAX_ROWS is None
                             or rows <= self.FUSED_MAX_ROWS):
            out = ops.moe_experts(x, r.ids, r.weights, self.w13, self.w2)
        else:
            w13t, w2t = self.w13.transpose(1, 2), self.w2.transpose(1, 2)
            if w13t.dtype != x.dtype:  # bf16 experts of a float32 run (see _expert_weight_dtype)
                w13t, w2t = w13t.to(x.dtype), w2t.to(x.dtype)
            cap = int(r.counts.max())
            if rows <= 512 and E * cap <= 2 * rows:
                lay = ops.moe_layout(r.ids, E, capacity=cap, slots=r.slots)
                xp = ops.moe_permute(x, lay.src, k).view(E, cap, -1)
                h = torch.bmm(xp, w13t)
                y = torch.bmm(self.act(h[..., :I]) * h[..., I:], w2t).view(E * cap, -1)
            else:
                lay = ops.moe_layout(r.ids, E)
                xp = ops.moe_permute(x, lay.src, k)
                y = torch.empty_like(xp)
                offs = lay.expert_offsets.tolist()
                for e in range(E):
                    s, t = offs[e], offs[e + 1]
                    if t == s:
                        continue
                    h = torch.mm(xp[s:t], w13t[e])
                    torch.mm(self.act(h[:, :I]) * h[:, I:], w2t[e], out=y[s:t])
            out = ops.moe_combine(y, lay.dest, r.weights, out_dtype=x.dtype)
        if self.shared is not None:
            out = out + torch.sigmoid(linear(x, self.shared_gate)) * self.shared(x)
        return out


def _weight_dtype(ws: WeightStore, names: list, dtype: torch.dtype) -> torch.dtype:
    """bfloat16 for weights a bf16 checkpoint stores, in a float32 run on a CPU whose kernels
    (``linear``, ``moe_experts``: AVX-512) widen bf16 weights as they read them: the products
    are exact, so the results are the float32 ones bit for bit, and decode streams half the
    bytes. Otherwise the compute dtype."""
    if (dtype == torch.float32 and _HAVE_AVX512
            and all(ws.stored_dtype(n) == torch.bfloat16 for n in names if ws.has(n))):
        return torch.bfloat16
    return dtype


def _expert_weight_dtype(ws: WeightStore, names: list, dtype: torch.dtype, act):
    """:func:`_weight_dtype` for routed experts, which the narrow kernels serve for SiLU
    experts only."""
    return _weight_dtype(ws, names, dtype) if act is F.silu else dtype


def moe_weight_names(cfg: ModelConfig, ws: WeightStore, i: int):
    """Checkpoint prefix of layer ``i``'s MoE block and its (gate, up, down) expert names."""
    p = f"model.layers.{i}."
    if cfg.family == "mixtral":
        # Original Mixtral names (w1 = gate, w3 = up, w2 = down) or the fused layout.
        m = p + "block_sparse_moe." if ws.has(p + "block_sparse_moe.gate.weight") else p + "mlp."
        return m, ("w1", "w3", "w2")
    return p + "mlp.", ("gate_proj", "up_proj", "down_proj")


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, w: dict, mlp):
        self.cfg = cfg
        self.w = w
        self.mlp = mlp
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size = self.nh * self.hd
        self.kv_size = self.nkv * self.hd
        self.scale = self.hd ** -0.5
        # Decode steps take one fused op (RoPE, K/V append, attention) unless q/k are
        # normalised between the projection and RoPE.
        self.fused_decode = "q_norm" not in w

    def project_qkv(self, h: torch.Tensor, cos, sin):
        """Input norm, fused QKV projection, optional q/k norms and RoPE: ``(q, k, v)`` with
        ``[N, heads, head_dim]`` shapes (this layer's heads: all, or a TP rank's share).

        The parallel layers call it unbound on themselves (same attributes), hence the
        explicit class in the call below."""
        x = rms_norm(h, self.w["input_norm"], self.cfg.rms_norm_eps)
        return DecoderLayer.qkv_rope(self, x, cos, sin)

    def qkv_rope(self, x: torch.Tensor, cos, sin):
        """:meth:`project_qkv` after the input norm (``x`` already normalised)."""
        w, eps = self.w, self.cfg.rms_norm_eps
        qkv = linear(x, w["qkv"], w.get("qkv_bias"))
        N = qkv.shape[0]
        qs, ks = self.q_size, self.kv_size
        v = qkv[:, qs + ks:].reshape(N, self.nkv, self.hd)
        if "q_norm" in w:
            q = rms_norm(qkv[:, :qs].reshape(N, self.nh, self.hd), w["q_norm"], eps)
            k = rms_norm(qkv[:, qs:qs + ks].reshape(N, self.nkv, self.hd), w["k_norm"], eps)
            qk = torch.cat((q, k), 1)
        else:
            qk = qkv[:, :qs + ks].view(N, self.nh + self.nkv, self.hd)
        # q and k heads rotate together: one RoPE call per layer instead of two.
        qk = apply_rope(qk, cos, sin)
        return qk[:, :self.nh], qk[:, self.nh:], v

    def __call__(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata,
                 cache: torch.Tensor) -> torch.Tensor:
        """The layer on hidden states ``h``; returns the new hidden states (``h`` untouched)."""
        h = h.clone()
        x = rms_norm(h, self.w["input_norm"], self.cfg.rms_norm_eps)
        m = self.forward_fused(h, x, cos, sin, meta, cache)
        h += m
        return h

    def forward_fused(self, h: torch.Tensor, x: torch.Tensor, cos, sin, meta: AttentionMetadata,
                      cache: torch.Tensor, decode_rope=None) -> torch.Tensor:
        """The layer on the residual stream ``h`` (updated in place with the attention
        output) and its normalised input ``x``; returns the MLP output, which the caller adds
        to ``h`` together with the next norm (one ``add_rms_norm``).

        ``decode_rope``: HF's ``(cos, sin)`` of every row when ``meta.row_attention()``
        describes the step (each row a query over its sequence's first keys); the attention is
        then one ``paged_decode_attention_rope`` call from the fused projection."""
        w = self.w
        N = x.shape[0]
        if decode_rope is not None and self.fused_decode:
            qkv = linear(x, w["qkv"], w.get("qkv_bias"))
            tables, ctx = meta.row_attention()
            a = ops.paged_decode_attention_rope(
                qkv, decode_rope[0], decode_rope[1], cache, tables, ctx, self.nh, self.scale,
                meta.sliding_window or 0)
        else:
            q, k, v = self.qkv_rope(x, cos, sin)
            a = paged_attention(q, k, v, cache, meta, self.scale)
        o = linear(a.reshape(N, self.q_size), w["o"], w.get("o_bias"))
        return self.mlp(ops.add_rms_norm(h, o, w["post_norm"], self.cfg.rms_norm_eps))


class CausalLM:
    """A loaded model. ``forward`` runs one step over a flat batch of new tokens.

    Use :meth:`from_pretrained` to load an HF folder.

    ``after_layer`` (optional, default None): a callable ``f(layer_index)`` that ``forward``
    calls after each decoder layer has run (that layer's K/V for the whole step are then in
    the cache), so a disaggregated prefill worker can ship finished layers while later ones
    are still being computed.
    """

    after_layer = None

    def __init__(self, cfg: ModelConfig, embed, layers, norm, lm_head, dtype: torch.dtype):
        self.config = cfg
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.dtype = dtype
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings,
                                    cfg.rope_scaling)
        self._all_fused_decode = all(layer.fused_decode for layer in layers)

    @classmethod
    def from_pretrained(cls, path: str, dtype="auto") -> "CausalLM":
        """Load ``config.json`` + safetensors from ``path``.

        Parameters
        ----------
        dtype : "auto", str or torch.dtype
            ``"auto"`` keeps the checkpoint's ``torch_dtype`` (float16 becomes bfloat16, which
            CPUs handle better); otherwise float32 / bfloat16 / float16.

        Raises
        ------
        ValueError
            Unknown architecture or dtype. ``KeyError``: a missing tensor, named.
        """
        cfg = ModelConfig.from_file(path)
        if dtype == "auto":
            dtype = _DTYPES.get(cfg.torch_dtype, torch.float32)
            if dtype == torch.float16:
                dtype = torch.bfloat16
        elif isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
            dtype = _DTYPES[dtype]
        ws = WeightStore(path, dtype)
        return cls._build(cfg, ws, dtype)

    @classmethod
    def _build(cls, cfg: ModelConfig, ws: WeightStore, dtype) -> "CausalLM":
        act = _act(cfg.hidden_act)
        embed = ws.require("model.embed_tokens.weight")
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            # projections a bf16 checkpoint stores stay bf16 in a float32 run (exact widening)
            pdt = _weight_dtype(ws, [a + f"{n}_proj.weight" for n in "qkvo"], dtype)
            w = {
                "input_norm": ws.require(p + "input_layernorm.weight"),
                "post_norm": ws.require(p + "post_attention_layernorm.weight"),
                "qkv": torch.cat([ws.require(a + f"{n}_proj.weight", pdt) for n in "qkv"]),
                "o": ws.require(a + "o_proj.weight", pdt),
            }
            if cfg.attention_bias or ws.has(a + "q_proj.bias"):
                w["qkv_bias"] = torch.cat([ws.require(a + f"{n}_proj.bias") for n in "qkv"])
            if ws.has(a + "o_proj.bias"):  # Llama's attention_bias covers o_proj too
                w["o_bias"] = ws.get(a + "o_proj.bias")
            if cfg.qk_norm:
                w["q_norm"] = ws.require(a + "q_norm.weight")
                w["k_norm"] = ws.require(a + "k_norm.weight")
            layers.append(DecoderLayer(cfg, w, cls._mlp(cfg, ws, i, act)))
        norm = ws.require("model.norm.weight")
        if cfg.tie_word_embeddings or not ws.has("lm_head.weight"):
            if not cfg.tie_word_embeddings:
                raise KeyError(f"checkpoint {ws.path!r} is missing tensor 'lm_head.weight'")
            lm_head = embed
        else:
            lm_head = ws.get("lm_head.weight", _weight_dtype(ws, ["lm_head.weight"], dtype))
        return cls(cfg, embed, layers, norm, lm_head, dtype)

    @staticmethod
    def _mlp(cfg: ModelConfig, ws: WeightStore, i: int, act):
        p = f"model.layers.{i}."
        if not cfg.is_moe_layer(i):
            names = [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
            wdt = _weight_dtype(ws, names, ws.dtype)
            return DenseMLP(torch.cat([ws.require(names[0], wdt), ws.require(names[1], wdt)]),
                            ws.require(names[2], wdt), act)
        E = cfg.num_experts
        m, names = moe_weight_names(cfg, ws, i)
        gate = ws.require(m + "gate.weight")
        fused = ws.has(m + "experts.gate_up_proj")
        g, u, d = names
        expert_names = ([m + "experts.gate_up_proj", m + "experts.down_proj"] if fused else
                        [m + f"experts.{e}.{n}.weight" for e in range(E) for n in (g, u, d)])
        wdt = _expert_weight_dtype(ws, expert_names, ws.dtype, act)
        if fused:
            gate_up = ws.get(m + "experts.gate_up_proj", wdt)
            down = ws.require(m + "experts.down_proj", wdt)
        else:
            gate_up = torch.stack([torch.cat([ws.require(m + f"experts.{e}.{g}.weight", wdt),
                                              ws.require(m + f"experts.{e}.{u}.weight", wdt)])
                                   for e in range(E)])
            down = torch.stack([ws.require(m + f"experts.{e}.{d}.weight", wdt)
                                for e in range(E)])
        shared = shared_gate = None
        if cfg.shared_expert_intermediate_size:
            s = m + "shared_expert."
            names = [s + f"{n}_proj.weight" for n in ("gate", "up", "down")]
            sdt = _weight_dtype(ws, names, ws.dtype)
            shared = DenseMLP(torch.cat([ws.require(names[0], sdt), ws.require(names[1], sdt)]),
                              ws.require(names[2], sdt), act)
            shared_gate = ws.require(m + "shared_expert_gate.weight")
        return MoE(gate, gate_up, down, cfg.num_experts_per_tok, cfg.norm_topk_prob, act,
                   shared, shared_gate)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list, logits_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One step over a flat batch.

        Parameters
        ----------
        input_ids, positions : Tensor [N] int64
        meta : AttentionMetadata
        kv_caches : list of Tensor [num_blocks, 2, block_size, kv_heads, head_dim], per layer
        logits_rows : Tensor [M] int64, optional
            Rows whose logits are wanted (e.g. the last token of each sequence); all if None.

        Returns
        -------
        Tensor [M, vocab] float32 logits.
        """
        eps = self.config.rms_norm_eps
        h = self.embed[input_ids]  # a fresh tensor: the residual stream, updated in place
        N = h.shape[0]
        decode_rope = cos = sin = None
        if N and self._all_fused_decode and meta.row_attention() is not None:
            # every row a query at the end of its sequence's keys: its position is ctx_len - 1
            decode_rope = self.rope.cos_sin_hf(positions, self.dtype,
                                               int(positions.max()))
        if decode_rope is None or not self._all_fused_decode:
            cos, sin = self.rope.cos_sin(positions, self.dtype)
        layers = self.layers
        hook = self.after_layer
        x = ops.rms_norm(h, layers[0].w["input_norm"], eps)
        for i, (layer, cache) in enumerate(zip(layers, kv_caches)):
            m = layer.forward_fused(h, x, cos, sin, meta, cache, decode_rope)
            # this layer's residual add fused with the next layer's input norm (or the final one)
            nxt = layers[i + 1].w["input_norm"] if i + 1 < len(layers) else self.norm
            x = ops.add_rms_norm(h, m, nxt, eps)
            if hook is not None:  # layer i's K/V are in the cache
                hook(i)
        if logits_rows is not None:
            x = x[logits_rows]
        return linear(x, self.lm_head).float()
