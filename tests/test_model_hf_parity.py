"""Greedy token identity with HF transformers on tiny random checkpoints of every family."""
import pytest
import torch

from disagg.model.tiny import make_checkpoint

from disagg import LLM, SamplingParams
from disagg.kv import PagedKVCache
from disagg.model import AttentionMetadata, CausalLM

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "llama", "qwen2"]
PROMPT_LENS = [3, 11, 29, 50]
NEW_TOKENS = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: on a shared 2-core box, spinning OpenMP workers cost far more
    # than they save (a 20x slowdown was seen under load).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory):
    fam = request.param
    path = str(tmp_path_factory.mktemp(fam))
    hf = make_checkpoint(fam, path, seed=FAMILIES.index(fam))
    g = torch.Generator().manual_seed(100)
    prompts = [torch.randint(2, 380, (n,), generator=g).tolist() for n in PROMPT_LENS]
    refs, last_logits, margins = [], [], []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            refs.append(out.sequences[0, len(p):].tolist())
            last_logits.append(out.logits[-1][0].float())
            top2 = torch.stack([lg[0].float().topk(2).values for lg in out.logits])
            margins.append(float((top2[:, 0] - top2[:, 1]).min()))
    return fam, path, prompts, refs, last_logits, min(margins)


def test_checkpoint_has_no_near_ties(family_ckpt):
    # The parity test is only meaningful when greedy choices are clear-cut.
    assert family_ckpt[5] > 1e-3


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prefill", "chunked-prefill"])
def test_greedy_tokens_match_hf(family_ckpt, chunked):
    fam, path, prompts, refs, _, _ = family_ckpt
    # A budget of 16 tokens splits the longer prompts over several steps, batched with decodes.
    llm = LLM(path, dtype="float32", enable_chunked_prefill=chunked,
              max_num_batched_tokens=16 if chunked else 512, block_size=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    for o, ref in zip(outs, refs):
        assert o.outputs[0].token_ids == ref, fam
        assert o.outputs[0].finish_reason == "length"
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_last_step_logits_match_hf(family_ckpt):
    fam, path, prompts, refs, last_logits, _ = family_ckpt
    model = CausalLM.from_pretrained(path, dtype="float32")
    cfg = model.config
    kv = PagedKVCache(cfg.num_hidden_layers, 64, 8, cfg.num_key_value_heads, cfg.head_dim)
    p, ref = prompts[-1], refs[-1]
    seq = p + ref[:-1]  # the last step's input is everything but the final generated token
    n0 = 0
    logits = None
    # Prefill in chunks of 13, then decode one token at a time: the engine's two paths.
    steps = [(a, min(a + 13, len(p))) for a in range(0, len(p), 13)]
    steps += [(i, i + 1) for i in range(len(p), len(seq))]
    kv.allocate("r", 0)
    for a, b in steps:
        kv.append("r", b - a)
        meta = AttentionMetadata.build([(b - a, b, kv.block_table("r"))], 8,
                                       kv.slot_mapping("r", a, b))
        logits = model.forward(torch.tensor(seq[a:b]), torch.arange(a, b), meta, kv.caches,
                               torch.tensor([b - a - 1]))
        n0 = b
    assert n0 == len(seq)
    want = last_logits[-1]
    rel = (logits[0] - want).abs().max() / want.abs().max()
    assert rel < 1e-4, f"{fam}: relative logit error {rel:.2e}"


def test_sharded_checkpoint_and_bf16(tmp_path):
    hf = make_checkpoint("mixtral", str(tmp_path / "one"), seed=7)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="200KB")
    import os
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    a = CausalLM.from_pretrained(str(tmp_path / "one"), dtype="float32")
    b = CausalLM.from_pretrained(str(tmp_path / "sharded"), dtype="float32")
    assert torch.equal(a.layers[1].mlp.w13, b.layers[1].mlp.w13)
    c = CausalLM.from_pretrained(str(tmp_path / "one"), dtype="bfloat16")
    assert c.layers[0].w["qkv"].dtype == torch.bfloat16
    llm = LLM(str(tmp_path / "one"), dtype="bfloat16")
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4,
                                                                      ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_load_errors_name_the_problem(tmp_path):
    import json
    import os

    make_checkpoint("llama", str(tmp_path), seed=3)
    cfg_path = os.path.join(tmp_path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        CausalLM.from_pretrained(str(tmp_path))
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["num_hidden_layers"] = 3  # the checkpoint has 2
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(KeyError, match="model.layers.2"):
        CausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "nope"))
