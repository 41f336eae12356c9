"""Pictures of what a token-reduction method did to an image.

Three layers, each usable on its own:

- **Pure functions** (numpy in, numpy out; no model): :func:`source_to_labels` turns a ``source`` matrix
  ``[N, N0]`` into a per-patch label map (which output token holds each patch; ``-1`` for a patch that was
  dropped), :func:`kept_to_alive` composes the per-site ``kept`` indices of a pruning method into the input
  tokens that survived, :func:`render_overlay` draws a label map over an image ToMe-style (each output token's
  patches filled with one colour, borders between groups, dropped patches greyed out).
- **Recording** (:func:`record_layers`): runs a patched model once and captures, after every block, the label
  map of the token set at that point. It uses only the public API — a forward hook on each block calls
  :func:`tokenreduce.info`, which describes the forward so far — so every registered method works without the
  method or the adapter knowing about visualisation. Models patched with ``trace_source=True`` give merges and
  drops (a pruned token simply vanishes from ``source``); otherwise the ``kept`` indices give drops.
- **Figures and commands**: :func:`visualize` (patch, run, draw a grid of the blocks where the token set
  changed), :func:`visualize_main` (``tokenreduce visualize``) and :func:`plot_main` (``tokenreduce plot``:
  accuracy against GFLOPs and against images per second from ``tokenreduce eval`` results files).

Supported models: timm ``VisionTransformer`` (every method with a ``block_mid`` / ``block_out`` site), Hugging
Face ``CLIPVisionModel`` and the CLIP vision tower of ``LlavaForConditionalGeneration`` (tower methods run
through ``get_image_features``; a method that reports neither ``source`` nor ``kept`` indices over the patches
draws as "no change").
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import api
from .methods import Site, get_method

__all__ = [
    "LayerRecord", "ModelView", "alive_to_labels", "canonical_labels", "capture", "changed_layers", "kept_to_alive",
    "layer_grid", "load_image", "model_view", "plot_main", "plot_results", "read_results", "record_layers",
    "render_overlay", "same_grouping", "save_png", "source_to_labels", "visualize", "visualize_main",
]

#: Colour of the lines between groups (RGB, 0-255).
BORDER = (255, 255, 255)
#: Grey level that dropped patches are washed towards (0-1).
DROPPED_GREY = 0.82


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: token bookkeeping -> label maps
# ---------------------------------------------------------------------------------------------------------------
def _numpy(a: Any) -> np.ndarray:
    if torch.is_tensor(a):
        return a.detach().float().cpu().numpy() if a.is_floating_point() else a.detach().cpu().numpy()
    return np.asarray(a)


def source_to_labels(source: Any, num_prefix: int, grid: Tuple[int, int]) -> np.ndarray:
    """Which output token holds each patch.

    Args:
        source: ``[N, N0]`` 0/1 membership (row: output token, column: input token), prefix tokens first in both
            (``info(model).source[b]``).
        num_prefix: prefix tokens (CLS, dist, registers) at the start of the ``N0`` input tokens.
        grid: ``(rows, cols)`` of the patch grid; ``rows * cols == N0 - num_prefix``.

    Returns:
        ``[rows, cols]`` int64: the output-token index (row of ``source``) that holds each patch, or ``-1`` where
        no output token holds it (the patch was pruned).
    """
    src = _numpy(source)
    if src.ndim != 2:
        raise ValueError(f"source must be [N, N0], got shape {src.shape} (pick one image: source[b])")
    rows, cols = grid
    n0 = src.shape[1]
    if n0 - num_prefix != rows * cols:
        raise ValueError(f"source has {n0} input tokens; {num_prefix} prefix + a {rows}x{cols} grid needs "
                         f"{num_prefix + rows * cols}")
    patches = src[:, num_prefix:] > 0.5
    labels = np.where(patches.any(axis=0), patches.argmax(axis=0), -1).astype(np.int64)
    return labels.reshape(rows, cols)


def kept_to_alive(kept: Mapping[int, Any], num_tokens: int, batch_index: int = 0,
                  upto: Optional[int] = None) -> np.ndarray:
    """The input tokens still present after a chain of pruning steps.

    Args:
        kept: ``{layer: indices}``, each ``[B, N_out]`` (or ``[N_out]``) indices into that site's input tokens, as
            in ``info(model).kept``. Steps apply in layer order.
        num_tokens: ``N0``, the tokens entering the first step (prefix included).
        batch_index: which image of the batch.
        upto: only the steps at layers ``<= upto`` (all when None).

    Returns:
        ``[N0]`` bool: True for the input tokens that survived every step.

    Only valid for pure pruning (each step keeps a subset of the previous step's tokens); where a method also
    merges, trace ``source`` instead.
    """
    alive = np.arange(num_tokens)
    for layer in sorted(kept):
        if upto is not None and layer > upto:
            break
        idx = _numpy(kept[layer]).astype(np.int64)
        if idx.ndim == 2:
            idx = idx[batch_index]
        if idx.size and (idx.min() < 0 or idx.max() >= alive.size):
            raise ValueError(f"kept[{layer}] indexes {idx.max()} but only {alive.size} tokens enter that step")
        alive = alive[idx]
    mask = np.zeros(num_tokens, dtype=bool)
    mask[alive] = True
    return mask


def alive_to_labels(alive: Any, num_prefix: int, grid: Tuple[int, int]) -> np.ndarray:
    """Label map for pure pruning: every surviving patch its own group (labelled by its input-token index,
    prefix included, like the rows of an identity ``source``), ``-1`` if dropped."""
    alive = _numpy(alive).astype(bool)
    rows, cols = grid
    if alive.size - num_prefix != rows * cols:
        raise ValueError(f"{alive.size} tokens; {num_prefix} prefix + a {rows}x{cols} grid needs "
                         f"{num_prefix + rows * cols}")
    patch = alive[num_prefix:]
    return np.where(patch, num_prefix + np.arange(patch.size), -1).astype(np.int64).reshape(rows, cols)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel groups ``0, 1, ...`` in order of first appearance (row-major), ``-1`` kept: two label maps describe
    the same grouping exactly when their canonical forms are equal."""
    flat = np.asarray(labels).ravel()
    out = np.full(flat.shape, -1, dtype=np.int64)
    valid = flat >= 0
    if valid.any():
        _, first, inverse = np.unique(flat[valid], return_index=True, return_inverse=True)
        rank = np.empty(first.size, dtype=np.int64)
        rank[np.argsort(first)] = np.arange(first.size)
        out[valid] = rank[inverse]
    return out.reshape(np.shape(labels))


def same_grouping(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label maps group (and drop) the patches identically, whatever the label values."""
    return np.shape(a) == np.shape(b) and bool(np.array_equal(canonical_labels(a), canonical_labels(b)))


def upsample_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[rows, cols]`` -> ``[height, width]`` by nearest neighbour (any size, not only multiples)."""
    rows, cols = labels.shape
    ry = (np.arange(height) * rows) // height
    rx = (np.arange(width) * cols) // width
    return labels[ry[:, None], rx[None, :]]


def group_borders(pixel_labels: np.ndarray, width: int = 1) -> np.ndarray:
    """``[H, W]`` bool: pixels on a border between two different labels (the first pixel after each change,
    grown to lines ``width`` pixels wide)."""
    edge = np.zeros(pixel_labels.shape, dtype=bool)
    edge[1:, :] |= pixel_labels[1:, :] != pixel_labels[:-1, :]
    edge[:, 1:] |= pixel_labels[:, 1:] != pixel_labels[:, :-1]
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def label_colors(num: int, seed: int = 0) -> np.ndarray:
    """``[num, 3]`` float colours in [0, 1], well separated (golden-ratio hue steps), deterministic."""
    rng = np.random.default_rng(seed)
    start = rng.random()
    hues = (start + 0.61803398875 * np.arange(num)) % 1.0
    sat = 0.55 + 0.35 * ((np.arange(num) * 7) % 3) / 2
    val = 0.95 - 0.2 * ((np.arange(num) * 5) % 2)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sat, val)]).reshape(num, 3)


