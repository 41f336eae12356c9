"""Adapter for Hugging Face ``LlavaNextForConditionalGeneration`` (transformers >= 5.18): LLaVA-NeXT (LLaVA-1.6).

LLaVA-NeXT encodes every image as several tower rows — the base image and the crops of its anyres grid (up to
2x2 for the default ``image_grid_pinpoints``) — and packs them as the base image's patches followed by the crops'
patches on one unpadded grid, an ``image_newline`` token ending each of its rows. The LLaVA family's shared adapter
(:mod:`tokenreduce.backbones.llava.family`) runs the methods; what this adapter adds:

- vision-side methods (``TOWER_OUT``, or inside the CLIP tower) act on **every tower row alike**: ``keep`` (or
  VisionZip's ``dominant + contextual``) tokens per row, the base image and each crop, as the official VisionZip
  code for LLaVA-NeXT does; the rows' tokens are packed by :mod:`tokenreduce.backbones.llava.anyres` (base image,
  then the crops in grid order, no newline tokens inside a multi-row image), so an image of ``r`` rows gets exactly
  ``keep * r`` visual tokens (:func:`~tokenreduce.backbones.llava.anyres.reduced_image_tokens`); the prompt's
  placeholder run is resized to that count (it can grow: for a very elongated image the processor's unpadded
  count can be below ``keep * r`` at mild budgets);
- the tower site learns each image's crop count from ``image_sizes`` (CDPruner's per-image instruction reaches all
  its crops);
- in-LLM methods see the whole packed image — base, crops and newline tokens — as its visual tokens, and their
  budget (FastV's ``keep``, DART's pivots) counts over all of them.

See ``docs/backbones/llava_next.md``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch.nn as nn

from ...core.registry import register_adapter
from ..llava.family import LlavaFamilyAdapter, ReducedPacking
from ..patcher import Patcher

try:  # transformers is an optional dependency (the ``vlm`` extra)
    from transformers import LlavaNextForConditionalGeneration
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
except ImportError:  # pragma: no cover
    LlavaNextForConditionalGeneration = image_size_to_num_patches = None  # type: ignore


@register_adapter
class LlavaNextAdapter(LlavaFamilyAdapter):
    name = ("transformers LlavaNextForConditionalGeneration (LLaVA-NeXT, transformers >= 5.18; CLIP or SigLIP vision "
            "tower, anyres crops, for vision-side methods; a Llama-style language model for in-LLM methods)")
    model_class = LlavaNextForConditionalGeneration
    grow_runs = True  # an elongated image's unpadded count can be below rows x budget

    def rows_of(self, modality: str, arguments: Dict[str, Any]) -> Optional[List[int]]:
        sizes = arguments.get("image_sizes")
        if sizes is None:
            return None
        return [int(image_size_to_num_patches(image_size=s, grid_pinpoints=self.cfg.image_grid_pinpoints,
                                              patch_size=self.cfg.vision_config.image_size)) for s in sizes]

    def install_layout(self, patcher: Patcher, inner: nn.Module) -> None:
        patcher.set_attr(inner, "pack_image_features",
                         ReducedPacking(self, patcher.original(inner, "pack_image_features")))
