"""Tokenizer access through the ``tokenizers`` library (``tokenizer.json``)."""
from __future__ import annotations

import json
import os
from typing import Optional


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids the engine needs.

    Parameters
    ----------
    path : str
        A model folder holding ``tokenizer.json`` (and optionally ``tokenizer_config.json``
        / ``generation_config.json`` naming special tokens).
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        f = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}")
        self._tok = _Tok.from_file(f)
        self.eos_token_ids: list = []
        gen = os.path.join(path, "generation_config.json")
        for cfg_file in (gen, os.path.join(path, "config.json")):
            if os.path.isfile(cfg_file) and not self.eos_token_ids:
                with open(cfg_file) as fh:
                    eos = json.load(fh).get("eos_token_id")
                if eos is not None:
                    self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        self.special_ids = {t.id if hasattr(t, "id") else v
                            for v, t in self._added_tokens() if getattr(t, "special", True)}

    def _added_tokens(self):
        try:
            return list(self._tok.get_added_tokens_decoder().items())
        except AttributeError:
            return []

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str) -> Optional[Tokenizer]:
    """The folder's tokenizer, or None when it ships none (token-id prompts still work)."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    return Tokenizer(path)
