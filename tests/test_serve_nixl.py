"""The server with ``--kv-transport nixl``: the official openai client gets the same greedy
tokens as with the torch transport and as the offline engine, streaming included; clients that
disconnect mid-stream and a finished run leave no KV blocks in either pool."""
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

import openai

PROMPTS = ["The quick brown fox", "def fib(n):", "Hello, world! " * 6]
MAX_TOKENS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, model, transport):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("RANK", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "disagg.serve", "--model", model, "--prefill", "1",
             "--decode", "1", "--port", str(self.port), "--num-blocks", "64", "--block-size",
             "16", "--decode-block-size", "8", "--kv-transport", transport],
            env=env, start_new_session=True)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() - t0 > 120:
                self.stop()
                raise TimeoutError("server did not become healthy")
            time.sleep(0.3)

    def metrics(self) -> dict:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("disagg_kv_blocks_used{"):
                out[line.split('pool="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
            elif line.startswith(("disagg_kv_transfer_bytes_total ",
                                  "disagg_kv_transfer_failures_total ",
                                  "disagg_requests_aborted_total ")):
                out[line.split()[0]] = float(line.split()[1])
        return out

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _stream_and_drop(url, prompt, after_events):
    """Open a stream, read ``after_events`` events, then close the socket (a disconnect)."""
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"prompt": prompt, "max_tokens": 200, "stream": True, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sk:
        sk.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        while seen.count(b"data: ") < after_events:
            d = sk.recv(4096)
            if not d:
                break
            seen += d


def _run(model, transport, disconnects=False):
    s = _Server(model, transport)
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
            time.sleep(0.6)  # the workers' next stats report
            m = s.metrics()
            if (m["prefill"], m["decode"]) == (0.0, 0.0) or time.time() > deadline:
                return ids, full, streamed, m
    finally:
        s.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from disagg.model.tiny import make_checkpoint

    path = str(tmp_path_factory.mktemp("tiny") / "mixtral")
    make_checkpoint("mixtral", path, seed=3)
    return path


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
