"""Speculative decoding: drafters (draft model, n-gram lookup), tree shapes (static, dynamic),
tree verification inside the engine, and the ``SpeculativeDecoder`` API."""
from .config import SpecConfig, TreeShape, add_spec_args, spec_config_from_args
from .decoder import SpeculativeDecoder
from .drafters import DraftTree, ModelDrafter, NgramDrafter
from .runner import SpecMetrics, SpecRunner

__all__ = ["DraftTree", "ModelDrafter", "NgramDrafter", "SpecConfig", "SpecMetrics",
           "SpecRunner", "SpeculativeDecoder", "TreeShape", "add_spec_args",
           "spec_config_from_args"]
