"""Shared pieces of the worker ranks: sampling parameters from control messages (JSON).

The worker loop itself, for every role (``prefill``, ``decode``, colocated ``both``) and every
unit layout, is :class:`disagg.serve.pool.PoolWorker`.
"""
from __future__ import annotations

from ..engine import SamplingParams
from . import spec_options

_PARAM_KEYS = ("temperature", "top_k", "top_p", "seed", "max_tokens", "stop", "stop_token_ids",
               "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty",
               "include_stop_str_in_output", "skip_special_tokens")


def params_from_json(d: dict, engine=None) -> SamplingParams:
    return SamplingParams(**{k: d[k] for k in _PARAM_KEYS if k in d},
                          **spec_options.params_kwargs(d, engine))
