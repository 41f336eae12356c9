"""Adapter for Hugging Face ``LlavaOnevisionForConditionalGeneration`` (transformers >= 5.18): LLaVA-OneVision.

LLaVA-OneVision has a SigLIP tower (no CLS token; features of its last layer, all tokens kept), a Qwen2 language
model and two visual inputs with their own placeholder tokens:

- **images**: a single image of a prompt is encoded as its base image plus the crops of its anyres grid (up to 6x6
  for the default pinpoints), packed like LLaVA-NeXT's — base, then the crops' unpadded grid with a newline ending
  each row, interpolated down to about ``anyres_max_9`` crops; an image of a multi-image prompt
  (``batch_num_images``) is one row, its patches plus one newline;
- **videos**: every frame is one tower row; its patches are 2x2-pooled (bilinear) and the frames are concatenated,
  with one newline at the end of the video.

The LLaVA family's shared adapter (:mod:`tokenreduce.backbones.llava.family`) runs the methods; what this adapter
adds:

- vision-side methods act on **every tower row alike**: ``keep`` (VisionZip: ``dominant + contextual``) tokens per
  base image, crop and video frame. Images are packed by :mod:`tokenreduce.backbones.llava.anyres` (base, crops in
  grid order, no newline inside a multi-row image, no anyres-max interpolation: the budget already bounds the
  count); a video's frames keep their ``keep`` tokens each, without the 2x2 pooling (the method's budget replaces
  it; above the pooled count per frame a video gets more tokens than unpatched), plus the video's newline. The
  prompt's placeholder runs are resized to these counts (they can grow: for an elongated image the processor's
  unpadded count can be below ``keep * rows``). Counts: :func:`~tokenreduce.backbones.llava.anyres.reduced_image_tokens`,
  :func:`~tokenreduce.backbones.llava.anyres.reduced_video_tokens`;
- SigLIP has no CLS token: methods that rank by CLS attention are refused; FasterVLM / VisPruner / VisionZip rank by
  the attention each patch receives (``Need.ATTN_ROWS`` at the tower site);
- in-LLM methods see every image and video placeholder token (newlines included) as a visual token.

See ``docs/backbones/llava_onevision.md``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...core.registry import register_adapter
from ..llava.family import LlavaFamilyAdapter, ReducedPacking
from ..patcher import Original, Patcher, Replacement
from ..vlm.shrink import Modality

try:  # transformers is an optional dependency (the ``vlm`` extra)
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
except ImportError:  # pragma: no cover
    LlavaOnevisionForConditionalGeneration = image_size_to_num_patches = None  # type: ignore


class PoolingSkip(Replacement):
    """``apply_pooling`` of a patched LLaVA-OneVision: a video's frames that came back reduced keep their tokens
    (the 2x2 pooling needs the full patch grid, and the method's budget replaces it); full frames are pooled as
    before."""

    def __init__(self, adapter: "LlavaOnevisionAdapter", original: Original) -> None:
        self.adapter, self.original = adapter, original

    def __call__(self, image_features: torch.Tensor) -> torch.Tensor:
        _, _, reduced = self.adapter.tower_selection(int(image_features.shape[0]), int(image_features.shape[1]))
        return image_features if reduced else self.original(image_features)


@register_adapter
class LlavaOnevisionAdapter(LlavaFamilyAdapter):
    name = ("transformers LlavaOnevisionForConditionalGeneration (LLaVA-OneVision, transformers >= 5.18; SigLIP or "
            "CLIP vision tower, anyres-max crops and videos, for vision-side methods; a Llama-style language model "
            "(Qwen2) for in-LLM methods)")
    model_class = LlavaOnevisionForConditionalGeneration
    grow_runs = True  # an elongated image's unpadded count (or a video's pooled one) can be below rows x budget
    feature_functions = {"image": "get_image_features", "video": "get_video_features"}
    image_kwargs = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes", "vision_aspect_ratio",
                    "batch_num_images")
    video_kwargs: Tuple[str, ...] = ("vision_feature_layer", "vision_feature_select_strategy")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.video_token_id = int(self.cfg.video_token_id)

    @property
    def visual_token_ids(self) -> Tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def rows_of(self, modality: str, arguments: Dict[str, Any]) -> Optional[List[int]]:
        if modality == "video":
            videos = arguments.get("pixel_values_videos")
            return None if videos is None else [int(videos.shape[1])] * int(videos.shape[0])
        sizes = arguments.get("image_sizes")
        if sizes is None:
            return None
        counts = arguments.get("batch_num_images")
        crops = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        return [int(image_size_to_num_patches(image_size=s, grid_pinpoints=self.cfg.image_grid_pinpoints,
                                              patch_size=self.cfg.vision_config.image_size)) if c else 1
                for s, c in zip(sizes, crops)]

    def extra_modalities(self, inner: nn.Module) -> Sequence[Modality]:
        return (Modality("video", "pixel_values_videos", self.video_token_id, inner.get_video_features,
                         self.video_kwargs, grow=True),)

    def install_layout(self, patcher: Patcher, inner: nn.Module) -> None:
        patcher.set_attr(inner, "pack_image_features",
                         ReducedPacking(self, patcher.original(inner, "pack_image_features")))
        patcher.set_attr(inner, "apply_pooling", PoolingSkip(self, patcher.original(inner, "apply_pooling")))
