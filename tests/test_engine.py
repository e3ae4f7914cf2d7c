"""Engine behaviour: batch independence, preemption and aborts without leaks, bad input,
stop conditions, streaming, sampling, the generate CLI."""
import json
import random

import pytest
import torch

from disagg.model.tiny import make_checkpoint

from disagg import LLM, SamplingParams
from disagg.engine import Engine

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: see test_model_hf_parity
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mixtral"))
    make_checkpoint("mixtral", path, seed=11)
    return path


def prompts(n, seed=0, lo=2, hi=40):
    g = random.Random(seed)
    return [[g.randrange(2, 380) for _ in range(g.randrange(lo, hi))] for _ in range(n)]


def run_alone(path, ps, **params):
    llm = LLM(path, dtype="float32")
    return [llm.generate({"prompt_token_ids": p}, SamplingParams(**params))[0].outputs[0].token_ids
            for p in ps]


def test_outputs_do_not_depend_on_the_batch(ckpt):
    ps = prompts(6, seed=1)
    alone = run_alone(ckpt, ps, max_tokens=20, **GREEDY)
    seeded = run_alone(ckpt, ps[:3], max_tokens=12, temperature=0.9, top_p=0.95, seed=5)
    # Same prompts batched together, in another order, with a tight token budget and few
    # sequences per step, so requests join and leave mid-way.
    llm = LLM(ckpt, dtype="float32", max_num_seqs=3, max_num_batched_tokens=20, block_size=4)
    order = [4, 0, 5, 2, 1, 3]
    outs = llm.generate([{"prompt_token_ids": ps[i]} for i in order],
                        SamplingParams(max_tokens=20, **GREEDY))
    for i, o in zip(order, outs):
        assert o.outputs[0].token_ids == alone[i]
    mixed = [{"prompt_token_ids": p} for p in ps[:3]] + [{"prompt_token_ids": ps[4]}]
    sp = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=5)] * 3 + \
         [SamplingParams(max_tokens=30, **GREEDY)]
    outs = llm.generate(mixed, sp)
    assert [o.outputs[0].token_ids for o in outs[:3]] == seeded