def _as_float_image(image: Any) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    img = _numpy(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"image must be [H, W, 3] (or a PIL image), got shape {img.shape}")
    integer = np.issubdtype(img.dtype, np.integer)
    img = img[:, :, :3].astype(np.float64)
    return img / 255.0 if integer else img


def render_overlay(image: Any, labels: np.ndarray, *, fill: str = "mean", alpha: float = 0.8,
                   border: Optional[Tuple[int, int, int]] = BORDER, border_width: int = 1,
                   singletons: bool = False, hatch: int = 6) -> np.ndarray:
    """Draw a label map over an image.

    Args:
        image: ``[H, W, 3]`` uint8 or float in [0, 1], or a PIL image: what the model saw (after the crop).
        labels: ``[rows, cols]`` output-token index per patch, ``-1`` for dropped patches
            (:func:`source_to_labels`, :func:`alive_to_labels`).
        fill: ``"mean"``: each group filled with the mean colour of its pixels (ToMe's pictures);
            ``"palette"``: a distinct colour per group; ``"none"``: the image itself (borders and greying only).
        alpha: how strongly the fill replaces the image (1: flat fill).
        border: RGB colour of the lines between groups (and around dropped areas); None for no lines.
        border_width: line width in pixels.
        singletons: also fill tokens that hold a single patch (by default they show the image unchanged).
        hatch: spacing in pixels of the diagonal lines over dropped patches (0: plain grey).

    Returns:
        ``[H, W, 3]`` uint8.
    """
    if fill not in ("mean", "palette", "none"):
        raise ValueError(f"fill must be 'mean', 'palette' or 'none', got {fill!r}")
    img = _as_float_image(image)
    h, w = img.shape[:2]
    labels = np.asarray(labels)
    pix = upsample_labels(labels, h, w)
    out = img.copy()
    valid = labels[labels >= 0]
    if valid.size and fill != "none":
        ids, counts = np.unique(valid, return_counts=True)
        dense = np.searchsorted(ids, np.where(pix >= 0, pix, ids[0]))
        members = pix >= 0
        if fill == "mean":
            sums = np.zeros((ids.size, 3))
            np.add.at(sums, dense[members], img[members])
            npix = np.bincount(dense[members], minlength=ids.size)[:, None]
            colors = sums / np.maximum(npix, 1)
        else:
            colors = label_colors(ids.size)
        grouped = counts > 1 if not singletons else np.ones(ids.size, dtype=bool)
        paint = members & grouped[dense]
        out[paint] = (1 - alpha) * img[paint] + alpha * colors[dense[paint]]
    dropped = pix < 0
    if dropped.any():
        lum = img[dropped] @ np.array([0.299, 0.587, 0.114])
        out[dropped] = (0.25 * lum + 0.75 * DROPPED_GREY)[:, None]
        if hatch:  # thin diagonal lines, so dropped areas never read as a light part of the image
            yy, xx = np.nonzero(dropped)
            on = ((yy + xx) % max(2, int(hatch))) == 0
            out[yy[on], xx[on]] = DROPPED_GREY - 0.22
    if border is not None:
        edge = group_borders(pix, border_width)
        out[edge] = np.asarray(border, dtype=np.float64) / 255.0
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Models: where the patches and blocks are, how to feed an image
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelView:
    """What visualisation needs to know about a supported model.

    Attributes:
        kind: ``"timm"``, ``"clip"`` or ``"llava"``.
        blocks: the transformer blocks / encoder layers, in order (forward hooks go here).
        num_prefix: prefix tokens before the patches.
        grid: ``(rows, cols)`` patch grid at ``img_size``.
        img_size: ``(height, width)`` input size.
        in_chans: input channels.
        mean, std: input normalisation.
        crop_pct: centre-crop fraction of the evaluation preprocessing.
    """

    kind: str
    blocks: List[nn.Module]
    num_prefix: int
    grid: Tuple[int, int]
    img_size: Tuple[int, int]
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_pct: float = 1.0


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def model_view(model: nn.Module, img_size: Optional[int] = None) -> ModelView:
    """The :class:`ModelView` of a timm ViT, a HF CLIP vision model or a HF LLaVA model (its vision tower)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        VisionTransformer = None
    if VisionTransformer is not None and isinstance(model, VisionTransformer):
        pe = model.patch_embed
        if img_size is not None and hasattr(pe, "dynamic_feat_size") and getattr(model, "dynamic_img_size", False):
            hw = (int(img_size), int(img_size))
            grid = tuple(int(v) for v in pe.dynamic_feat_size(hw))
        else:
            hw = tuple(int(v) for v in pe.img_size)
            grid = tuple(int(v) for v in pe.grid_size)
            if img_size is not None and (int(img_size), int(img_size)) != hw:
                raise ValueError(f"this model takes {hw[0]}x{hw[1]} inputs (it was not built with "
                                 f"dynamic_img_size=True); img_size={img_size} is not possible")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        in_chans = int(getattr(pe.proj, "in_channels", 3)) if hasattr(pe, "proj") else 3
        mean = tuple(cfg.get("mean", (0.5,) * in_chans))
        std = tuple(cfg.get("std", (0.5,) * in_chans))
        return ModelView("timm", list(model.blocks), int(model.num_prefix_tokens), grid, hw, in_chans, mean, std,
                         float(cfg.get("crop_pct", 0.9) or 1.0))
    tower, kind = _clip_tower(model)
    if tower is not None:
        cfg = tower.config
        size, patch = int(cfg.image_size), int(cfg.patch_size)
        return ModelView(kind, list(tower.encoder.layers), 1, (size // patch, size // patch), (size, size),
                         int(getattr(cfg, "num_channels", 3)), _CLIP_MEAN, _CLIP_STD, 1.0)
    raise ValueError(f"cannot visualise a {type(model).__name__}: supported are timm VisionTransformer, "
                     "transformers CLIPVisionModel(WithProjection) and LlavaForConditionalGeneration")


def _clip_tower(model: nn.Module) -> Tuple[Optional[nn.Module], str]:
    try:
        from transformers.models.clip.modeling_clip import CLIPVisionModel, CLIPVisionModelWithProjection
    except ImportError:
        return None, ""
    if isinstance(model, CLIPVisionModel):
        return model, "clip"
    if isinstance(model, CLIPVisionModelWithProjection):
        return model.vision_model, "clip"
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError:  # pragma: no cover
        return None, ""
    if isinstance(model, LlavaForConditionalGeneration):
        tower = model.model.vision_tower
        if isinstance(tower, CLIPVisionModel):
            return tower, "llava"
    return None, ""


def _run(model: nn.Module, view: ModelView, pixels: torch.Tensor) -> None:
    with torch.inference_mode():
        if view.kind == "timm":
            model(pixels)
        elif view.kind == "clip":
            model(pixel_values=pixels)
        else:  # LLaVA: the vision side only (tower, feature selection, projector)
            model.model.get_image_features(pixel_values=pixels)


def load_image(path: Union[str, Path, Any], size: Tuple[int, int], crop_pct: float = 1.0):
    """A PIL RGB image resized (bicubic) so its shorter side is ``size / crop_pct`` and centre-cropped to ``size``
    (timm's evaluation transform)."""
    from PIL import Image
    img = path if hasattr(path, "convert") else Image.open(path)
    img = img.convert("RGB")
    th, tw = size
    scale = max(th, tw) / max(crop_pct, 1e-6) / min(img.size)
    new = (max(tw, round(img.size[0] * scale)), max(th, round(img.size[1] * scale)))
    img = img.resize(new, Image.BICUBIC)
    left, top = (new[0] - tw) // 2, (new[1] - th) // 2
    return img.crop((left, top, left + tw, top + th))


def to_tensor(image, view: ModelView) -> torch.Tensor:
    """``[1, C, H, W]`` normalised input for the model from a cropped PIL image."""
    arr = np.asarray(image.convert("L" if view.in_chans == 1 else "RGB"), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(view.mean[: x.shape[0]], dtype=torch.float32)[:, None, None]
    std = torch.tensor(view.std[: x.shape[0]], dtype=torch.float32)[:, None, None]
    if mean.shape[0] != x.shape[0]:
        mean, std = mean[:1], std[:1]
    return ((x - mean) / std)[None]


# ---------------------------------------------------------------------------------------------------------------
# Recording the token set after every block
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """The token set after one block.

    Attributes:
        layer: block index (``-1``: the input, before any block).
        tokens: tokens leaving the block (prefix included).
        labels: ``[rows, cols]`` label map (:func:`source_to_labels`); ``-1`` marks dropped patches.
        exact: False when the picture is incomplete: tokens were merged but no ``source`` says which (e.g.
            VisionZip's contextual tokens, or a model patched without ``trace_source``). The labels then show the
            kept tokens (patches merged away look dropped), or no change when nothing was reported.
    """

    layer: int
    tokens: int
    labels: np.ndarray
    exact: bool = True


def labels_from_info(info, view: ModelView, batch_index: int = 0, upto: Optional[int] = None
                     ) -> Tuple[np.ndarray, bool]:
    """The label map of a :class:`~tokenreduce.ReductionInfo` (``source`` first, else ``kept``)."""
    rows, cols = view.grid
    n0 = view.num_prefix + rows * cols
    if info.source is not None and info.source.shape[-1] == n0:
        return source_to_labels(info.source[batch_index], view.num_prefix, view.grid), True
    merged = info.size is not None and bool((info.size[batch_index] > 1).any())
    kept = {k: v for k, v in (info.kept or {}).items() if upto is None or k <= upto}
    if kept:
        try:
            alive = kept_to_alive(kept, n0, batch_index)
            # kept indices alone cannot say where merged tokens went: exact only for pure pruning
            return alive_to_labels(alive, view.num_prefix, view.grid), not merged
        except (ValueError, IndexError):
            pass  # kept indices over something other than this tower's tokens (e.g. an LLM sequence)
    identity = view.num_prefix + np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    return identity, not merged and not kept


def record_layers(model: nn.Module, pixels: torch.Tensor, batch_index: int = 0,
                  view: Optional[ModelView] = None) -> List[LayerRecord]:
    """Run a patched model on ``pixels`` and capture the token set after every block.

    A forward hook on each block calls :func:`tokenreduce.info`, which describes the forward so far, so this
    works for every method and adapter that fills ``info`` as blocks run. Adapters that only know the result at
    the end (LLaVA's tower-output site) give one record after the forward.

    Returns:
        The input (``layer=-1``) and one :class:`LayerRecord` per block that reported, then (if different) the
        final state after the forward, in order.
    """
    view = view or model_view(model, pixels.shape[-1])
    rows, cols = view.grid
    records = [LayerRecord(-1, view.num_prefix + rows * cols,
                           view.num_prefix + np.arange(rows * cols).reshape(rows, cols))]
    hooks = []

    def hook(layer: int):
        def fn(module, args, output):
            try:
                info = api.info(model)
            except (RuntimeError, KeyError, AttributeError, TypeError):
                return  # this adapter has nothing to report mid-forward
            labels, exact = labels_from_info(info, view, batch_index, upto=layer)
            tokens = int(info.size.shape[1]) if info.size is not None else records[-1].tokens
            records.append(LayerRecord(layer, tokens, labels, exact))
        return fn

    try:
        for i, blk in enumerate(view.blocks):
            hooks.append(blk.register_forward_hook(hook(i)))
        _run(model, view, pixels)
    finally:
        for h in hooks:
            h.remove()
    info = api.info(model)
    labels, exact = labels_from_info(info, view, batch_index)
    tokens = int(info.size.shape[1]) if info.size is not None else records[-1].tokens
    last = records[-1]
    if tokens != last.tokens or not same_grouping(labels, last.labels):
        # reported only at the end: the site is the last pruning step's layer, else the last block
        layer = max(info.kept) if info.kept and last.layer < 0 else len(view.blocks) - 1
        records.append(LayerRecord(layer, tokens, labels, exact))
    return records


def changed_layers(records: Sequence[LayerRecord], max_panels: Optional[int] = None) -> List[LayerRecord]:
    """The input, then the records where the token set changed (evenly thinned to ``max_panels``, always keeping
    the input and the last change)."""
    picked = [records[0]]
    for r in records[1:]:
        prev = picked[-1]
        if r.tokens != prev.tokens or not same_grouping(r.labels, prev.labels):
            picked.append(r)
    if max_panels is not None and len(picked) > max_panels >= 2:
        inner = picked[1:-1]
        take = max_panels - 2
        idx = np.linspace(0, len(inner) - 1, take).round().astype(int) if take > 0 else []
        picked = [picked[0]] + [inner[i] for i in sorted(set(idx))] + [picked[-1]]
    return picked


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def layer_grid(image, records: Sequence[LayerRecord], *, title: str = "", cols: int = 4, panel: float = 2.2,
               fill: str = "mean", note: str = "", dpi: int = 100):
    """A matplotlib figure: one panel per record (the first is the input image), titled with the block and the
    token count. Returns the figure (save it with ``fig.savefig``)."""
    plt = _pyplot()
    n = len(records)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    two_lines = any(r.layer >= 0 and ((r.labels < 0).any() or not r.exact) for r in records)
    row_h = panel + (0.42 if two_lines else 0.28)
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, row_h * rows + (0.35 if title else 0.05)
                                                  + (0.25 if note else 0)), dpi=dpi, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, rec in zip(axes.flat, records):
        if rec.layer < 0:
            ax.imshow(_as_float_image(image))
            ax.set_title(f"input · {rec.tokens} tokens", fontsize=8)
        else:
            ax.imshow(render_overlay(image, rec.labels, fill=fill))
            dropped = int((rec.labels < 0).sum())
            second = f"{dropped} patch{'es' if dropped != 1 else ''} dropped" if dropped else ""
            if not rec.exact:
                second = (second + ", " if second else "") + "merges not traced"
            ax.set_title(f"after block {rec.layer} · {rec.tokens} tokens" + (f"\n{second}" if second else ""),
                         fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    note_h = 0.0
    if note:
        import textwrap
        note = textwrap.fill(note, width=max(30, int(panel * cols * 16)))
        note_h = 0.03 * (note.count("\n") + 1) * (3 / max(rows, 1)) ** 0.5
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, note_h, 1, 1))
    return fig


