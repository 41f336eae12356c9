"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, anyres-max crops, videos, Qwen2."""
from .adapter import LlavaOnevisionAdapter

__all__ = ["LlavaOnevisionAdapter"]
