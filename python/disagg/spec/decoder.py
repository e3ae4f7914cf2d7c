"""``SpeculativeDecoder``: the chapter's one-call API over an engine that speculates."""
from __future__ import annotations

from typing import Optional, Union

from .config import SpecConfig, TreeShape


class SpeculativeDecoder:
    """Draft-and-verify generation with a target model and a draft model (or n-gram lookup).

    Every step drafts a token tree, verifies all of it in one target forward (tree attention
    over the paged context), keeps the accepted path's KV and appends the target's bonus token.
    Greedy output is the target's own greedy output; sampled output has the target's
    distribution.

    Parameters
    ----------
    target : str or CausalLM
        Target model folder, ``"default"`` (packaged) or a loaded model.
    draft : str or CausalLM, optional
        Draft model sharing the target's tokenizer; ``"default-draft"`` by default. Ignored
        for ``method="ngram"``.
    method : {"draft", "ngram"}
    tree : TreeShape or str, optional
        ``"chain:K"``, ``"static:B1,B2,..."`` or ``"dynamic:NODES,DEPTH,TOPK"``. Default:
        ``static:2,2`` for a draft model (its second choices are often the target's) and
        ``chain:4`` for n-gram lookup (one continuation is usually all there is).
    dtype : str
        Model dtype for both models.
    **engine_kwargs
        Passed to :class:`disagg.engine.Engine`.

    Examples
    --------
    >>> decoder = SpeculativeDecoder()
    >>> tokens = decoder.speculative_decode("def fib(n):", target_tokens=20)
    >>> decoder.last_text, decoder.metrics()["acceptance_length"]
    """

    def __init__(self, target="default", draft="default-draft", *, method: str = "draft",
                 tree: Union[TreeShape, str, None] = None, dtype: str = "auto",
                 stochastic: bool = False, **engine_kwargs):
        from ..engine import Engine

        if method not in ("draft", "ngram"):
            raise ValueError(f"SpeculativeDecoder: method must be 'draft' or 'ngram', got "
                             f"{method!r}")
        if tree is None:
            tree = "static:2,2" if method == "draft" else "chain:4"
        self.config = SpecConfig(method=method, tree=tree, stochastic=stochastic,
                                 draft_model=draft if method == "draft" else None)
        self.engine = Engine(target, dtype=dtype, speculative=self.config, **engine_kwargs)
        self.last_text: str = ""
        self.last_output = None

    def speculative_decode(self, prompt, target_tokens: int = 20, *, temperature: float = 0.0,
                           top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                           ignore_eos: bool = False) -> list:
        """Generate up to ``target_tokens`` tokens after ``prompt``.

        Parameters
        ----------
        prompt : str or list of int
        target_tokens : int
            Tokens to generate (fewer if the model ends the sequence).
        temperature, top_k, top_p, seed
            Sampling as in :class:`SamplingParams`; ``temperature=0`` is greedy.

        Returns
        -------
        list of int
            The generated token ids; the text is in :attr:`last_text`.
        """
        from ..engine import SamplingParams

        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_tokens=target_tokens, ignore_eos=ignore_eos)
        p = {"prompt_token_ids": list(prompt)} if isinstance(prompt, (list, tuple)) else prompt
        self.engine.add_request(p, params)
        out = [o for o in self.engine.run()][-1]
        if out.error:
            raise RuntimeError(f"speculative_decode failed: {out.error}")
        self.last_output = out
        self.last_text = out.outputs[0].text
        return list(out.outputs[0].token_ids)

    def metrics(self) -> dict:
        """Acceptance length, acceptance rate by depth, draft and verify time (cumulative)."""
        return self.engine.spec_metrics()