def save_png(figure_or_array: Any, path: Union[str, Path], *, dpi: Optional[int] = None,
             colors: Optional[int] = None) -> Path:
    """Write a matplotlib figure or an ``[H, W, 3]`` uint8 array as PNG (closing the figure). ``colors`` (e.g. 256)
    stores a palette image instead, several times smaller for documentation."""
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(figure_or_array, np.ndarray):
        img = Image.fromarray(figure_or_array)
    else:
        import io
        buf = io.BytesIO()
        figure_or_array.savefig(buf, format="png", dpi=dpi)
        _pyplot().close(figure_or_array)
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    if colors:
        img = img.quantize(colors=int(colors), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(path, format="PNG", optimize=True)
    return path


def format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "trace_source")


def _resolve_method(method: Optional[str], config: Optional[str], params: Mapping[str, Any]
                    ) -> Tuple[Optional[str], Dict[str, Any]]:
    """``(method, params)`` with a config's method and parameters filled in (``params`` override them)."""
    if config is None:
        return method, dict(params)
    from .configs import load_config
    cfg = load_config(config)
    if method is not None and method != cfg.method:
        raise ValueError(f"method {method!r} contradicts config {config!r}, which is for {cfg.method!r}")
    return cfg.method, {**cfg.params, **params}


def capture(model: nn.Module, image: Any, method: Optional[str] = None, *, config: Optional[str] = None,
            img_size: Optional[int] = None, **params: Any) -> Tuple[List[LayerRecord], ModelView]:
    """Patch ``model`` with ``method`` and ``trace_source=True``, run it on ``image`` (a path or PIL image, cropped
    like the model's evaluation transform), restore the model, and return ``(records, view)``
    (:func:`record_layers`). With no method and no config, an already patched model is used as it is."""
    method, params = _resolve_method(method, config, params)
    view = model_view(model, img_size)
    size = (int(img_size), int(img_size)) if img_size else view.img_size
    pixels = to_tensor(load_image(image, size, view.crop_pct), view)
    if method is not None and get_method(method).site == Site.LLM_LAYER:
        raise ValueError(f"{method} reduces tokens inside the language model (site '{Site.LLM_LAYER.value}'), where "
                         "they depend on the prompt; visualize draws methods that act on the vision tokens")
    if method is None:
        if not api.is_patched(model):
            raise ValueError("name a method (or config), or pass a model patched with tokenreduce.patch")
        return record_layers(model, pixels, view=view), view
    api.patch(model, method, **{"trace_source": True, **params})
    try:
        return record_layers(model, pixels, view=view), view
    finally:
        api.unpatch(model)


