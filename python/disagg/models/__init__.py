"""Model checkpoints that ship inside the package, so everything runs with no download.

``default`` is a small Mixtral-format MoE model and ``default-draft`` a smaller dense Llama
model with the same tokenizer, for speculative decoding. Both are HF-format folders that
``transformers`` loads as well; see README.md next to this file for what they are and are not.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

#: Names of the packaged checkpoints, each a folder next to this file.
MODELS = ("default", "default-draft")


def default_model_path(name: str = "default") -> str:
    """Returns the folder of a packaged checkpoint (``"default"`` or ``"default-draft"``)."""
    if name not in MODELS:
        raise ValueError(f"unknown packaged model {name!r}; available: {', '.join(MODELS)}")
    folder = importlib.resources.files(__name__) / name
    # The loaders read files by path; a package imported from a zip has no such folder.
    if not isinstance(folder, Path) or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"packaged model {name!r} not found at {folder}: the package was installed without "
            "its model files (they live in python/disagg/models/ of the source tree)"
        )
    return os.fspath(folder)


__all__ = ["MODELS", "default_model_path"]
