"""Layer-wise KV hand-off without a server: the model's ``after_layer`` hook packs each layer
(and KV-head slice) of a prompt as soon as it is computed; the parts are unpacked into a decode
engine of another block size in a shuffled order, and decoding from them gives the offline
engine's tokens."""
from __future__ import annotations

import random

import pytest
import torch

from disagg import LLM, SamplingParams
from disagg.engine import Engine
from disagg.serve.pool import kv_head_plan, layer_parts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from disagg.model.tiny import make_checkpoint

    path = str(tmp_path_factory.mktemp("tiny") / "mixtral")
    make_checkpoint("mixtral", path, seed=5)
    return path


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_parts_shuffled_decode_equals_offline(model, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 60, (int(n),), generator=g).tolist() for n in (37, 5, 70)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    offline = [o.outputs[0].token_ids for o in LLM(model).generate(
        [{"prompt_token_ids": p} for p in prompts], params)]

    pre = Engine(model, block_size=16, num_blocks=64, max_num_batched_tokens=512)
    dec = Engine(model, block_size=8, num_blocks=64)
    cfg = pre.model.config
    parts = layer_parts(cfg.num_hidden_layers, 1)
    # prefill as two TP ranks would send it to one decode rank: a part per (layer, head slice)
    plan = kv_head_plan(cfg.num_key_value_heads, 2, 1)
    assert len(plan) == 2
    sent, seen_layers = {}, []

    def after_layer(i):
        seen_layers.append(i)
        for rid in pre.requests:
            for p, (l0, l1) in enumerate(parts):
                if i + 1 == l1:
                    for _, _, h0, h1 in plan:
                        sent.setdefault(rid, []).append(
                            (h0, pre.kv.pack(rid, layers=(l0, l1), heads=(h0, h1))))
    pre.model.after_layer = after_layer
    ids = [pre.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=1),
                           request_id=f"r{k}") for k, p in enumerate(prompts)]
    first = {}
    while pre.has_unfinished():
        for out in pre.step():
            if out.finished:
                first[out.request_id] = out.outputs[0].token_ids[0]
    pre.model.after_layer = None
    assert seen_layers[:cfg.num_hidden_layers] == list(range(cfg.num_hidden_layers))
    rng = random.Random(seed)
    for rid, p in zip(ids, prompts):
        got = sent[rid]
        assert len(got) == len(parts) * len(plan)
        rng.shuffle(got)
        dec.kv.allocate(rid, len(p))
        for h0, buf in got:
            dec.kv.unpack(rid, buf, head_start=h0)
        dec.add_request_from_kv(p, first[rid], None, params, request_id=rid)
    res = {}
    while dec.has_unfinished():
        for out in dec.step():
            if out.finished:
                res[out.request_id] = out.outputs[0].token_ids
    assert [res[r] for r in ids] == offline
    assert dec.kv.num_free_blocks == dec.kv.num_blocks


def test_add_from_kv_without_buffer_needs_the_cache(model):
    dec = Engine(model, block_size=8, num_blocks=16)
    with pytest.raises(ValueError, match="already in the cache"):
        dec.add_request_from_kv([3, 4, 5], 7, None, request_id="x")
    dec.kv.allocate("x", 2)  # wrong length
    with pytest.raises(ValueError, match="already in the cache"):
        dec.add_request_from_kv([3, 4, 5], 7, None, request_id="x")