def visualize(model: nn.Module, image: Any, method: Optional[str] = None, *, config: Optional[str] = None,
              img_size: Optional[int] = None, max_panels: Optional[int] = 12, fill: str = "mean",
              display_size: int = 224, title: Optional[str] = None, note: str = "",
              **params: Any) -> Tuple[Any, List[LayerRecord]]:
    """Patch ``model`` with ``method`` (tracing sources), run it on ``image`` and draw the token set after every
    block where it changed.

    Args:
        model: a supported model (timm ViT, HF CLIP vision model, HF LLaVA); restored afterwards. With
            ``method=None`` and ``config=None`` an already patched model is used as it is.
        image: a path or a PIL image; resized and centre-cropped like the model's evaluation transform.
        method: a registered method name, as for :func:`tokenreduce.patch` (``trace_source=True`` is added).
        config: a method config instead of (or giving defaults for) ``method`` and ``params``.
        img_size: input size for ``dynamic_img_size`` models (default: the model's).
        max_panels: at most this many panels (the input and the last change are always shown).
        fill: see :func:`render_overlay`.
        display_size: pixel size the panels are drawn at (the same crop, resampled from the original image).
        **params: the method's parameters.

    Returns:
        ``(figure, records)``: the matplotlib figure and every :class:`LayerRecord` captured.
    """
    method, params = _resolve_method(method, config, params)
    records, view = capture(model, image, method, img_size=img_size, **params)
    rows, cols = view.grid
    shown_img = load_image(image, (display_size, round(display_size * cols / rows)), view.crop_pct)
    if title is None:
        title = f"{method}({format_params(params)})" if method else ""
    fig = layer_grid(shown_img, changed_layers(records, max_panels), title=title, fill=fill, note=note)
    return fig, records


