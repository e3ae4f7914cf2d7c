"""Tiny random HF checkpoints of every supported family, for parity tests, benchmarks and
examples (needs `transformers` and `tokenizers`)."""
from __future__ import annotations

import os

import torch

VOCAB = 384


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte, plus <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def hf_config(family: str, **over):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
                  eos_token_id=1, initializer_range=0.08)
    common.update(over)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=256, num_local_experts=8,
                                num_experts_per_tok=2, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=256, moe_intermediate_size=96, num_experts=8,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=192,
                                 norm_topk_prob=False, decoder_sparse_step=1, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=96, num_experts=8,
                                 num_experts_per_tok=2, norm_topk_prob=True, **common)
    if family == "llama":
        return tf.LlamaConfig(intermediate_size=256, **common)
    if family == "qwen2":
        return tf.Qwen2Config(intermediate_size=256, **common)
    raise ValueError(family)


def make_checkpoint(family: str, path: str, seed: int = 0, dtype=torch.float32, **over):
    """Save a tiny random model of ``family`` (and a byte tokenizer) to ``path``; return the
    HF model in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, **over)
    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM, "llama": tf.LlamaForCausalLM,
           "qwen2": tf.Qwen2ForCausalLM}[family]
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():
        # Larger router weights make expert choices decisive, so tiny float differences
        # never flip a top-k pick; biases, absent or zero by default, get real values.
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2:
                p.normal_(0, 0.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            elif name == "lm_head.weight":
                p.mul_(4.0)  # wider logit gaps: no near-ties between the top two tokens
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    byte_tokenizer().save(os.path.join(path, "tokenizer.json"))
    return model
