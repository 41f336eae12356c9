"""LLaVA-NeXT / LLaVA-OneVision "anyres" images after a vision-side reduction, as pure functions: how many visual
tokens an image gets, and in which order its reduced crops enter the language model.

An anyres image is encoded as several *tower rows*: the base image (the whole picture at the tower's resolution)
and the crops of the best-fitting grid of ``image_grid_pinpoints`` (``crop_rows x crop_cols`` crops, row-major).
Unreduced, Hugging Face packs them as the base image's patches, then the crops' patches on one big grid (unpadded,
for OneVision also interpolated down to ``anyres_max_N`` crops), an ``image_newline`` token ending every row of
that grid. An image encoded as a single row (OneVision's images in a multi-image prompt) is its patches plus one
newline; a OneVision video is every frame's 2x2-pooled patches plus one newline at the end.

A method acting at the tower (``TOWER_OUT``, or inside the tower's layers) reduces **every tower row to the same
number of tokens** ``t`` (``keep``; VisionZip's ``dominant + contextual``): the official VisionZip code for
LLaVA-NeXT gives the base image and every crop the same budget, so the papers' 640 / 320 / 160 tokens are 128 / 64
/ 32 per row times the 5 rows of a 2x2-crop image. The reduced image is then laid out by :func:`crop_order` /
:func:`pack_reduced`, following that code:

- the base image's tokens first, in the order the method returned them;
- then the crops' tokens that still stand for exactly one patch, in raster order of the whole crop grid (row by
  row across all crops, as LLaVA-NeXT orders its patches);
- then the crops' prefix tokens (CLS, where the method kept it), crop by crop;
- then every other crop token (merged or synthesised: VisionZip's contextual tokens, pooled cells, ToMe's merges),
  crop by crop in the method's order;
- **no newline tokens** in a multi-row image: a newline marks the end of a full row of the grid, and after pruning
  no row is full (VisionZip's LLaVA-NeXT code drops them the same way). A single-row image keeps its one trailing
  newline, and a video its final newline, as both the official codes and Hugging Face do.

No token is dropped for lying in the padding that unpadding would remove, so the count is exactly what was asked
and depends only on the image size and the budget (:func:`reduced_image_tokens`), which is what a server needs
before the encoder runs. A video's frames are reduced one by one (``t`` per frame, the 2x2 pooling skipped: the
method's budget replaces it): :func:`reduced_video_tokens`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

try:  # transformers is an optional dependency (the ``vlm`` extra); the counting needs only its pure resolution rule
    from transformers.image_processing_utils import select_best_resolution
except ImportError:  # pragma: no cover
    select_best_resolution = None  # type: ignore


def crop_grid(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tower_size: int) -> Tuple[int, int]:
    """``(crop_rows, crop_cols)`` of an image of ``image_size = (height, width)``: the best-fitting resolution of
    ``pinpoints`` (``[(height, width), ...]``, LLaVA's rule) divided by the tower's input size."""
    height, width = select_best_resolution([int(image_size[0]), int(image_size[1])], [list(p) for p in pinpoints])
    return int(height) // int(tower_size), int(width) // int(tower_size)


def tower_rows(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tower_size: int,
               crops: bool = True) -> int:
    """Tower rows an image is encoded as: the base image plus its crops, or 1 when it is not cropped (OneVision's
    images in a multi-image prompt)."""
    if not crops:
        return 1
    rows, cols = crop_grid(image_size, pinpoints, tower_size)
    return 1 + rows * cols


def unpadded_grid(image_size: Sequence[int], grid: Tuple[int, int]) -> Tuple[int, int]:
    """``(rows, cols)`` of patches left of a padded ``grid`` (patches of all crops) after removing the padding of an
    image of ``image_size = (height, width)`` (Hugging Face's ``unpad_image`` rule)."""
    height, width = int(image_size[0]), int(image_size[1])
    rows, cols = grid
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new) // 2)
    else:
        new = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new) // 2)
    return rows, cols


def full_image_tokens(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tower_size: int,
                      patch_grid: Tuple[int, int], tokens_per_row: int, crops: bool = True,
                      max_crops: Optional[int] = None) -> int:
    """Visual tokens of an **unreduced** image, as the Hugging Face processor counts them: the base image's
    ``tokens_per_row`` features plus the unpadded crop grid with one newline per row (interpolated down to about
    ``max_crops`` crops where OneVision's ``anyres_max_N`` applies); a single-row image is its features plus one
    newline."""
    if not crops:
        return tokens_per_row + 1
    crop_rows, crop_cols = crop_grid(image_size, pinpoints, tower_size)
    rows, cols = unpadded_grid(image_size, (crop_rows * patch_grid[0], crop_cols * patch_grid[1]))
    if max_crops is not None:
        ratio = math.sqrt(rows * cols / (max_crops * patch_grid[0] * patch_grid[1]))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return tokens_per_row + rows * cols + rows


