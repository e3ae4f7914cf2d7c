"""Rotary position embeddings with the scaling variants HF configs use.

Frequencies follow transformers' ``modeling_rope_utils`` so positions rotate exactly as there:
``default``, ``linear``, ``dynamic`` (NTK, recomputed from the largest position of a forward),
``llama3`` and ``yarn``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor = p["factor"]
    low, high = p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor") or max_pos / orig
    attn = p.get("attention_factor")
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attn is None:
        attn = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
                if mscale and mscale_all else get_mscale(factor))
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return inter * (1 - keep) + extra * keep, float(attn)


class RotaryEmbedding:
    """cos/sin tables for a config's RoPE; ``cos_sin(positions)`` gives ``[N, head_dim]`` each.

    Parameters
    ----------
    head_dim : int
    base : float
        ``rope_theta``.
    max_position_embeddings : int
    scaling : dict, optional
        HF ``rope_scaling`` / ``rope_parameters`` with ``rope_type``.
    """

    def __init__(self, head_dim: int, base: float, max_position_embeddings: int,
                 scaling: Optional[dict] = None):
        self.dim = head_dim
        self.base = base
        self.max_pos = max_position_embeddings
        self.scaling = dict(scaling or {})
        self.rope_type = self.scaling.get("rope_type", "default")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: "
                             + ", ".join(SUPPORTED_ROPE_TYPES))
        self.attention_factor = 1.0
        inv = _base_inv_freq(base, head_dim)
        if self.rope_type == "linear":
            inv = inv / self.scaling["factor"]
        elif self.rope_type == "llama3":
            inv = _llama3(inv, self.scaling)
        elif self.rope_type == "yarn":
            inv, self.attention_factor = _yarn(base, head_dim, self.scaling, max_position_embeddings)
        self.inv_freq = inv
        # Positions repeat every step; a cached table turns RoPE into an index_select.
        self._table_len = 0
        self._cos = self._sin = None

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        factor = self.scaling["factor"]
        seq_len = max(seq_len, self.max_pos)
        base = self.base * ((factor * seq_len / self.max_pos) - (factor - 1)) ** (
            self.dim / (self.dim - 2))
        return _base_inv_freq(base, self.dim)

    def _table(self, inv_freq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(n, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * self.attention_factor
        # The first half carries rotate-half's minus sign, so apply_rope needs no negation.
        half = sin.shape[-1] // 2
        sin[:, :half] = -sin[:, :half]
        return emb.cos() * self.attention_factor, sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (first half negated) for each position, ``[N, head_dim]``."""
        n = int(positions.max()) + 1 if positions.numel() else 1
        if self.rope_type == "dynamic" and n > self.max_pos:
            cos, sin = self._table(self._dynamic_inv_freq(n), n)
            return cos[positions].to(dtype), sin[positions].to(dtype)
        self._ensure(n, dtype)
        return self._cos[positions], self._sin[positions]

    def _ensure(self, n: int, dtype: torch.dtype) -> None:
        if n > self._table_len or self._cos.dtype != dtype:
            size = max(n, min(self.max_pos, 4096), self._table_len)
            cos, sin = self._table(self.inv_freq, size)
            self._cos, self._sin, self._table_len = cos.to(dtype), sin.to(dtype), size
            plain = sin.clone()
            half = plain.shape[-1] // 2
            plain[:, :half] = -plain[:, :half]
            self._sin_plain = plain.to(dtype)

    def cos_sin_hf(self, positions: torch.Tensor, dtype: torch.dtype, max_position: int
                   ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """HF's cos and sin (no sign folded in) for each position, ``[N, head_dim]``, for the
        fused decode op; ``max_position`` is ``positions.max()``. None where the tables
        depend on the step (dynamic NTK past the trained length)."""
        n = max_position + 1
        if self.rope_type == "dynamic" and n > self.max_pos:
            return None
        self._ensure(n, dtype)
        return self._cos[positions], self._sin_plain[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [N, heads, head_dim]`` (rotate-half convention) by per-token ``cos`` and
    signed ``sin`` from :meth:`RotaryEmbedding.cos_sin`:
    ``x * cos + cat(-x2, x1) * sin == x * cos + roll(x, half) * signed_sin``."""
    return torch.addcmul(x * cos[:, None, :], x.roll(x.shape[-1] // 2, -1), sin[:, None, :])
