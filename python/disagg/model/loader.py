"""Finding a model folder and reading its safetensors weights (single file or sharded)."""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch

# Names that resolve to checkpoints shipped inside the package.
PACKAGED_MODELS = ("default", "default-draft")


def resolve_model_path(model: str) -> str:
    """Turn ``model`` into a local folder.

    ``"default"`` and ``"default-draft"`` are the checkpoints packaged under
    ``disagg/models/``; anything else must be a folder holding ``config.json``.

    Raises
    ------
    FileNotFoundError
        Naming the path that was tried.
    """
    if model in PACKAGED_MODELS:
        from importlib import resources

        path = str(resources.files("disagg").joinpath("models", model))
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"the packaged model {model!r} is missing from this install (looked in {path})")
        return path
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {model!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in model folder {path!r}")
    return path


def safetensors_files(path: str) -> list[str]:
    """The weight files of a folder: those listed by ``model.safetensors.index.json`` when it
    exists, else every ``*.safetensors``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path!r}")
    return [os.path.join(path, f) for f in files]


class WeightStore:
    """Lazy access to every tensor of a checkpoint by name, across shards.

    ``get(name)`` loads one tensor, converted to ``dtype``; ``require`` raises a ``KeyError``
    that names the missing tensor and the folder.
    """

    def __init__(self, path: str, dtype: torch.dtype):
        from safetensors import safe_open

        self.path = path
        self.dtype = dtype
        self._handles = []
        self._where: dict[str, int] = {}
        for i, f in enumerate(safetensors_files(path)):
            h = safe_open(f, framework="pt", device="cpu")
            self._handles.append(h)
            for k in h.keys():
                self._where[k] = i
        self.used: set[str] = set()

    def names(self) -> Iterable[str]:
        return self._where.keys()

    def has(self, name: str) -> bool:
        return name in self._where

    def stored_dtype(self, name: str) -> Optional[torch.dtype]:
        """The dtype ``name`` has in the checkpoint (None if absent or not a float type)."""
        if name not in self._where:
            return None
        code = self._handles[self._where[name]].get_slice(name).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(code)

    def get(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        self.used.add(name)
        t = self._handles[self._where[name]].get_tensor(name)
        return t.to(dtype or self.dtype).contiguous()

    def get_part(self, name: str, index: tuple, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Read only ``tensor[index]`` (a tuple of slices) from disk: a parallel rank loads its
        shard without materializing the whole tensor."""
        if name not in self._where:
            raise KeyError(f"checkpoint {self.path!r} is missing tensor {name!r}")
        self.used.add(name)
        t = self._handles[self._where[name]].get_slice(name)[index]
        return t.to(dtype or self.dtype).contiguous()

    def require(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"checkpoint {self.path!r} is missing tensor {name!r}")
        return self.get(name, dtype)

    def first(self, *names: str) -> torch.Tensor:
        """The first of several alternative spellings that the checkpoint holds."""
        for n in names:
            if n in self._where:
                return self.get(n)
        raise KeyError(f"checkpoint {self.path!r} is missing tensor {names[0]!r}"
                       + (f" (also tried {list(names[1:])})" if len(names) > 1 else ""))
