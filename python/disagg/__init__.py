"""disagg: kernels and a reference runtime for disaggregated Mixture-of-Experts inference.

``import disagg`` registers the ``torch.ops.disagg.*`` operators (CPU always, CUDA when built
with it) and their fake kernels, and exposes the Python API.
"""
from ._loader import load_extension as _load_extension

_load_extension()

from . import _fake  # noqa: E402,F401  (register_fake for every op)
from . import ops  # noqa: E402
from .moe import EPDispatcher, MoERouter  # noqa: E402
from .kv import OutOfBlocksError, PagedKVCache  # noqa: E402
from .engine import SamplingParams  # noqa: E402
from .llm import LLM  # noqa: E402
from .spec import SpeculativeDecoder  # noqa: E402
from .serve.system import DisaggregatedInferenceSystem, InferenceConfig  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ops", "MoERouter", "EPDispatcher", "PagedKVCache", "OutOfBlocksError", "LLM",
           "SamplingParams", "SpeculativeDecoder", "InferenceConfig", "DisaggregatedInferenceSystem",
           "__version__"]