# ---------------------------------------------------------------------------------------------------------------
# Command: tokenreduce visualize
# ---------------------------------------------------------------------------------------------------------------
def _load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def build_model(name: Optional[str], checkpoint: Optional[str] = None, pretrained: bool = False,
                **model_kwargs: Any) -> nn.Module:
    """A timm model by name (random weights unless ``pretrained`` / ``checkpoint``), or the reference
    Fashion-MNIST ViT for ``fmnist_reference`` / a checkpoint with a recipe beside it and no name."""
    from .reference import create_reference_model, load_reference_model, recipe_path
    if name in (None, "fmnist_reference"):
        if checkpoint and recipe_path(checkpoint).is_file():
            return load_reference_model(checkpoint)
        if name is None and checkpoint is None:
            return load_reference_model()
        model = create_reference_model(**model_kwargs)
    else:
        import timm
        model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    if checkpoint:
        model.load_state_dict(_load_state_dict(checkpoint))
    return model.eval()


def visualize_parser(prog: str = "tokenreduce visualize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw which patches a token-reduction method merged (same colour, borders between groups) "
                    "and which it dropped (greyed out), after every block where the token set changed.",
        epilog="""examples:
  tokenreduce visualize docs/assets/chelsea.jpg --model vit_small_patch16_224 --method tome --param r=13 --out tome.png
  tokenreduce visualize cat.jpg --model deit_small_patch16_224.fb_in1k --pretrained --method zero_tprune \\
      --param keep_ratio=0.7 --out ztp.png
  tokenreduce visualize a.jpg --model deit_small_patch16_224 --method diffrate --param rates=deit_small@2.9 --out d.png

Without --pretrained or --checkpoint the weights are random: merges then follow colour and position only.""")
    p.add_argument("image", help="an image file (any format PIL reads)")
    p.add_argument("--model", default=None,
                   help="timm model name (e.g. vit_small_patch16_224), or fmnist_reference; default: the config's "
                        "model, else the reference Fashion-MNIST ViT")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (downloads)")
    p.add_argument("--checkpoint", default=None, help="weights to load (.safetensors or a torch state dict)")
    p.add_argument("--method", default=None, help=f"a registered method ({', '.join(api.list_methods())})")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, value parsed as YAML (repeatable), e.g. --param r=13")
    p.add_argument("--config", default=None, help="a method config (configs/<method>/<setting>.yaml)")
    p.add_argument("--img-size", type=int, default=None, help="input size (dynamic_img_size models)")
    p.add_argument("--fill", choices=("mean", "palette", "none"), default="mean",
                   help="how merged groups are coloured (default: their mean colour, as in ToMe's figures)")
    p.add_argument("--max-panels", type=int, default=12, help="at most this many panels (default 12)")
    p.add_argument("--final-only", action="store_true", help="write only the final overlay, at --display-size")
    p.add_argument("--display-size", type=int, default=None,
                   help="pixel size of each panel (default 224; 448 with --final-only)")
    p.add_argument("--dpi", type=int, default=100, help="figure resolution")
    p.add_argument("--colors", type=int, default=None,
                   help="store a palette PNG with this many colours (e.g. 256: several times smaller)")
    p.add_argument("--out", required=True, help="the PNG to write")
    return p


