"""RoPE scaling variants against transformers: prefill logits of a tiny Llama per variant."""
import pytest
import torch

from disagg.kv import PagedKVCache
from disagg.model import AttentionMetadata, CausalLM
from disagg.model.tiny import make_checkpoint

VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rope_scaling_matches_hf(variant, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rope = dict(VARIANTS[variant], rope_theta=10000.0)
        # max_position_embeddings below the prompt length, so dynamic NTK actually rescales.
        hf = make_checkpoint("llama", str(tmp_path), seed=5, rope_parameters=rope,
                             max_position_embeddings=32)
        model = CausalLM.from_pretrained(str(tmp_path), dtype="float32")
        assert model.rope.rope_type == variant
        ids = torch.randint(2, 380, (48,), generator=torch.Generator().manual_seed(1))
        cfg = model.config
        kv = PagedKVCache(cfg.num_hidden_layers, 8, 8, cfg.num_key_value_heads, cfg.head_dim)
        kv.allocate("r", len(ids))
        meta = AttentionMetadata.build([(len(ids), len(ids), kv.block_table("r"))], 8,
                                       kv.slot_mapping("r"))
        ours = model.forward(ids, torch.arange(len(ids)), meta, kv.caches)
        with torch.no_grad():
            ref = hf(ids[None]).logits[0]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(n)