def test_equal_length_prompts_batched_in_one_attention_call(ckpt, monkeypatch):
    # On the SDPA path (contexts over ROW_ATTN_MAX_CTX) consecutive whole prompts of one
    # length share a batched causal SDPA call; a prompt of another length in between splits
    # the run. Tokens match each prompt run alone.
    from disagg.model.attention import AttentionMetadata

    monkeypatch.setattr(AttentionMetadata, "ROW_ATTN_MAX_CTX", 0)
    ps = prompts(4, seed=3, lo=17, hi=18) + prompts(1, seed=4, lo=9, hi=10) + \
        prompts(3, seed=5, lo=17, hi=18)
    alone = run_alone(ckpt, ps, max_tokens=10, **GREEDY)
    llm = LLM(ckpt, dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(max_tokens=10,
                                                                              **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == alone


@pytest.mark.parametrize("window", [None, 6])
def test_row_attention_equals_the_sdpa_path(ckpt, monkeypatch, window):
    # Steps whose contexts fit ROW_ATTN_MAX_CTX attend row by row through the paged decode op
    # (prefill chunks with earlier context and decode rows in one call); above it, or with it
    # set to 0, through write_kv + SDPA. Same tokens, logits within float rounding.
    from disagg.model.attention import AttentionMetadata

    ps = prompts(5, seed=7, lo=10, hi=45)

    def run():
        llm = LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=24,
                  block_size=4)
        llm.engine.model.config.sliding_window = window
        got = []
        fwd = llm.engine.model.forward
        llm.engine.model.forward = lambda *a, **k: got.append(fwd(*a, **k)) or got[-1]
        outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                            SamplingParams(max_tokens=12, **GREEDY))
        return [o.outputs[0].token_ids for o in outs], got

    rows, rows_logits = run()
    monkeypatch.setattr(AttentionMetadata, "ROW_ATTN_MAX_CTX", 0)
    sdpa, sdpa_logits = run()
    assert rows == sdpa
    assert len(rows_logits) == len(sdpa_logits)
    for a, b in zip(rows_logits, sdpa_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_no_leaked_blocks_after_random_aborts_and_preemption(ckpt):
    ps = prompts(12, seed=2, lo=5, hi=60)
    ref = run_alone(ckpt, ps, max_tokens=24, **GREEDY)
    # 24 blocks of 4 tokens cannot hold 12 requests of up to 84 tokens: preemption must kick in.
    eng = Engine(ckpt, dtype="float32", num_blocks=24, block_size=4, max_num_seqs=8,
                 max_num_batched_tokens=32)
    rng = random.Random(3)
    ids, aborted, done = {}, set(), {}
    for i, p in enumerate(ps):
        ids[eng.add_request(p, SamplingParams(max_tokens=24, **GREEDY))] = i
    steps = 0
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        eng.kv.check_invariants()
        if rng.random() < 0.08:
            live = [r for r in ids if r not in done and r not in aborted]
            if live:
                victim = rng.choice(live)
                assert eng.abort(victim)
                aborted.add(victim)
        assert steps < 5000
    for out in eng.step():  # outputs of the last aborts
        done[out.request_id] = out
    assert eng.scheduler.num_preemptions > 0
    assert aborted
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    eng.kv.check_invariants()
    for rid, i in ids.items():
        out = done[rid]
        if rid in aborted:
            assert out.outputs[0].finish_reason == "abort"
        else:  # recomputed requests still produce exactly the undisturbed tokens
            assert out.outputs[0].token_ids == ref[i]


def test_bad_input_is_rejected_per_request(ckpt):
    llm = LLM(ckpt, dtype="float32", max_model_len=64)
    good = {"prompt_token_ids": [5, 6, 7]}
    bad = ["", {"prompt_token_ids": []}, {"prompt_token_ids": list(range(2, 70))},
           {"prompt_token_ids": [5, 10 ** 6]}, {"nothing": 1}]
    outs = llm.generate([good] + bad + [good], SamplingParams(max_tokens=4, **GREEDY))
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 4
    assert outs[-1].outputs[0].token_ids == outs[0].outputs[0].token_ids
    msgs = [o.error for o in outs[1:-1]]
    assert all(m for m in msgs)
    assert "empty" in msgs[0] and "empty" in msgs[1]
    assert "max_model_len" in msgs[2] and "out of range" in msgs[3]
    assert all(o.outputs[0].finish_reason == "error" for o in outs[1:-1])
    for kw, field in [(dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-1), "max_tokens"),
                      (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                      (dict(top_p=1.5), "top_p"), (dict(top_k=-5), "top_k"),
                      (dict(temperature=float("nan")), "temperature"), (dict(stop=[""]), "stop"),
                      (dict(repetition_penalty=0), "repetition_penalty"),
                      (dict(stop_token_ids=[-1]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)
    # A SamplingParams mutated into a bad state is caught per request too.
    sp = SamplingParams(max_tokens=3)
    sp.max_tokens = 0
    outs = llm.generate([good, good], [sp, SamplingParams(max_tokens=2, **GREEDY)])
    assert "max_tokens" in outs[0].error and len(outs[1].outputs[0].token_ids) == 2
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_stop_conditions_and_streaming(ckpt):
    llm = LLM(ckpt, dtype="float32")
    tok = llm.get_tokenizer()
    p = {"prompt_token_ids": [10, 20, 30, 40]}
    full = llm.generate(p, SamplingParams(max_tokens=16, **GREEDY))[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 16
    # stop token id: ends at (and keeps) the first occurrence
    t = full.token_ids[5]
    o = llm.generate(p, SamplingParams(max_tokens=16, stop_token_ids=[t], **GREEDY))[0].outputs[0]
    k = full.token_ids.index(t)
    assert o.token_ids == full.token_ids[:k + 1] and o.finish_reason == "stop" and o.stop_reason == t
    # stop string: text cut before it
    text = tok.decode(full.token_ids)
    s = text[6:8]
    o = llm.generate(p, SamplingParams(max_tokens=16, stop=[s], **GREEDY))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == s
    assert o.text == text[:text.find(s)]
    o = llm.generate(p, SamplingParams(max_tokens=16, stop=s, include_stop_str_in_output=True,
                                       **GREEDY))[0].outputs[0]
    assert o.text == text[:text.find(s) + len(s)]
    # eos ends generation unless ignored
    eos_prompt = {"prompt_token_ids": [10, 20, 30, 40]}
    eng = llm.engine
    eng.eos_token_ids = [full.token_ids[3]]
    o = llm.generate(eos_prompt, SamplingParams(max_tokens=16, temperature=0))[0].outputs[0]
    assert o.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[3]) + 1]
    eng.eos_token_ids = []
    # streaming: one callback per token, cumulative, the last one finished
    seen = []
    rid = eng.add_request([10, 20, 30, 40], SamplingParams(max_tokens=6, **GREEDY),
                          callback=lambda out: seen.append(list(out.outputs[0].token_ids)))
    eng.run()
    assert seen == [full.token_ids[:i] for i in range(1, 7)]
    assert rid not in eng.requests


def test_abort_and_failing_callback(ckpt):
    eng = Engine(ckpt, dtype="float32")
    a = eng.add_request([5, 6, 7, 8], SamplingParams(max_tokens=50, **GREEDY))

    def boom(out):
        raise RuntimeError("client went away")

    b = eng.add_request([9, 9, 9], SamplingParams(max_tokens=50, **GREEDY), callback=boom)
    c = eng.add_request([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY))
    first = [o for o in eng.step() if o.finished]  # b's callback fails on its first token
    assert eng.abort(a) and not eng.abort(a) and not eng.abort("unknown")
    done = {o.request_id: o for o in first + eng.run()}
    assert done[a].outputs[0].finish_reason == "abort"
    assert done[b].outputs[0].finish_reason == "error" and "client went away" in done[b].error
    assert done[c].outputs[0].finish_reason == "length"
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], SamplingParams(), request_id="x")
        eng.add_request([1], SamplingParams(), request_id="x")