def visualize_main(argv: Optional[Sequence[str]] = None, prog: str = "tokenreduce visualize") -> int:
    """``tokenreduce visualize IMAGE --model ... --method ... [--param k=v] [--checkpoint PATH] --out OUT.png``."""
    args = visualize_parser(prog).parse_args(argv)
    from .eval_cli import parse_params  # the CLI's one KEY=VALUE parser
    params = parse_params(args.param)
    if args.method is None and args.config is None:
        print("error: name a method (--method) or a config (--config)", file=sys.stderr)
        return 2
    model_name = args.model
    model_kwargs: Dict[str, Any] = {}
    if args.config is not None and model_name is None:
        from .configs import load_config
        cfg = load_config(args.config)
        model_name, model_kwargs = cfg.model, dict(cfg.model_kwargs)
    try:
        model = build_model(model_name, args.checkpoint, args.pretrained, **model_kwargs)
        if args.final_only:
            records, view = capture(model, args.image, args.method, config=args.config, img_size=args.img_size,
                                    **params)
            rows, cols = view.grid
            disp = args.display_size or 448
            crop = load_image(args.image, (disp, round(disp * cols / rows)), view.crop_pct)
            save_png(render_overlay(crop, records[-1].labels, fill=args.fill), args.out, colors=args.colors)
        else:
            weights = ("checkpoint " + Path(args.checkpoint).name if args.checkpoint else
                       "pretrained" if args.pretrained else
                       "reference Fashion-MNIST ViT" if model_name in (None, "fmnist_reference") else "random weights")
            fig, records = visualize(model, args.image, args.method, config=args.config, img_size=args.img_size,
                                     max_panels=args.max_panels, fill=args.fill,
                                     display_size=args.display_size or 224,
                                     note=f"{model_name or 'fmnist_reference'} · {weights}", **params)
            save_png(fig, args.out, dpi=args.dpi, colors=args.colors)
        last = records[-1]
    except (FileNotFoundError, TypeError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    groups = len(np.unique(last.labels[last.labels >= 0]))
    print(f"wrote {args.out}: {last.tokens} tokens after the last change, {groups} patch groups, "
          f"{int((last.labels < 0).sum())} patches dropped")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Command: tokenreduce plot
# ---------------------------------------------------------------------------------------------------------------
def read_results(paths: Sequence[Union[str, Path]]) -> List[Dict[str, Any]]:
    """Rows with ``status == "ok"`` from ``tokenreduce eval`` results files (``{..., "rows": [...]}``), each with
    ``_file`` and ``_model`` (the file's ``model``) added."""
    rows: List[Dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        file_rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(file_rows, list):
            raise ValueError(f"{path}: not a tokenreduce eval results file (no 'rows' list)")
        for row in file_rows:
            if row.get("status", "ok") != "ok" or row.get("top1") is None:
                continue
            rows.append({**row, "_file": str(path), "_model": data.get("model", "") if isinstance(data, dict) else ""})
    return rows


def plot_results(rows: Sequence[Mapping[str, Any]], title: str = ""):
    """A figure with two panels: top-1 against GFLOPs and top-1 against images per second, one line per method
    (the unpatched model as a star). Rows come from :func:`read_results`."""
    plt = _pyplot()
    models = sorted({r.get("_model", "") for r in rows})
    key = (lambda r: (r.get("method") or "none", r.get("_model", ""))) if len(models) > 1 else \
        (lambda r: (r.get("method") or "none", ""))
    groups: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
    cmap = plt.get_cmap("tab10")
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != "none", kv[0]))  # the unpatched model first
    for i, ((method, model), members) in enumerate(ordered):
        label = ("unpatched" if method == "none" else method) + (f" ({model})" if model else "")
        color = cmap(i % 10)
        for ax, xkey in zip(axes, ("gflops", "img_per_s")):
            pts = sorted((float(r[xkey]), float(r["top1"])) for r in members if r.get(xkey) is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, label=label,
                    marker="*" if method == "none" else "o", markersize=11 if method == "none" else 5,
                    linestyle="-" if len(pts) > 1 else "none")
    axes[0].set_xlabel("GFLOPs per image (analytic multiply-accumulates)")
    axes[1].set_xlabel("images per second")
    for ax in axes:
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    for h, l in zip(h2, l2):
        if l not in labels:
            handles.append(h)
            labels.append(l)
    if not any(r.get("img_per_s") is not None for r in rows):
        axes[1].text(0.5, 0.5, "no throughput in these results", ha="center", va="center",
                     transform=axes[1].transAxes, color="0.4")
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(labels) - 1) // 6), 1, 1))
    return fig


