"""Speculative decoding in the server (official openai client): greedy output with speculation
equals plain decoding in colocated workers and in the disaggregated decode pool (where the
draft model prefills its own prompt KV), per-request overrides, 400s naming the field, the
/metrics figures, and no KV blocks held afterwards in any pool or draft cache."""
from __future__ import annotations

import json

import pytest

from test_serve import PROMPTS, Server, _client

openai = pytest.importorskip("openai")

OVERRIDES = [None, "ngram", {"method": "draft", "tree": "chain:3", "min_prob": 0.05, "backoff": 4},
             "off"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from disagg.model.tiny import make_checkpoint

    root = tmp_path_factory.mktemp("spec_serve")
    make_checkpoint("mixtral", str(root / "mixtral"), seed=3)
    make_checkpoint("llama", str(root / "draft"), seed=5, num_hidden_layers=1)
    return str(root / "mixtral"), str(root / "draft")


@pytest.fixture(scope="module")
def offline(models):
    from disagg import LLM, SamplingParams

    outs = LLM(models[0]).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12,
                                                           ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def _ids(s, prompt, spec):
    c = _client(s)
    extra = {"ignore_eos": True, "return_token_ids": True}
    if spec is not None:
        extra["speculative"] = spec
    r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=12,
                             temperature=0, extra_body=extra)
    return r.choices[0].model_extra["token_ids"]


def _metrics(s) -> dict:
    _, text = s.get("/metrics")
    out = {}
    for line in text.splitlines():
        if line.startswith("disagg_spec_") or line.startswith("disagg_kv_blocks_used"):
            name, v = line.rsplit(" ", 1)
            out[name] = float(v)
    return out


def _check_server(s, offline, pool):
    for i, p in enumerate(PROMPTS):
        for spec in OVERRIDES:
            assert _ids(s, p, spec) == offline[i], (p, spec)
    # streaming carries several tokens per step; the text still matches
    c = _client(s)
    full = c.completions.create(model="mixtral", prompt=PROMPTS[2], max_tokens=12,
                                temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(c.completions.create(model="mixtral", prompt=PROMPTS[2], max_tokens=12,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == full
    blocks = s.pool_blocks()
    assert set(blocks.values()) == {0.0}, blocks
    m = _metrics(s)
    lab = f'{{pool="{pool}"}}'
    assert m[f"disagg_spec_verify_steps{lab}"] > 0
    assert 1.0 <= m[f"disagg_spec_acceptance_length{lab}"] <= 4.0
    assert m[f"disagg_spec_draft_seconds{lab}"] > 0 and m[f"disagg_spec_verify_seconds{lab}"] > 0
    assert f'disagg_spec_acceptance_rate{{pool="{pool}",depth="1"}}' in m
    assert m[f"disagg_spec_draft_kv_blocks_used{lab}"] == 0
    assert m[f"disagg_spec_draft_kv_blocks_total{lab}"] > 0


def _check_bad_requests(s):
    for spec, word in (("eagle", "speculative.method"), (3, "speculative"),
                       ({"tree": "chain:2"}, "speculative.method"),
                       ({"method": "ngram", "tree": "tree:9"}, "speculative.tree"),
                       ({"method": "draft", "min_prob": 2}, "speculative.min_prob"),
                       ({"method": "draft", "tree": "static:8,8"}, "speculative.tree"),
                       ({"method": "ngram", "backoff": -2}, "speculative.backoff"),
                       ({"method": "ngram", "depth": 3}, "speculative")):
        code, body = s.post("/v1/completions", json.dumps(
            {"prompt": "abc", "max_tokens": 2, "speculative": spec}).encode())
        assert code == 400 and word in body["error"]["message"], (spec, body)


def test_colocated_speculation(models, offline):
    target, draft = models
    s = Server(target, "--speculative", "draft", "--draft-model", draft, "--spec-tree",
               "static:2,1", mode="colocated")
    try:
        _check_server(s, offline, "both")
        _check_bad_requests(s)
    finally:
        s.stop()


def test_disaggregated_decode_pool_speculation(models, offline):
    target, draft = models
    s = Server(target, "--speculative", "draft", "--draft-model", draft, "--spec-tree",
               "chain:2")
    try:
        _check_server(s, offline, "decode")
        m = _metrics(s)
        assert not any('pool="prefill"' in k for k in m if k.startswith("disagg_spec_"))
    finally:
        s.stop()


def test_inference_system_use_speculative(models):
    """The chapter's ``InferenceConfig(use_speculative=True)``: the decode pool speculates
    (n-gram lookup for a model without the packaged draft) and the tokens do not change; a
    server without a draft model refuses per-request ``draft``."""
    import time
    import urllib.error
    import urllib.request

    from disagg import LLM, DisaggregatedInferenceSystem, InferenceConfig, SamplingParams

    want = LLM(models[0]).generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12))
    cfg = InferenceConfig(num_gpus=2, model=models[0], use_speculative=True,
                          extra_args=["--num-blocks", "64"])
    with DisaggregatedInferenceSystem(cfg) as system:
        got = system.process_request(PROMPTS[2], max_tokens=12, temperature=0)
        assert got["token_ids"] == want[0].outputs[0].token_ids
        time.sleep(0.6)  # the decode rank's next stats report
        with urllib.request.urlopen(system.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        req = urllib.request.Request(system.url + "/v1/completions", data=json.dumps(
            {"prompt": "abc", "max_tokens": 2, "speculative": "draft"}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400
        assert "--speculative draft" in json.loads(err.value.read())["error"]["message"]
    steps = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith('disagg_spec_verify_steps{pool="decode"}')]
    assert steps and steps[0] > 0


def test_bad_server_options_fail_at_start(models, tmp_path):
    """Checked before any worker process starts (``main`` calls ``check_args`` first)."""
    from disagg.model.tiny import make_checkpoint
    from disagg.serve.__main__ import build_parser
    from disagg.serve.spec_options import check_args

    big = str(tmp_path / "big_vocab_draft")
    make_checkpoint("llama", big, seed=1, num_hidden_layers=1, vocab_size=500)
    base = ["--model", models[0], "--speculative", "draft", "--draft-model", models[1]]
    check_args(build_parser().parse_args(base))
    for extra, word in ((["--spec-tree", "tree:3"], "bad tree shape"),
                        (["--spec-min-prob", "1.5"], "min_prob"),
                        (["--spec-backoff", "-1"], "backoff"),
                        (["--draft-model", big], "vocabulary"),
                        (["--draft-model", str(tmp_path / "none")], "not found")):
        with pytest.raises(SystemExit, match=word):
            check_args(build_parser().parse_args(base + extra))
