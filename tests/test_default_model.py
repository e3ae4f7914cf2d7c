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
