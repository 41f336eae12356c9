"""How many visual tokens a Qwen2.5-VL / Qwen3-VL image (or video) has after a tower-output reduction, as pure
functions of its size and the configured method — what a server (the vLLM plugin) must know before the encoder
runs.

- :func:`image_grid`: the processor's ``(t, h, w)`` patch grid of an image of ``height × width`` pixels
  (transformers' ``smart_resize``: sides rounded to multiples of ``patch_size · merge_size``, the pixel count kept
  within ``[min_pixels, max_pixels]``);
- :func:`merged_tokens`: the merger's tokens of a grid, ``t · h · w / merge_size²`` (what the unreduced model feeds
  the language model);
- :func:`tower_geometry`: the :class:`~tokenreduce.core.Geometry` the adapter gives ``TOWER_OUT`` methods (build the
  method with ``tokenreduce.build_method(name, tower_geometry(config), **params)``);
- :func:`reduced_tokens`: the method's count for that many merged tokens (``method.num_output``); a method whose count
  depends on the content is refused.

A video's budget is one count for the whole video; on Qwen3-VL (one placeholder run per frame) how the kept tokens
split across the frames depends on the content.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

from ...core import Geometry, ReductionMethod, Site


def image_grid(height: int, width: int, patch_size: int = 14, merge_size: int = 2, min_pixels: int = 56 * 56,
               max_pixels: int = 28 * 28 * 1280, temporal: int = 1) -> Tuple[int, int, int]:
    """``(t, h, w)`` in patches of an image (``temporal = 1``) or of ``temporal`` frame pairs, as the Qwen processor
    resizes it (Qwen2.5-VL: ``patch_size = 14``; Qwen3-VL: 16). The defaults are Qwen2.5-VL's processor's."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    h, w = smart_resize(int(height), int(width), factor=patch_size * merge_size, min_pixels=min_pixels,
                        max_pixels=max_pixels)
    return int(temporal), h // patch_size, w // patch_size


def merged_tokens(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Tokens the patch merger makes of a ``(t, h, w)`` grid."""
    t, h, w = (int(v) for v in grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"a {h} x {w} patch grid is not a whole number of {merge_size} x {merge_size} blocks")
    return t * h * w // (merge_size * merge_size)


def tower_geometry(config: Any) -> Geometry:
    """The geometry of the tower-output site of a Qwen2.5-VL / Qwen3-VL config (the model's ``config``)."""
    vc = config.vision_config
    return Geometry(num_blocks=int(vc.depth), num_prefix=0, num_patches=None, dim=int(vc.out_hidden_size),
                    num_heads=int(vc.num_heads), has_class_token=False, site=Site.TOWER_OUT)


def reduced_tokens(method: ReductionMethod, grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Visual tokens of one image (or video) of grid ``grid_thw`` after ``method`` (built for
    :func:`tower_geometry`): ``method.num_output(merged tokens)``.

    Raises:
        ValueError: the method does not act at the tower output, or its count depends on the content.
    """
    if method.site != Site.TOWER_OUT:
        raise ValueError(f"{method.name} acts at '{method.site.value}', not at the vision tower's output: the "
                         "language model still gets every merged token")
    n = merged_tokens(grid_thw, merge_size)
    out = method.num_output(n)
    if out is None:
        raise ValueError(f"{method.name} keeps a content-dependent number of tokens; it cannot be counted before "
                         "the encoder runs")
    return int(out)
