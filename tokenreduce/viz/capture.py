"""Recording what a patched model did to an image, block by block, through the public API only, and the figure of it.

:func:`record_layers` runs a patched model once and captures, after every block, the label map of the token set at
that point: a forward hook on each block calls :func:`tokenreduce.info`, which describes the forward so far, so
every registered method works without the method or the adapter knowing about visualisation. Models patched with
``trace_source=True`` give merges and drops (a pruned token simply vanishes from ``source``); otherwise the ``kept``
indices give drops.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .. import api
from ..backbones.hf_clip import clip_vision_model
from ..core import Site, candidate_sites, get_method
from .labels import alive_to_labels, kept_to_alive, same_grouping, source_to_labels
from .render import layer_grid


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
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        return ModelView(kind, list(tower.encoder.layers), 1, (size // patch, size // patch), (size, size),
                         int(getattr(cfg, "num_channels", 3)), tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD), 1.0)
    raise ValueError(f"cannot visualise a {type(model).__name__}: supported are timm VisionTransformer, "
                     "transformers CLIPVisionModel(WithProjection) and LlavaForConditionalGeneration")


def _clip_tower(model: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """The CLIP tower to draw on: a CLIP vision model itself, or a LLaVA's vision tower."""
    tower = clip_vision_model(model)
    if tower is not None:
        return tower, "clip"
    inner = getattr(model, "model", None)
    tower = clip_vision_model(getattr(inner, "vision_tower", None)) if inner is not None else None
    return (tower, "llava") if tower is not None and hasattr(inner, "get_image_features") else (None, "")


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


def format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "trace_source")


def _resolve_method(method: Optional[str], config: Optional[str], params: Mapping[str, Any]
                    ) -> Tuple[Optional[str], Dict[str, Any]]:
    """``(method, params)`` with a config's method and parameters filled in (``params`` override them)."""
    if config is None:
        return method, dict(params)
    from ..configs import load_config
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
    if method is not None and Site.LLM_LAYER in candidate_sites(get_method(method), params):
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
