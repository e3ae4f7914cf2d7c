"""Speculative decoding in the engine: greedy outputs identical with speculation on and off
(both drafters, several tree shapes, mixed batches), the KV cache after speculative steps equal
to plain decoding's, no leaked blocks, and the SpeculativeDecoder API."""
import random

import pytest
import torch

from disagg.model.tiny import make_checkpoint

from disagg import SamplingParams, SpeculativeDecoder
from disagg.engine import Engine
from disagg.model import CausalLM
from disagg.spec import SpecConfig, TreeShape

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("target"))
    make_checkpoint("mixtral", path, seed=11)
    return path


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("draft"))
    make_checkpoint("llama", path, seed=5, num_hidden_layers=1)
    return path


def prompts(n, seed=0):
    g = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:  # repetitive prompts give n-gram lookup something to find
            unit = [g.randrange(2, 380) for _ in range(g.randrange(2, 6))]
            out.append((unit * 8)[:g.randrange(8, 30)])
        else:
            out.append([g.randrange(2, 380) for _ in range(g.randrange(2, 30))])
    return out


def generate(engine, ps, params):
    params = params if isinstance(params, list) else [params] * len(ps)
    ids = {engine.add_request({"prompt_token_ids": p}, sp): i
           for i, (p, sp) in enumerate(zip(ps, params))}
    res = [None] * len(ps)
    for o in engine.run():
        assert o.error is None, o.error
        res[ids[o.request_id]] = o.outputs[0].token_ids
    return res


def assert_no_leaks(engine):
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    d = engine.spec.drafter
    if d is not None:
        d.kv.check_invariants()
        assert d.kv.num_free_blocks == d.kv.num_blocks
    assert not engine.spec.state


@pytest.fixture(scope="module")
def reference(target):
    ps = prompts(8, seed=1)
    eng = Engine(target, dtype="float32", block_size=4)
    return ps, generate(eng, ps, SamplingParams(max_tokens=24, **GREEDY))


@pytest.mark.parametrize("method,tree", [
    ("ngram", "chain:3"), ("ngram", "static:3,2,1"),
    ("draft", "chain:4"), ("draft", "static:3,2,1"), ("draft", "dynamic:10,4,3"),
])
def test_greedy_identical(target, draft, reference, method, tree):
    ps, want = reference
    cfg = SpecConfig(method=method, tree=tree, draft_model=draft if method == "draft" else None)
    eng = Engine(target, dtype="float32", block_size=4, speculative=cfg)
    got = generate(eng, ps, SamplingParams(max_tokens=24, **GREEDY))
    assert got == want
    m = eng.spec_metrics()
    assert m["verify_steps"] > 0 and 1 <= m["acceptance_length"]
    assert_no_leaks(eng)


def test_greedy_mixed_batch(target, draft, reference):
    """Requests with and without speculation, both drafters, different tree sizes, joining
    and leaving mid-way, in one engine; the draft is the target itself for some (all drafts
    accepted) and a small random model (mostly rejected)."""
    ps, want = reference
    tmodel = CausalLM.from_pretrained(target, dtype="float32")
    per = [None, "off", "ngram", SpecConfig("ngram", tree="static:2,2"),
           SpecConfig("draft", tree="dynamic:8,3,2"), "draft",
           SpecConfig("draft", tree="static:2,1,1,1"), SpecConfig("draft", tree="chain:6")]
    for dm in (draft, tmodel):
        eng = Engine(target, dtype="float32", block_size=4, max_num_seqs=5,
                     max_num_batched_tokens=40,
                     speculative=SpecConfig("draft", tree="chain:3", draft_model=dm))
        got = generate(eng, ps, [SamplingParams(max_tokens=24, speculative=s, **GREEDY)
                                 for s in per])
        assert got == want
        assert_no_leaks(eng)
        if dm is tmodel:  # the target drafting for itself: every draft is accepted
            assert eng.spec_metrics()["acceptance_length"] > 3


def test_min_prob_prunes_without_changing_tokens(target, draft, reference):
    """Nodes the draft finds unlikely are not proposed: fewer nodes per step, same tokens."""
    ps, want = reference
    nodes = {}
    for mp in (0.0, 0.3):
        eng = Engine(target, dtype="float32", block_size=4, speculative=SpecConfig(
            "draft", tree="static:3,2,1", draft_model=draft, min_prob=mp))
        assert generate(eng, ps, SamplingParams(max_tokens=24, **GREEDY)) == want
        m = eng.spec_metrics()
        nodes[mp] = m["draft_nodes"] / max(1, m["verify_steps"])
        assert_no_leaks(eng)
    assert nodes[0.3] < nodes[0.0] == 15
    with pytest.raises(ValueError, match="min_prob"):
        SpecConfig("draft", min_prob=1.5)


