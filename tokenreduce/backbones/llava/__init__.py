"""LLaVA-1.5 (``LlavaForConditionalGeneration``): the adapter that wires the shared VLM sites to LLaVA's modules."""
from .adapter import LlavaAdapter

__all__ = ["LlavaAdapter"]