def reduced_image_tokens(image_size: Sequence[int], tokens_per_row: int, pinpoints: Sequence[Sequence[int]],
                         tower_size: int, crops: bool = True) -> int:
    """Visual tokens of an image after a tower-side reduction that leaves ``tokens_per_row`` tokens per tower row
    (the method's ``num_output``): ``tokens_per_row x (1 + crops)``, plus the one newline of a single-row image.

    This is the placeholder count a server must reserve per image (vLLM's ``get_num_image_tokens``); it depends
    only on the image size and the budget.

    Args:
        image_size: ``(height, width)`` of the original image.
        tokens_per_row: tokens the method leaves per tower row (base image or crop).
        pinpoints: the model's ``config.image_grid_pinpoints``.
        tower_size: the tower's input size (``config.vision_config.image_size``).
        crops: False for an image encoded as a single row (OneVision, several images in one prompt).
    """
    rows = tower_rows(image_size, pinpoints, tower_size, crops)
    return int(tokens_per_row) * rows + (1 if rows == 1 else 0)


def reduced_video_tokens(num_frames: int, tokens_per_frame: int) -> int:
    """Visual tokens of a OneVision video after a tower-side reduction: ``tokens_per_frame`` per frame plus the
    video's one newline."""
    return int(num_frames) * int(tokens_per_frame) + 1


def crop_order(num_crops: int, tokens: int, kept: Optional[torch.Tensor], size: Optional[torch.Tensor],
               num_prefix: int, patch_grid: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
    """The order in which the reduced crops' tokens enter the language model (see the module docstring).

    Args:
        num_crops: crops of the image (tower rows after the base image), ``grid[0] * grid[1]`` of them, row-major.
        tokens: tokens per crop after the reduction.
        kept: ``[num_crops, tokens]`` index of each token among the tokens the method received (prefix first), or
            None when the method does not say (merging inside the tower): then no token is placed on the grid.
        size: ``[num_crops, tokens]`` patches each token stands for, or None (every token one).
        num_prefix: tokens before the patches where the method acted (1 for CLIP's CLS, 0 for SigLIP).
        patch_grid: ``(rows, cols)`` of patches per crop.
        grid: ``(crop_rows, crop_cols)``.

    Returns:
        ``[num_crops * tokens]`` int64 indices into the crops' tokens flattened crop-major.
    """
    device = kept.device if kept is not None else None
    slot = torch.arange(num_crops * tokens, device=device).view(num_crops, tokens)  # crop-major position
    if kept is None:
        return slot.flatten()
    crop = torch.arange(num_crops, device=device)[:, None].expand(num_crops, tokens)
    gh, gw = patch_grid
    patch = kept - num_prefix
    on_grid = patch >= 0
    if size is not None:
        on_grid = on_grid & (size == 1)
    row = (crop // grid[1]) * gh + patch.clamp(min=0) // gw
    col = (crop % grid[1]) * gw + patch.clamp(min=0) % gw
    raster = row * (grid[1] * gw) + col
    is_prefix = (kept >= 0) & (kept < num_prefix)
    group = torch.where(on_grid, 0, torch.where(is_prefix, 1, 2))
    within = torch.where(on_grid, raster, slot)
    span = max(grid[0] * gh * grid[1] * gw, num_crops * tokens)  # every raster index and slot is below it
    return (group * span + within).flatten().argsort(stable=True)


def pack_reduced(features: torch.Tensor, newline: Optional[torch.Tensor], kept: Optional[torch.Tensor],
                 size: Optional[torch.Tensor], num_prefix: int, patch_grid: Tuple[int, int],
                 grid: Optional[Tuple[int, int]]) -> torch.Tensor:
    """One reduced image's visual tokens ``[T, D]`` from its tower rows ``features [R, t, D]`` (base image first).

    A single row (``R == 1``) is its tokens plus ``newline`` (when the model has one); otherwise the base image's
    tokens, then the crops in :func:`crop_order`. ``kept`` / ``size`` are ``[R, t]`` as in :func:`crop_order`
    (rows of this image only), ``grid`` the crop grid (needed when ``R > 1``).
    """
    if features.shape[0] == 1:
        parts = [features[0]] + ([newline[None].to(features)] if newline is not None else [])
        return torch.cat(parts, dim=0)
    if grid is None or grid[0] * grid[1] != features.shape[0] - 1:
        raise ValueError(f"an image of {features.shape[0]} tower rows does not match its crop grid {grid}")
    crops = features[1:]
    order = crop_order(crops.shape[0], crops.shape[1], None if kept is None else kept[1:],
                       None if size is None else size[1:], num_prefix, patch_grid, grid)
    return torch.cat([features[0], crops.flatten(0, 1)[order.to(crops.device)]], dim=0)
