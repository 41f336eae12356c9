"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops plus the base image through a CLIP tower."""
from .adapter import LlavaNextAdapter

__all__ = ["LlavaNextAdapter"]
