"""HF-format model loading and the decoder used by the runtime."""
from .attention import AttentionMetadata
from .config import ModelConfig, SUPPORTED_ARCHITECTURES
from .loader import resolve_model_path
from .model import CausalLM

__all__ = ["AttentionMetadata", "CausalLM", "ModelConfig", "SUPPORTED_ARCHITECTURES",
           "resolve_model_path"]
