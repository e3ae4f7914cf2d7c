"""The chapter's API over the real server: ``InferenceConfig`` and
``DisaggregatedInferenceSystem``, which starts ``python -m disagg.serve`` worker processes
(prefill pool, decode pool) and sends requests to them over HTTP."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class InferenceConfig:
    """What the system should look like.

    Attributes
    ----------
    model_size : int
        Parameter count of the model being described (informational: the weights served are
        those of ``model``).
    num_gpus : int
        Worker processes to split between the pools (on CPU: processes, one core each);
        ``prefill_workers``/``decode_workers`` override the split.
    num_experts : int
        Experts per MoE layer of the described model (informational, reported back).
    use_speculative : bool
        The decode pool speculates: with the packaged draft model for ``model="default"``,
        n-gram lookup otherwise (``extra_args`` with ``--speculative ...`` take precedence).
    model : str
        ``"default"`` or a HF-format folder.
    mode : {"disaggregated", "colocated"}
    """

    model_size: int = 7_000_000_000
    num_gpus: int = 2
    num_experts: int = 8
    use_speculative: bool = False
    model: str = "default"
    mode: str = "disaggregated"
    prefill_workers: Optional[int] = None
    decode_workers: Optional[int] = None
    max_tokens: int = 32
    port: Optional[int] = None
    extra_args: list = field(default_factory=list)
    startup_timeout_s: float = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DisaggregatedInferenceSystem:
    """Prefill and decode worker pools behind the reference server, driven from Python.

    Examples
    --------
    >>> system = DisaggregatedInferenceSystem(InferenceConfig(num_gpus=2))
    >>> system.setup_prefill_workers(); system.setup_decode_workers()
    >>> system.process_request("The quick brown fox")["text"]
    >>> system.shutdown()
    """

    def __init__(self, config: InferenceConfig):
        if config.num_gpus < 2:
            raise ValueError("num_gpus must be >= 2 (one prefill and one decode worker)")
        self.config = config
        self.num_prefill = config.prefill_workers or max(1, config.num_gpus // 2)
        self.num_decode = config.decode_workers or max(1, config.num_gpus - self.num_prefill)
        self._prefill_ready = False
        self.proc: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None

    def setup_prefill_workers(self) -> int:
        """Reserve the prefill pool; returns its size (processes start with the decode pool,
        since the server launches all ranks together)."""
        self._prefill_ready = True
        return self.num_prefill

    def setup_decode_workers(self) -> int:
        """Start the server: rank 0 (HTTP + router), the prefill pool and the decode pool."""
        if not self._prefill_ready:
            self.setup_prefill_workers()
        if self.proc is not None:
            return self.num_decode
        c = self.config
        port = c.port or _free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        spec = []
        if c.use_speculative and "--speculative" not in map(str, c.extra_args):
            spec = ["--speculative", "draft" if c.model == "default" else "ngram"]
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "disagg.serve", "--model", c.model, "--prefill",
             str(self.num_prefill), "--decode", str(self.num_decode), "--mode", c.mode,
             "--port", str(port), *spec, *map(str, c.extra_args)],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < c.startup_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.num_decode
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        self.shutdown()
        raise TimeoutError(f"the server did not become healthy in {c.startup_timeout_s} s")

    def process_request(self, prompt: str, max_tokens: Optional[int] = None,
                        temperature: float = 0.0, timeout: float = 300.0) -> dict:
        """Run one request through prefill -> KV transfer -> decode.

        Returns
        -------
        dict
            ``text``, ``token_ids``, ``prompt_tokens``, ``ttft_s`` (first streamed token),
            ``e2e_s``, ``finish_reason``.
        """
        if self.proc is None:
            self.setup_decode_workers()
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens or self.config.max_tokens,
                           "temperature": temperature, "stream": True,
                           "return_token_ids": True}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        ttft, text, ids, reason = None, "", [], None
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                ch = chunk["choices"][0]
                if ch.get("token_ids") and ttft is None:
                    ttft = time.perf_counter() - t0
                text += ch.get("text") or ""
                ids += ch.get("token_ids") or []
                reason = ch.get("finish_reason") or reason
        return {"text": text, "token_ids": ids, "ttft_s": ttft,
                "e2e_s": time.perf_counter() - t0, "finish_reason": reason,
                "prefill_workers": self.num_prefill, "decode_workers": self.num_decode}

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
