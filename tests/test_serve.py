"""The reference server end to end: the official openai client and raw HTTP against real
worker processes (disaggregated and colocated), reliability cases, and the KV leak checks."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")

PROMPTS = ["The quick brown fox", "def fib(n):", "Hello, world! " * 6, "a"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *extra, prefill=1, decode=1, mode="disaggregated", env=None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        env.pop("RANK", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "disagg.serve", "--model", model, "--prefill", str(prefill),
             "--decode", str(decode), "--mode", mode, "--port", str(self.port),
             "--num-blocks", "64", "--block-size", "16", "--decode-block-size", "8", *extra],
            env=env, start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout=120):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise TimeoutError("server did not become healthy")

    def get(self, path, key=None):
        req = urllib.request.Request(self.url + path)
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path, body: bytes, key=None):
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"})
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def pool_blocks(self) -> dict:
        """KV blocks in use per pool, from /metrics (after the workers' next stats report)."""
        time.sleep(0.6)
        _, text = self.get("/metrics", getattr(self, "key", None))
        out = {}
        for line in text.splitlines():
            if line.startswith("disagg_kv_blocks_used{"):
                pool = line.split('pool="')[1].split('"')[0]
                out[pool] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from disagg.model.tiny import make_checkpoint

    path = str(tmp_path_factory.mktemp("tiny") / "mixtral")
    make_checkpoint("mixtral", path, seed=3)
    return path


@pytest.fixture(scope="module")
def offline(model):
    from disagg import LLM, SamplingParams

    llm = LLM(model)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def disagg_server(model):
    s = Server(model, "--max-waiting", "64")
    yield s
    s.stop()


def _client(s, key="x"):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _greedy_ids(s, prompts):
    c = _client(s)
    out = []
    for p in prompts:
        r = c.completions.create(model=c.models.list().data[0].id, prompt=p, max_tokens=12,
                                 temperature=0, extra_body={"ignore_eos": True,
                                                            "return_token_ids": True})
        out.append(r.model_extra["choices"][0]["token_ids"] if "choices" in (r.model_extra or {})
                   else r.choices[0].model_extra["token_ids"])
    return out


def test_disaggregated_matches_offline_and_streams(disagg_server, offline):
    s = disagg_server
    assert _greedy_ids(s, PROMPTS) == offline
    c = _client(s)
    # streaming: the concatenated deltas equal the non-streamed text
    full = c.completions.create(model="mixtral", prompt=PROMPTS[0], max_tokens=10,
                                temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(c.completions.create(model="mixtral", prompt=PROMPTS[0], max_tokens=10,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = c.chat.completions.create(model="mixtral", messages=[
        {"role": "user", "content": "hi there"}], max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens >= 1
    deltas = list(c.chat.completions.create(model="mixtral", messages=[
        {"role": "user", "content": "hi there"}], max_tokens=6, temperature=0, stream=True))
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    # a finished run leaves no blocks in either pool; the transfers were counted
    assert s.pool_blocks() == {"prefill": 0.0, "decode": 0.0}
    _, m = s.get("/metrics")
    assert "disagg_kv_transfer_bytes_total" in m
    sent = float(m.split("\ndisagg_kv_transfer_bytes_total ")[1].split()[0])
    assert sent > 0


def test_serve_bench_counts_every_token(disagg_server):
    """The benchmark client's token counts (and so TPOT) come from the server's usage, also
    when a streamed event carries no text (a byte-level token inside a UTF-8 character)."""
    import asyncio
    from types import SimpleNamespace

    from disagg.bench import serve as sb

    args = SimpleNamespace(url=disagg_server.url, model=None, api_key=None,
                           endpoint="completions", dataset="random", random_input_len=24,
                           random_output_len=9, random_range_ratio=0.0,
                           prefill_heavy_fraction=0.0, long_input_len=0, num_prompts=6,
                           burstiness=1.0, seed=5, timeout=60.0, slo_ttft_ms=None,
                           slo_tpot_ms=None)
    reqs = sb.make_requests(args)
    results, dur = asyncio.run(sb._run_rate(args, sb._model(args), reqs, float("inf")))
    assert [r.error for r in results] == [None] * len(reqs)
    assert [r.output_tokens for r in results] == [mt for _, mt in reqs]
    for r in results:
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / (r.output_tokens - 1))
    s = sb.summarize(results, dur, args, float("inf"))
    assert s["completed"] == len(reqs) and s["slo_attainment"] == 1.0


def test_reliability_errors(disagg_server):
    s = disagg_server
    assert s.post("/v1/completions", b"{not json")[0] == 400
    assert s.post("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode())[0] == 404
    long = {"model": "mixtral", "prompt": "x" * 600, "max_tokens": 4}
    code, body = s.post("/v1/completions", json.dumps(long).encode())
    assert code == 400 and "context length" in body["error"]["message"]
    big = json.dumps({"model": "mixtral", "prompt": "y" * (2 << 20)}).encode()
    assert s.post("/v1/completions", big)[0] == 413
    assert s.post("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode())[0] == 400
    assert s.post("/v1/chat/completions", json.dumps({"messages": "no"}).encode())[0] == 400
    code, body = s.get("/v1/models")
    assert code == 200 and json.loads(body)["data"][0]["id"] == "mixtral"
    # none of them changed the server's state
    assert s.pool_blocks() == {"prefill": 0.0, "decode": 0.0}
    assert s.get("/health")[0] == 200


def _stream_and_drop(url, prompt, after_events):
    """Open a stream, read ``after_events`` events, then close the socket (a disconnect)."""
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"model": "mixtral", "prompt": prompt, "max_tokens": 200, "stream": True,
                       "temperature": 0, "ignore_eos": True}).encode()
    sk = socket.create_connection((host, int(port)), timeout=30)
    sk.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    seen = b""
    while seen.count(b"data: ") < after_events:
        d = sk.recv(4096)
        if not d:
            break
        seen += d
    sk.close()


def test_disconnects_free_blocks_in_both_pools(disagg_server):
    s = disagg_server
    threads = [threading.Thread(target=_stream_and_drop, args=(s.url, PROMPTS[i % 4] * 3, 1 + i % 3))
               for i in range(8)]
    for t in threads:
        t.start()
    c = _client(s)
    r = c.completions.create(model="mixtral", prompt="still served", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    for t in threads:
        t.join(timeout=60)
    deadline = time.time() + 20
    while time.time() < deadline:
        if s.pool_blocks() == {"prefill": 0.0, "decode": 0.0}:
            break
    assert s.pool_blocks() == {"prefill": 0.0, "decode": 0.0}
    _, m = s.get("/metrics")
    assert float(m.split("\ndisagg_requests_aborted_total ")[1].split()[0]) >= 1


def test_colocated_equals_disaggregated(model, offline):
    s = Server(model, "--pin-cpus", mode="colocated", prefill=1, decode=1)
    try:
        assert _greedy_ids(s, PROMPTS) == offline
        assert s.pool_blocks() == {"both": 0.0}
        # --pin-cpus: worker rank r on CPU (r - 1) mod the CPUs the server may use
        cpus = sorted(os.sched_getaffinity(0))
        for rank in (1, 2):
            want = {cpus[(rank - 1) % len(cpus)]}
            assert os.sched_getaffinity(_rank_pid(s, rank)) == want
    finally:
        s.stop()


def _rank_pid(s, rank: int) -> int:
    """The PID of the server's worker process with ``RANK=rank``."""
    pids = subprocess.run(["pgrep", "-P", str(s.proc.pid)], capture_output=True,
                          text=True).stdout.split()
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no worker process with RANK={rank} among {pids}")


def test_api_key_queue_limit_and_dead_decode_rank(model):
    s = Server(model, "--api-key", "sekret", "--max-waiting", "1", "--request-timeout", "60")
    s.key = "sekret"
    try:
        assert s.get("/health")[0] == 200  # the one endpoint without a key
        assert s.get("/v1/models")[0] == 401
        assert s.get("/metrics")[0] == 401
        assert s.post("/v1/completions", b'{"prompt": "x"}')[0] == 401
        assert s.get("/v1/models", key="sekret")[0] == 200
        # bounded queue: with room for one waiting request, a burst gets 429s
        codes = []

        def one():
            codes.append(s.post("/v1/completions", json.dumps(
                {"prompt": "z" * 300, "max_tokens": 2}).encode(), key="sekret")[0])
        ts = [threading.Thread(target=one) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=60)
        assert 429 in codes and 200 in codes
        # kill the decode rank while a stream is in flight: an error event, not a hang. The
        # rank is found first (by its RANK, not by PID order, which wraps) so that the kill
        # follows the first event at once: a decode of a few hundred tokens takes only tens of
        # milliseconds here.
        decode_pid = _rank_pid(s, 2)
        c = _client(s, "sekret")
        stream = c.completions.create(model="mixtral", prompt="abc", max_tokens=500,
                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        t0 = time.time()
        os.kill(decode_pid, signal.SIGKILL)
        with pytest.raises(Exception):
            for _ in stream:
                pass
        assert time.time() - t0 < 30
        code, body = s.get("/health")
        assert code == 503 and "decode" in body
        # new requests fail fast instead of hanging
        code, _ = s.post("/v1/completions", b'{"prompt": "x", "max_tokens": 2}', key="sekret")
        assert code == 503
    finally:
        s.stop()
