"""Adapters, one module per model family (a package per VLM family); importing this package registers them."""
from .base import Adapter, find_adapter
from . import timm_vit  # noqa: F401,E402  (registers the timm VisionTransformer adapter)
from . import hf_clip  # noqa: F401,E402  (registers the HF CLIP vision adapter)
from . import llava  # noqa: F401,E402  (registers the HF LLaVA adapter)
from . import llava_next  # noqa: F401,E402  (registers the HF LLaVA-NeXT adapter)
from . import llava_onevision  # noqa: F401,E402  (registers the HF LLaVA-OneVision adapter)
from . import qwen_vl  # noqa: F401,E402  (registers the HF Qwen2.5-VL / Qwen3-VL adapters)

__all__ = ["Adapter", "find_adapter"]
