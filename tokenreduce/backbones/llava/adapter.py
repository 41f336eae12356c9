"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (transformers >= 5.18): LLaVA-1.5 and models built
like it.

Everything is the LLaVA family's shared adapter (:mod:`tokenreduce.backbones.llava.family`): one tower row per
image, the projected features scattered into the image's placeholder tokens as they are.

- ``BLOCK_MID`` / ``BLOCK_OUT`` (ToMe, PiToMe, ...): inside the tower's encoder layers, over the layers that feed
  LLaVA's features (``vision_feature_layer``; 23 of 24 for LLaVA-1.5). LLaVA's feature selection and projector then
  run unchanged on the fewer tokens.
- ``TOWER_OUT`` (VisionZip, ...): at the feature layer, before the projector.
- ``LLM_LAYER`` (DART, FastV, ...): inside the language model at prefill.
"""
from __future__ import annotations

from ...core.registry import register_adapter
from .family import LlavaFamilyAdapter

try:  # transformers is an optional dependency (the ``vlm`` extra)
    from transformers import LlavaForConditionalGeneration
except ImportError:  # pragma: no cover
    LlavaForConditionalGeneration = None  # type: ignore


@register_adapter
class LlavaAdapter(LlavaFamilyAdapter):
    name = ("transformers LlavaForConditionalGeneration (transformers >= 5.18; CLIP or SigLIP vision tower for "
            "vision-side methods, a Llama-style language model (Llama, Mistral, Qwen2, Qwen3) for in-LLM methods)")
    model_class = LlavaForConditionalGeneration
