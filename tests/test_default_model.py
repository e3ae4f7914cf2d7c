"""The packaged default checkpoints: present, small, loadable by transformers and tokenizers."""
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MODELS_DIR = Path(__file__).resolve().parents[1] / "python" / "disagg" / "models"
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json", "training_info.json"]


def test_default_model_path():
    from disagg.models import default_model_path

    for name in ("default", "default-draft"):
        path = Path(default_model_path(name))
        assert (path / "config.json").is_file()
    with pytest.raises(ValueError, match="unknown packaged model"):
        default_model_path("no-such-model")


@pytest.mark.parametrize("name,arch,max_mb", [("default", "MixtralForCausalLM", 40),
                                              ("default-draft", "LlamaForCausalLM", 5.5)])
def test_files_and_sizes(name, arch, max_mb):
    folder = MODELS_DIR / name
    for f in FILES:
        assert (folder / f).is_file(), f"{name}/{f} missing"
    assert json.loads((folder / "config.json").read_text())["architectures"] == [arch]
    assert (folder / "model.safetensors").stat().st_size < max_mb * 1e6


def test_tokenizers_agree_and_round_trip():
    tok_t = tokenizers.Tokenizer.from_file(str(MODELS_DIR / "default" / "tokenizer.json"))
    tok_hf = transformers.AutoTokenizer.from_pretrained(str(MODELS_DIR / "default"))
    # Same tokenizer for target and draft, or speculative decoding would compare different ids.
    assert (MODELS_DIR / "default" / "tokenizer.json").read_bytes() == (
        MODELS_DIR / "default-draft" / "tokenizer.json").read_bytes()
    for text in ["def fibonacci(n):\n    return n", "héllo wörld ✓ 日本語\t\r\n", "", "\x00\xff"]:
        ids = tok_t.encode(text).ids
        assert tok_hf(text)["input_ids"] == ids
        assert tok_t.decode(ids) == text
        assert tok_hf.decode(ids) == text
    assert tok_hf.eos_token == "<|endoftext|>"
    assert tok_hf.apply_chat_template([{"role": "user", "content": "import os"}], tokenize=False) == "import os"


def test_transformers_loads_and_generates():
    tok = transformers.AutoTokenizer.from_pretrained(str(MODELS_DIR / "default"))
    ids = tok("def fibonacci(n):", return_tensors="pt")["input_ids"]
    outs = []
    for name in ("default", "default-draft"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(MODELS_DIR / name), dtype=torch.float32)
        out = model.generate(ids, do_sample=False, max_new_tokens=16)
        assert out.shape[1] > ids.shape[1]
        outs.append(out)
    # Greedy generation is deterministic.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(MODELS_DIR / "default"),
                                                              dtype=torch.float32)
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=16), outs[0])


def test_float32_run_keeps_bf16_experts_and_matches_transformers():
    """Run in float32, the bf16 checkpoint's routed experts, attention projections and LM head
    stay bf16 where the CPU kernels widen them as they read (AVX-512): the tokens equal those
    with float32 copies of the weights and those of transformers in float32."""
    from disagg import LLM, SamplingParams
    from disagg.model.model import MoE

    prompts = ["def fibonacci(n):", "import os\nimport sys\n", "The quick brown fox"]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = LLM("default", dtype="float32")
    moes = [layer.mlp for layer in llm.engine.model.layers if isinstance(layer.mlp, MoE)]
    assert moes
    narrow = MoE.FUSED_MAX_ROWS is None
    want = torch.bfloat16 if narrow else torch.float32
    model = llm.engine.model
    assert {m.w13.dtype for m in moes} == {want}
    # the attention projections and the LM head too
    assert {lay.w[k].dtype for lay in model.layers for k in ("qkv", "o")} | \
        {model.lm_head.dtype} == {want}
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    for m in moes:
        m.set_expert_weights(m.w13.float(), m.w2.float())
        assert m.expert_dtype == torch.float32
    for lay in model.layers:
        lay.w["qkv"], lay.w["o"] = lay.w["qkv"].float(), lay.w["o"].float()
    model.lm_head = model.lm_head.float()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == got
    tok = llm.get_tokenizer()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(MODELS_DIR / "default"),
                                                           dtype=torch.float32)
    for p, ids in zip(prompts, got):
        x = torch.tensor([tok.encode(p)])
        out = hf.generate(x, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                          pad_token_id=0)
        assert out[0, x.shape[1]:].tolist() == ids