def test_sampling(ckpt):
    llm = LLM(ckpt, dtype="float32")
    p = {"prompt_token_ids": [3, 4, 5]}
    greedy = llm.generate(p, SamplingParams(max_tokens=10, **GREEDY))[0].outputs[0].token_ids
    top1 = llm.generate(p, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=1,
                                          ignore_eos=True))[0].outputs[0].token_ids
    assert top1 == greedy
    sp = dict(max_tokens=10, temperature=1.0, seed=42, ignore_eos=True)
    x = llm.generate(p, SamplingParams(**sp))[0].outputs[0].token_ids
    assert x == llm.generate(p, SamplingParams(**sp))[0].outputs[0].token_ids
    assert x != llm.generate(p, SamplingParams(**dict(sp, seed=43)))[0].outputs[0].token_ids
    # a heavy repetition penalty forbids repeats of prompt tokens where greedy had them
    rep = llm.generate(p, SamplingParams(max_tokens=10, repetition_penalty=1e6, temperature=0,
                                         ignore_eos=True))[0].outputs[0].token_ids
    assert len(set(rep)) == len(rep) and not set(rep) & {3, 4, 5}
    pres = llm.generate(p, SamplingParams(max_tokens=10, presence_penalty=2.0,
                                          frequency_penalty=2.0, **GREEDY))[0].outputs[0]
    assert len(pres.token_ids) == 10


def test_text_prompts_and_generate_cli(ckpt, tmp_path):
    from disagg.generate import main

    llm = LLM(ckpt, dtype="float32")
    out = llm.generate("hello", SamplingParams(max_tokens=5, **GREEDY))[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("hello")
    pf = tmp_path / "prompts.json"
    pf.write_text(json.dumps(["hello", {"prompt_token_ids": [7, 8, 9]}, ""]))
    of = tmp_path / "out.json"
    assert main(["--model", ckpt, "--prompts", str(pf), "--output", str(of), "--max-tokens", "5",
                 "--temperature", "0", "--ignore-eos", "--dtype", "float32"]) == 0
    res = json.loads(of.read_text())
    assert res[0]["token_ids"] == out.outputs[0].token_ids and res[0]["text"] == out.outputs[0].text
    assert len(res[1]["token_ids"]) == 5 and "error" in res[2]


def test_default_model_resolves_to_the_package():
    from importlib import resources

    from disagg.model import resolve_model_path

    pkg = resources.files("disagg").joinpath("models", "default")
    assert pkg.joinpath("config.json").is_file(), "the packaged default model is missing"
    assert resolve_model_path("default") == str(pkg)
    out = LLM("default").generate("def ", SamplingParams(max_tokens=4, temperature=0))
    assert out[0].error is None and out[0].outputs[0].token_ids
