"""Per-pool parallel layouts of the server: the KV head mapping between TP degrees, servers
whose prefill and decode units use TP/EP (official openai client, greedy output equal to the
offline engine), aborts and a killed unit member, and retry by recompute after a failed KV
transfer (fault injection)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

pytest.importorskip("openai")
pytest.importorskip("aiohttp")

from disagg.parallel.layout import kv_head_range  # noqa: E402
from disagg.serve.pool import kv_head_plan, layer_parts, plan_units, world_size  # noqa: E402
from test_serve import (PROMPTS, Server, _client, _greedy_ids, _rank_pid,  # noqa: E402
                        _stream_and_drop)
from test_serve import model, offline  # noqa: E402,F401  (the same module-scoped fixtures)


def _valid(n: int, tp: int) -> bool:
    return (n >= tp and n % tp == 0) or (n < tp and tp % n == 0)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_kv_head_plan_every_tp_pair(n):
    for ts in range(1, 9):
        for td in range(1, 9):
            if not (_valid(n, ts) and _valid(n, td)):
                continue
            plan = kv_head_plan(n, ts, td)
            sends = {s: 0 for s in range(ts)}
            for d in range(td):
                mine = [(s, h0, h1) for s, dd, h0, h1 in plan if dd == d]
                got = [h for _, h0, h1 in mine for h in range(h0, h1)]
                # each decode rank gets exactly its heads, once, in order
                assert got == list(kv_head_range(n, td, d)), (n, ts, td, d, plan)
                for s, h0, h1 in mine:
                    src = kv_head_range(n, ts, s)
                    assert src.start <= h0 < h1 <= src.stop  # from a rank that holds them
                    sends[s] += 1
            # replicated heads are spread: no source rank sends more than its fair share + 1
            total = sum(sends.values())
            assert max(sends.values()) <= -(-total // ts) + 1, (n, ts, td, sends)
            # one part per (source, destination) pair, so tags never collide
            assert len({(s, d) for s, d, _, _ in plan}) == len(plan)


def test_layer_parts_and_units():
    assert layer_parts(4, 0) == [(0, 4)]
    assert layer_parts(4, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert layer_parts(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert len(layer_parts(200, 1)) <= 63
    units = plan_units("disaggregated", 2, 1, 2, 1, 1, 2)
    assert [u.ranks for u in units] == [[1, 2], [3, 4], [5, 6]]
    assert units[2].dp == 2 and units[2].replica(1) == [6]
    assert world_size(units) == 7
    with pytest.raises(ValueError, match="multiple of tp"):
        plan_units("disaggregated", 1, 1, 2, 3, 1, 1)
    with pytest.raises(ValueError, match="disaggregated"):
        plan_units("colocated", 1, 1, 2, 1, 1, 1)


def _concurrent_ids(s, prompts):
    out = [None] * len(prompts)

    def one(i):
        out[i] = _greedy_ids(s, [prompts[i]])[0]
    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    return out


def _metric(s, name) -> float:
    _, m = s.get("/metrics")
    return float(m.split(f"\n{name} ")[1].split()[0])


def _wait_no_blocks(s, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        b = s.pool_blocks()
        if b == {"prefill": 0.0, "decode": 0.0}:
            return b
    return s.pool_blocks()


def test_prefill_tp1_to_decode_tp2_layerwise(model, offline):
    s = Server(model, "--decode-tp", "2", "--kv-layers-per-send", "1")
    try:
        assert _greedy_ids(s, PROMPTS) == offline
        assert _concurrent_ids(s, PROMPTS) == offline
        # every request's KV went in per-layer parts; the overlap is exported
        assert _metric(s, "disagg_kv_transfer_bytes_total") > 0
        hidden = _metric(s, "disagg_kv_transfer_hidden_seconds_total")
        exposed = _metric(s, "disagg_kv_transfer_exposed_seconds_total")
        assert hidden > 0 and exposed >= 0
        # clients that disconnect mid-stream: their blocks return in both pools
        ts = [threading.Thread(target=_stream_and_drop, args=(s.url, PROMPTS[i % 4] * 3, 1 + i % 3))
              for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=60)
        assert _wait_no_blocks(s) == {"prefill": 0.0, "decode": 0.0}
        assert _metric(s, "disagg_requests_aborted_total") >= 1
    finally:
        s.stop()


def test_prefill_tp2_to_decode_ep2(model, offline):
    # decode unit: two attention replicas sharing their experts (EP 2), stepping in lock-step
    s = Server(model, "--prefill-tp", "2", "--decode-ep", "2")
    try:
        assert _concurrent_ids(s, PROMPTS) == offline
        assert _greedy_ids(s, PROMPTS[:2]) == offline[:2]
        assert _wait_no_blocks(s) == {"prefill": 0.0, "decode": 0.0}
    finally:
        s.stop()


def test_tp2_to_tp2_and_killed_unit_member(model, offline):
    s = Server(model, "--prefill-tp", "2", "--decode-tp", "2", "--kv-layers-per-send", "1",
               "--pool-timeout", "20")
    try:
        assert _greedy_ids(s, PROMPTS) == offline
        c = _client(s)
        # sampled requests: the unit's ranks get one seed from rank 0 and stay in step
        for _ in range(2):
            r = c.completions.create(model="mixtral", prompt=PROMPTS[1], max_tokens=8,
                                     temperature=1.0, extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 8
        assert _wait_no_blocks(s) == {"prefill": 0.0, "decode": 0.0}
        member = _rank_pid(s, 4)  # ranks: 0 frontend, 1-2 prefill unit, 3-4 decode unit
        stream = c.completions.create(model="mixtral", prompt="abc", max_tokens=500,
                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        t0 = time.time()
        os.kill(member, signal.SIGKILL)
        with pytest.raises(Exception):
            for _ in stream:
                pass
        assert time.time() - t0 < 30
        code, body = s.get("/health")
        assert code == 503 and "decode unit 1" in body
        code, _ = s.post("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}).encode())
        assert code == 503
    finally:
        s.stop()


def test_failed_kv_transfer_retried_by_recompute(model, offline):
    s = Server(model, "--kv-retries", "1", "--kv-timeout", "5", "--kv-layers-per-send", "1",
               env={"DISAGG_KV_FAIL_SENDS": "1"})
    try:
        # the prefill's first send fails: the decode rank recomputes and the output is the same
        assert _greedy_ids(s, PROMPTS[:2]) == offline[:2]
        assert _metric(s, "disagg_kv_retries_total") == 1
        assert _metric(s, "disagg_kv_transfer_failures_total") >= 1
        assert _wait_no_blocks(s) == {"prefill": 0.0, "decode": 0.0}
    finally:
        s.stop()


def test_failed_kv_transfer_without_retry_is_an_error(model, offline):
    s = Server(model, "--kv-retries", "0", "--kv-timeout", "5", env={"DISAGG_KV_FAIL_SENDS": "1"})
    try:
        code, body = s.post("/v1/completions", json.dumps(
            {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}).encode())
        assert code == 500 and "KV" in body["error"]["message"]
        assert _greedy_ids(s, PROMPTS[1:2]) == offline[1:2]  # the next one goes through
        assert _wait_no_blocks(s) == {"prefill": 0.0, "decode": 0.0}
    finally:
        s.stop()
