"""The server with ``--kv-transport nixl``: the official openai client gets the same greedy
tokens as with the torch transport and as the offline engine, streaming included; clients that
disconnect mid-stream and a finished run leave no KV blocks in either pool."""
from __future__ import annotations

import threading
import time

import openai
from test_serve import Server, _stream_and_drop
from test_serve import model  # noqa: F401  (the module-scoped tiny checkpoint fixture)

PROMPTS = ["The quick brown fox", "def fib(n):", "Hello, world! " * 6]
MAX_TOKENS = 10
_COUNTERS = ("disagg_kv_transfer_bytes_total ", "disagg_kv_transfer_failures_total ",
             "disagg_requests_aborted_total ")


def _metrics(s) -> dict:
    """KV blocks in use per pool and the transfer/abort counters, from /metrics."""
    out = s.pool_blocks()
    _, text = s.get("/metrics")
    for line in text.splitlines():
        if line.startswith(_COUNTERS):
            out[line.split()[0]] = float(line.split()[1])
    return out


def _run(model, transport, disconnects=False):
    s = Server(model, "--kv-transport", transport)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        name = c.models.list().data[0].id
        ids = []
        for p in PROMPTS:
            r = c.completions.create(model=name, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
            ids.append(r.choices[0].model_extra["token_ids"])
        full = c.completions.create(model=name, prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                    temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        chunks = list(c.completions.create(model=name, prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}))
        streamed = "".join(ch.choices[0].text for ch in chunks)
        if disconnects:  # clients that leave mid-stream: their blocks return in both pools
            ts = [threading.Thread(target=_stream_and_drop,
                                   args=(s.url, PROMPTS[i % 3] * 3, 1 + i % 3)) for i in range(6)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(timeout=60)
        deadline = time.time() + 30
        while True:
            m = _metrics(s)  # after the workers' next stats report
            if (m["prefill"], m["decode"]) == (0.0, 0.0) or time.time() > deadline:
                return ids, full, streamed, m
    finally:
        s.stop()


def test_nixl_transport_equals_torch_transport_and_offline(model):
    from disagg import LLM, SamplingParams

    offline = [o.outputs[0].token_ids for o in LLM(model).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))]
    n_ids, n_full, n_stream, n_m = _run(model, "nixl", disconnects=True)
    t_ids, t_full, _, _ = _run(model, "torch")
    assert n_ids == offline
    assert n_ids == t_ids and n_full == t_full
    assert n_stream == n_full
    assert n_m["disagg_kv_transfer_bytes_total"] > 0
    assert n_m["disagg_kv_transfer_failures_total"] == 0
    assert n_m["prefill"] == 0.0 and n_m["decode"] == 0.0
    assert n_m["disagg_requests_aborted_total"] >= 1  # the disconnects did reach the server
