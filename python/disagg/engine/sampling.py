"""Sampling parameters (vLLM's conventions) and the sampler that turns logits into tokens."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch


@dataclass
class SamplingParams:
    """How to generate for one request.

    Parameters
    ----------
    temperature : float
        0 means greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
    top_k : int
        Keep the k most likely tokens; 0 or -1 disables.
    top_p : float
        Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
    seed : int, optional
        Per-request random seed: the same seed gives the same text whatever else is batched.
    max_tokens : int
        New tokens to generate at most (>= 1).
    stop : str or list of str, optional
        Stop strings: generation ends once the text contains one; it is cut before it unless
        ``include_stop_str_in_output``.
    stop_token_ids : list of int, optional
        Extra token ids that end generation (kept in ``token_ids``).
    ignore_eos : bool
        Keep going past the model's end-of-sequence token.
    repetition_penalty, presence_penalty, frequency_penalty : float
        Optional penalties, as in vLLM (1.0, 0.0, 0.0 disable them).
    skip_special_tokens : bool
        Drop special tokens from ``text``.
    speculative : SpecConfig or str, optional
        Override the engine's speculative decoding for this request: ``"off"``, ``"ngram"``,
        ``"draft"`` or a :class:`disagg.spec.SpecConfig` (method and tree shape).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    max_tokens: int = 16
    stop: Optional[Union[str, list]] = None
    stop_token_ids: Optional[list] = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    speculative: object = None
    _stop_list: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        def num(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
            return v

        if num("temperature") < 0:
            bad("temperature", "must be >= 0")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad("top_k", "must be an int, -1 or 0 (disabled) or >= 1")
        if not 0 < num("top_p") <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) \
                or self.max_tokens < 1:
            bad("max_tokens", "must be an int >= 1")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "must be an int or None")
        if num("repetition_penalty") <= 0:
            bad("repetition_penalty", "must be > 0")
        if not -2 <= num("presence_penalty") <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= num("frequency_penalty") <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.n != 1:
            bad("n", "must be 1 (one completion per request)")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            bad("stop", "must be a non-empty string or a list of them")
        self._stop_list = stop
        if self.speculative is not None:
            from ..spec.config import SpecConfig

            try:
                self.speculative = SpecConfig.coerce(self.speculative)
            except ValueError as e:
                raise ValueError(f"SamplingParams.speculative: {e}") from None
        ids = list(self.stop_token_ids or [])
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            bad("stop_token_ids", "must be a list of non-negative ints")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def stop_strings(self) -> list:
        return self._stop_list

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def apply_penalties(logits: torch.Tensor, prompt_ids: list, output_ids: list,
                    p: SamplingParams) -> torch.Tensor:
    """vLLM's penalties on one row: repetition over prompt + output tokens, presence and
    frequency over output tokens."""
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        if seen.numel():
            v = logits[seen]
            logits[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if output_ids and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def sample_row(logits: torch.Tensor, p: SamplingParams,
               generator: Optional[torch.Generator]) -> int:
    """One token from a float32 row of logits under ``p`` (penalties already applied)."""
    if p.greedy:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    V = logits.shape[-1]
    if 0 < p.top_k < V:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token once the mass before it already reaches top_p; the top one always stays.
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False
        logits = logits.clone()
        logits[idx[drop]] = float("-inf")
    probs = torch.softmax(logits, -1)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        raise FloatingPointError("sampling probabilities are not finite (NaN/inf logits)")
    return int(torch.multinomial(probs, 1, generator=generator))
