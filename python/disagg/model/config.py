"""Model configuration: the subset of an HF ``config.json`` the runtime needs, per family."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

# Architectures the loader understands, with the family that decides layer layout.
SUPPORTED_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass
class ModelConfig:
    """What the model code needs from an HF config, normalised across families.

    Attributes
    ----------
    architecture : str
        The HF class name (``config.json`` ``architectures[0]``).
    family : str
        One of ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``llama``, ``qwen2``, ``qwen3``.
    num_experts : int
        Routed experts per MoE layer; 0 for a dense model.
    mlp_only_layers, decoder_sparse_step
        Qwen-MoE: which layers use a dense MLP instead of experts.
    shared_expert_intermediate_size : int
        Qwen2-MoE's shared expert (0 when there is none).
    rope_scaling : dict or None
        HF ``rope_scaling`` / ``rope_parameters`` (``rope_type`` plus its fields).
    """

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2 families have it)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    # MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: list = field(default_factory=list)
    torch_dtype: str = "float32"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` uses experts (HF's rule for the Qwen-MoE families)."""
        if not self.is_moe:
            return False
        if self.family == "mixtral":
            return True
        if layer in self.mlp_only_layers:
            return False
        return self.decoder_sparse_step > 0 and (layer + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed HF ``config.json``.

        Raises
        ------
        ValueError
            For an unknown or missing architecture, naming it and the supported ones.
        """
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} (config.json 'architectures'); supported: "
                + ", ".join(sorted(SUPPORTED_ARCHITECTURES)))
        family = SUPPORTED_ARCHITECTURES[arch]
        H = int(cfg["hidden_size"])
        nh = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or H // nh
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        # transformers 5 moved rope_theta/rope_scaling into rope_parameters; accept both.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or None
        theta = cfg.get("rope_theta")
        if theta is None and isinstance(rope, dict):
            theta = rope.get("rope_theta")
        if isinstance(rope, dict):
            rtype = rope.get("rope_type", rope.get("type", "default"))
            rope = dict(rope, rope_type=rtype)
            if rtype == "default":
                rope = None
        kw: dict[str, Any] = dict(
            architecture=arch,
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=H,
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=nh,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or nh),
            head_dim=int(head_dim),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=rope,
            hidden_act=cfg.get("hidden_act", "silu"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )
        if family in ("qwen2", "qwen2_moe"):
            kw["attention_bias"] = True
        else:
            kw["attention_bias"] = bool(cfg.get("attention_bias", False))
        kw["qk_norm"] = family in ("qwen3", "qwen3_moe")
        if family == "mixtral":
            kw["num_experts"] = int(cfg["num_local_experts"])
            kw["num_experts_per_tok"] = int(cfg["num_experts_per_tok"])
            kw["moe_intermediate_size"] = kw["intermediate_size"]
            kw["norm_topk_prob"] = True
        elif family in ("qwen2_moe", "qwen3_moe"):
            # transformers 5 writes Qwen3-MoE's expert count as num_local_experts.
            kw["num_experts"] = int(cfg.get("num_experts") or cfg["num_local_experts"])
            kw["num_experts_per_tok"] = int(cfg["num_experts_per_tok"])
            kw["moe_intermediate_size"] = int(cfg["moe_intermediate_size"])
            kw["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
            kw["decoder_sparse_step"] = int(cfg.get("decoder_sparse_step", 1))
            kw["mlp_only_layers"] = list(cfg.get("mlp_only_layers") or [])
            if family == "qwen2_moe":
                kw["shared_expert_intermediate_size"] = int(
                    cfg.get("shared_expert_intermediate_size") or 0)
        if family in ("mixtral", "llama") and cfg.get("sliding_window"):
            # Mixtral/Mistral apply their window on every layer whenever it is set.
            kw["sliding_window"] = int(cfg["sliding_window"])
        elif cfg.get("use_sliding_window"):
            # The Qwen families window only some layers (max_window_layers / layer_types).
            raise ValueError(f"{arch}: use_sliding_window=True is not supported")
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        """Read ``config.json`` from a model folder (or the file itself)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))