def test_backoff_skips_drafting_without_changing_tokens(target, draft, reference):
    """With a draft that rarely agrees, backing off drafts fewer trees; tokens are the same,
    and a draft that always agrees (the target itself) never backs off."""
    ps, want = reference
    steps = {}
    for bo in (0, 8):
        eng = Engine(target, dtype="float32", block_size=4, speculative=SpecConfig(
            "draft", tree="chain:3", draft_model=draft, backoff=bo))
        assert generate(eng, ps, SamplingParams(max_tokens=24, **GREEDY)) == want
        steps[bo] = eng.spec_metrics()["verify_steps"]
        assert_no_leaks(eng)
        assert not eng.spec.backoff
    assert 0 < steps[8] < steps[0]
    tmodel = CausalLM.from_pretrained(target, dtype="float32")
    eng = Engine(target, dtype="float32", block_size=4, speculative=SpecConfig(
        "draft", tree="chain:3", draft_model=tmodel, backoff=8))
    assert generate(eng, ps[:2], SamplingParams(max_tokens=24, **GREEDY)) == want[:2]
    assert eng.spec_metrics()["acceptance_length"] > 3
    with pytest.raises(ValueError, match="backoff"):
        SpecConfig("ngram", backoff=-1)


def test_sliding_window_trees(tmp_path, draft):
    """A target with a sliding window shorter than the sequences: the tree attention's window
    (and the draft's, drafting for itself) matches plain decoding."""
    path = str(tmp_path / "sw")
    make_checkpoint("mixtral", path, seed=11, sliding_window=5)
    ps = prompts(4, seed=2)
    want = generate(Engine(path, dtype="float32", block_size=4), ps,
                    SamplingParams(max_tokens=20, **GREEDY))
    tmodel = CausalLM.from_pretrained(path, dtype="float32")
    assert tmodel.config.sliding_window == 5
    for dm, tree in ((draft, "static:2,2,1"), (tmodel, "dynamic:8,4,2"), (tmodel, "chain:3")):
        eng = Engine(path, dtype="float32", block_size=4,
                     speculative=SpecConfig("draft", tree=tree, draft_model=dm))
        assert generate(eng, ps, SamplingParams(max_tokens=20, **GREEDY)) == want
        assert_no_leaks(eng)


