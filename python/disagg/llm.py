"""Offline generation with vLLM's conventions: ``LLM(model).generate(prompts, params)``."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from .engine import Engine, RequestOutput, SamplingParams
from .engine.request import CompletionOutput


class LLM:
    """A model plus an engine, for batch generation in this process.

    Parameters
    ----------
    model : str
        A HF-format folder (``config.json``, ``*.safetensors``, ``tokenizer.json``) or
        ``"default"`` for the model packaged with disagg.
    tokenizer : str, optional
        Folder with ``tokenizer.json`` when it is not the model folder.
    dtype : str
        ``"auto"``, ``"float32"`` or ``"bfloat16"``.
    **engine_kwargs
        Passed to :class:`disagg.engine.Engine` (``block_size``, ``num_blocks``,
        ``max_num_seqs``, ``max_num_batched_tokens``, ``enable_chunked_prefill``,
        ``max_model_len``).

    Examples
    --------
    >>> llm = LLM("default")
    >>> out = llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=32))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str = "default", tokenizer: Optional[str] = None,
                 dtype: str = "auto", **engine_kwargs):
        self.engine = Engine(model, tokenizer, dtype=dtype, **engine_kwargs)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[str, Sequence], sampling_params: Union[
            SamplingParams, Sequence[SamplingParams], None] = None,
            use_tqdm: bool = False) -> list:
        """Generate for every prompt; returns one ``RequestOutput`` per prompt, in order.

        Parameters
        ----------
        prompts : str, list of str, or list of ``{"prompt_token_ids": [...]}``
        sampling_params : SamplingParams or a list of them (one per prompt)

        Notes
        -----
        A prompt that is rejected (empty, too long, bad ids, bad sampling values) gets a
        ``RequestOutput`` with ``error`` set and ``finish_reason == "error"``; the others run.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        results: list = [None] * len(prompts)
        ids = {}
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                ids[self.engine.add_request(p, sp)] = i
            except ValueError as e:
                results[i] = RequestOutput(
                    request_id=f"rejected-{i}", prompt=p if isinstance(p, str) else None,
                    prompt_token_ids=list(p.get("prompt_token_ids", []))
                    if isinstance(p, dict) else [],
                    outputs=[CompletionOutput(0, "", [], "error")], finished=True, error=str(e))
        for out in self.engine.run():
            if out.request_id in ids:
                results[ids[out.request_id]] = out
        return results
