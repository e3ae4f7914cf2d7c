"""Lossless speculative sampling end to end: on a tiny target with a 5-token vocabulary, the
distribution of generated sequences with speculation (n-gram, draft model with deterministic
and stochastic drafts, static and dynamic trees) equals the target's exact distribution,
computed by enumerating every sequence (chi-square over many seeded requests)."""
import itertools
import math

import pytest
import torch

from disagg.model.tiny import make_checkpoint

from disagg import SamplingParams
from disagg.engine import Engine
from disagg.spec import SpecConfig

V, L = 5, 3
PROMPT = [2, 3, 4, 2, 3, 4, 2, 3]
TRIALS = 1200


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    t = str(tmp_path_factory.mktemp("t5"))
    d = str(tmp_path_factory.mktemp("d5"))
    hf = make_checkpoint("mixtral", t, seed=2, vocab_size=V, hidden_size=64, head_dim=16)
    make_checkpoint("llama", d, seed=7, vocab_size=V, hidden_size=64, head_dim=16,
                    num_hidden_layers=1)
    return t, d, hf


def filtered_probs(logits, temperature, top_k, top_p):
    """The engine's sampling distribution for one row (temperature, top-k, top-p)."""
    x = logits.double() / temperature
    if 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, -1)
    if top_p < 1:
        sp, idx = torch.sort(p, descending=True, stable=True)
        drop = (sp.cumsum(-1) - sp) >= top_p
        drop[0] = False
        p = p.clone()
        p[idx[drop]] = 0
        p /= p.sum()
    return p


def exact_distribution(hf, temperature, top_k, top_p):
    """Probability of every length-L continuation of PROMPT under the HF target."""
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=L):
            ids = torch.tensor([PROMPT + list(seq[:-1])])
            lg = hf(ids).logits[0, len(PROMPT) - 1:].float()
            pr = 1.0
            for j, t in enumerate(seq):
                pr *= float(filtered_probs(lg[j], temperature, top_k, top_p)[t])
            probs[seq] = pr
    return probs


def chi_square_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Pooling cells expected below 5 into one; Wilson-Hilferty approximation of the tail."""
    stat, dof, pool_e, pool_o = 0.0, -1, 0.0, 0
    for seq, p in probs.items():
        e, o = p * n, counts.get(seq, 0)
        if e < 5:
            pool_e += e
            pool_o += o
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        dof += 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def sample_sequences(engine, params_of, n):
    counts = {}
    for lo in range(0, n, 300):
        ids = [engine.add_request({"prompt_token_ids": PROMPT}, params_of(i))
               for i in range(lo, min(n, lo + 300))]
        outs = {o.request_id: o for o in engine.run()}
        for r in ids:
            seq = tuple(outs[r].outputs[0].token_ids)
            assert len(seq) == L
            counts[seq] = counts.get(seq, 0) + 1
    return counts


@pytest.mark.parametrize("spec,temperature,top_k,top_p", [
    ("ngram:chain:3", 1.0, 0, 1.0),
    ("draft:static:2,2", 1.0, 0, 1.0),
    ("draft:static:2,2:stochastic", 1.3, 0, 1.0),
    ("draft:dynamic:6,3,2", 0.8, 3, 0.9),
    ("draft:static:2,1:backoff", 1.0, 0, 1.0),  # min_prob pruning and back-off
])
def test_speculative_sampling_is_lossless(models, spec, temperature, top_k, top_p):
    t, d, hf = models
    method, tree = spec.split(":", 1)
    stochastic = tree.endswith(":stochastic")
    backoff = tree.endswith(":backoff")
    tree = tree.replace(":stochastic", "").replace(":backoff", "")
    cfg = SpecConfig(method, tree=tree, stochastic=stochastic,
                     draft_model=d if method == "draft" else None,
                     min_prob=0.2 if backoff else 0.0, backoff=4 if backoff else 0)
    eng = Engine(t, dtype="float32", block_size=4, max_num_seqs=300,
                 max_num_batched_tokens=4096, speculative=cfg)
    counts = sample_sequences(eng, lambda i: SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, seed=1000 + i, max_tokens=L,
        ignore_eos=True), TRIALS)
    m = eng.spec_metrics()
    assert m["verify_steps"] >= (TRIALS // 4 if backoff else TRIALS // 2)
    probs = exact_distribution(hf, temperature, top_k, top_p)
    assert chi_square_pvalue(counts, probs, TRIALS) > 1e-3
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_harness_rejects_a_wrong_distribution(models):
    """The same check fails when the samples come from another temperature."""
    t, d, hf = models
    eng = Engine(t, dtype="float32", block_size=4, max_num_seqs=300,
                 max_num_batched_tokens=4096, speculative=SpecConfig("ngram", tree="chain:3"))
    counts = sample_sequences(eng, lambda i: SamplingParams(
        temperature=1.6, seed=i, max_tokens=L, ignore_eos=True), TRIALS)
    assert chi_square_pvalue(counts, exact_distribution(hf, 1.0, 0, 1.0), TRIALS) < 1e-6