def test_kv_matches_plain_decoding(target, draft):
    """After many speculative steps with rejections, the target's and the draft's caches hold
    what plain decoding of the same tokens would."""
    p = prompts(2, seed=3)[1]
    eng = Engine(target, dtype="float32", block_size=4, speculative=SpecConfig(
        "draft", tree="static:3,2,2", draft_model=draft))
    rid = eng.add_request({"prompt_token_ids": p}, SamplingParams(max_tokens=200, **GREEDY))
    req = eng.requests[rid]
    while len(req.output_token_ids) < 40:
        eng.step()
    m = eng.spec_metrics()
    assert m["verify_steps"] >= 5 and m["acceptance_length"] < 3  # rejections happened
    toks = req.all_token_ids
    n = req.num_computed
    assert eng.kv.num_tokens(rid) == n == len(toks) - 1

    def plain_cache(model_path, count):
        ref = Engine(model_path, dtype="float32", block_size=4)
        r = ref.add_request({"prompt_token_ids": toks[:count + 1]},
                            SamplingParams(max_tokens=2, **GREEDY))
        rq = ref.requests[r]
        ref.step()  # prefill: KV of positions 0..count
        return ref, r, rq

    ref, r, _ = plain_cache(target, n)
    for layer in range(eng.kv.num_layers):
        for a, b in zip(eng.kv.gather(layer, rid, 0, n), ref.kv.gather(layer, r, 0, n)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    d = eng.spec.drafter
    dn = d.computed[rid]
    assert d.kv.num_tokens(rid) == dn and dn >= n - 8
    dref, dr, _ = plain_cache(draft, dn)
    for layer in range(d.kv.num_layers):
        for a, b in zip(d.kv.gather(layer, rid, 0, dn), dref.kv.gather(layer, dr, 0, dn)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    eng.abort(rid)
    eng.step()
    assert_no_leaks(eng)


def test_speculative_decoder_api(target, draft, reference):
    ps, want = reference
    dec = SpeculativeDecoder(target, draft, tree="static:2,2,1", dtype="float32")
    assert dec.speculative_decode(ps[0], target_tokens=24, ignore_eos=True) == want[0]
    assert isinstance(dec.last_text, str)
    assert dec.metrics()["verify_steps"] > 0
    ng = SpeculativeDecoder(target, method="ngram", tree="chain:4", dtype="float32")
    assert ng.speculative_decode(ps[1], target_tokens=24, ignore_eos=True) == want[1]


def test_tree_shapes_and_bad_config():
    assert TreeShape.parse("chain:3").branching == (1, 1, 1)
    assert TreeShape.parse("static:2,2").max_nodes == 7
    t = TreeShape.parse("dynamic:12,4,3")
    assert t.dynamic and t.max_nodes == 13 and t.max_depth == 4
    for bad in ("tree:3", "static:", "chain:0", "dynamic:1,2"):
        with pytest.raises(ValueError):
            TreeShape.parse(bad)
    with pytest.raises(ValueError, match="method"):
        SpecConfig("medusa")
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="eagle")


def test_draft_request_needs_draft_model(target):
    eng = Engine(target, dtype="float32")
    with pytest.raises(ValueError, match="draft model"):
        eng.add_request([3, 4, 5], SamplingParams(speculative="draft"))
    with pytest.raises(ValueError, match="draft_model"):
        Engine(target, dtype="float32", speculative="draft")


def test_generate_cli_speculative(target, draft, reference, tmp_path):
    import json

    from disagg.generate import main

    ps, want = reference
    src = tmp_path / "p.json"
    src.write_text(json.dumps([{"prompt_token_ids": p} for p in ps[:3]]))
    for extra in (["--speculative", "ngram", "--spec-tree", "static:2,1"],
                  ["--speculative", "draft", "--draft-model", draft, "--spec-tree", "chain:3"]):
        out = tmp_path / "o.json"
        assert main(["--model", target, "--prompts", str(src), "--output", str(out),
                     "--max-tokens", "24", "--ignore-eos", "--dtype", "float32",
                     "--block-size", "4"] + extra) == 0
        assert [r["token_ids"] for r in json.loads(out.read_text())] == want[:3]


def test_ngram_drafter_builds_a_trie():
    from disagg.spec import NgramDrafter

    cfg = SpecConfig("ngram", tree="static:2,1,1")
    # "7 8" occurred twice, followed by "9 10 11" and by "5 6 7": two branches from the root.
    seq = [7, 8, 9, 10, 11, 3, 7, 8, 5, 6, 7, 4, 7, 8]
    t = NgramDrafter().propose(seq, cfg.tree, cfg)
    # Most recent occurrence first; each continuation is inserted depth-first.
    assert t.tokens == [8, 5, 6, 7, 9, 10, 11]
    assert t.parents == [-1, 0, 1, 2, 0, 4, 5]
    assert NgramDrafter().propose([1, 2, 3], cfg.tree, cfg).tokens == [3]  # nothing repeats


def test_metrics_by_depth():
    from disagg.spec import SpecMetrics

    m = SpecMetrics()
    m.record(tree_depth=3, accept_len=3, nodes=4)  # two drafts accepted + bonus
    m.record(tree_depth=2, accept_len=1, nodes=3)  # nothing accepted
    s = m.summary()
    assert s["acceptance_length"] == 2.0 and s["draft_nodes"] == 5
    assert s["acceptance_rate_by_depth"] == [0.5, 0.5, 0.0]


def test_speculative_decoder_defaults():
    """The chapter's call on the packaged model and its draft: the text matches plain greedy
    (float32: bfloat16 logits can tie, and the tree and decode attention round differently)."""
    from disagg import LLM

    prompt = "def add(a, b):\n    return"
    dec = SpeculativeDecoder(dtype="float32")
    toks = dec.speculative_decode(prompt, target_tokens=20, ignore_eos=True)
    plain = LLM("default", dtype="float32").generate(prompt, SamplingParams(temperature=0, max_tokens=20,
                                                            ignore_eos=True))[0].outputs[0]
    assert toks == plain.token_ids and dec.last_text == plain.text
    assert dec.metrics()["verify_steps"] > 0