def plot_parser(prog: str = "tokenreduce plot") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Accuracy against GFLOPs and against images per second, one line per method, from "
                               "the results files `tokenreduce eval` writes.")
    p.add_argument("results", nargs="+", help="results JSON files (tokenreduce eval --results-file ...)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default=None, help="figure title (default: models and devices of the files)")
    return p


def plot_main(argv: Optional[Sequence[str]] = None, prog: str = "tokenreduce plot") -> int:
    """``tokenreduce plot RESULTS.json... --out OUT.png``."""
    args = plot_parser(prog).parse_args(argv)
    try:
        rows = read_results(args.results)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("error: no successful rows in " + ", ".join(args.results), file=sys.stderr)
        return 2
    title = args.title
    if title is None:
        metas = []
        for path in args.results:
            data = json.loads(Path(path).read_text())
            if isinstance(data, dict):
                desc = " · ".join(str(data[k]) for k in ("model", "device") if data.get(k))
                if data.get("amp"):
                    desc += f" · {data['amp']}"
                if data.get("batch_size"):
                    desc += f" · batch {data['batch_size']}"
                if desc and desc not in metas:
                    metas.append(desc)
        title = "\n".join(metas)
    fig = plot_results(rows, title)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, format="png")
    _pyplot().close(fig)
    methods = sorted({r.get("method") or "none" for r in rows})
    print(f"wrote {args.out}: {len(rows)} points, methods: {', '.join(methods)}")
    return 0
