"""A request's state inside the engine, and the outputs handed back to callers."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    """One completion (vLLM's ``CompletionOutput``)."""

    index: int
    text: str
    token_ids: list
    finish_reason: Optional[str] = None  # "stop", "length", "abort", "error"
    stop_reason: object = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What a request has produced so far (vLLM's ``RequestOutput``).

    ``error`` holds the message when the request was rejected or failed; the engine keeps
    serving the others.
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    outputs: list
    finished: bool
    error: Optional[str] = None
    metrics: dict = field(default_factory=dict)


class Request:
    """Engine-side state. ``all_token_ids`` is prompt + generated; ``num_computed`` of them
    have their K/V in the cache (reset to 0 on preemption, which recomputes them)."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list,
                 params: SamplingParams, eos_token_ids: list,
                 callback: Optional[Callable[[RequestOutput], None]] = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list = []
        self.params = params
        self.status = Status.WAITING
        self.num_computed = 0
        self.callback = callback
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.error: Optional[str] = None
        self.text = ""
        self.num_preemptions = 0
        self.stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            self.stop_ids |= set(eos_token_ids)
        self.generator: Optional[torch.Generator] = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.arrival_time = time.perf_counter()
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None

    @property
    def all_token_ids(self) -> list:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def to_output(self) -> RequestOutput:
        m = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
             "finished_time": self.finished_time, "num_preemptions": self.num_preemptions,
             "scheduled_time": getattr(self, "scheduled_time", None)}
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[CompletionOutput(0, self.text, list(self.output_token_ids),
                                      self.finish_reason, self.stop_reason)],
            finished=self.finished, error=self.error, metrics=m)
