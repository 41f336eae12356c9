"""The tower-output site of a vision-language model: a method acting on the vision features at the VLM's feature
layer, before the projector (VisionZip, FasterVLM, VisPruner, DivPrune, CDPruner, random, pooling).

Forward hooks on the feature layer's ``q_proj`` / ``k_proj`` / ``v_proj`` and on its output give the method what it
declared — the CLS attention row (one ``q_cls·Kᵀ``, no eager attention), head-averaged keys, the hidden states (CLS
included where the tower has one) and, on request, the patch features through the projector, the patch grid and the
per-call instruction of each image (``tokenreduce.instructions``; :func:`instruction_rows`) — and a
forward pre-hook on the projector replaces its input with the method's tokens, so ``get_image_features`` returns the
reduced, projected features. The tower itself runs unchanged, with its own attention implementation.

The adapter opens the window in which these hooks act (``ForwardRecord.status`` RUNNING inside its wrapper of
``get_image_features``), so an unrelated call of the tower or the projector is left alone.

Towers followed by a patch merger (Qwen2.5-VL, Qwen3-VL: every 2×2 block of patches becomes one visual token) offer
the site on the *merged* tokens; :func:`merged_analysis` maps the feature layer's keys, values and attention onto them
(:mod:`tokenreduce.ops.merged_attention`).
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...core import ATTENTION_NEEDS, Need, ReductionMethod, Status, TokenState, run_reduce
from ...ops.merged_attention import group_mean, merged_attention_rows
from ..layer_host import LayerFamily, analysis, apply_result
from ..patcher import Patcher

#: What a tower site can hand a method.
TOWER_NEEDS = frozenset({Need.KEYS, Need.KEYS_PER_HEAD, Need.VALUES_PER_HEAD, Need.CLS_ATTN, Need.CLS_ATTN_PER_HEAD,
                         Need.ATTN, Need.ATTN_ROWS, Need.PROJECTED, Need.GRID, Need.INSTRUCTION})
#: What a site on a patch merger's tokens can hand a method: no CLS row (no prefix token survives a merger).
MERGED_TOWER_NEEDS = TOWER_NEEDS - {Need.CLS_ATTN, Need.CLS_ATTN_PER_HEAD}


class MergedAttentionRows:
    """``Need.ATTN_ROWS`` on merged tokens: ``rows [B, Q] -> [B, H, Q, M]``, computed on demand from the feature
    layer's patch queries and keys (:func:`~tokenreduce.ops.merged_attention.merged_attention_rows`)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float, segments: torch.Tensor, group: int) -> None:
        self.q, self.k, self.scale, self.segments, self.group = q, k, scale, segments, group

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return merged_attention_rows(self.q, self.k, rows, self.scale, self.segments, self.group)


def merged_analysis(needs: FrozenSet[str], q: Optional[torch.Tensor], k: Optional[torch.Tensor],
                    v: Optional[torch.Tensor], scale: float, segments: torch.Tensor, group: int) -> Dict[str, Any]:
    """What a method declared, for site tokens that each merge ``group`` consecutive tokens of the feature layer.

    Args:
        needs: the method's needs at the site.
        q, k, v: ``[B, H, N, d]`` the feature layer's queries and keys (after its rotary embedding, as its attention
            used them) and values; None where no need reads them.
        scale: the attention's logit scale.
        segments: ``[B, N]`` attention segment of every token (packed towers attend within an image, a frame or a
            window).
        group: feature-layer tokens per site token.

    Returns:
        Any of ``keys [B, M, d]`` (mean over heads and over each group), ``keys_per_head`` / ``values_per_head``
        ``[B, H, M, d]`` (group means), ``attn [B, H, M, M]`` and ``attn_rows`` (the merged attention, see
        :mod:`tokenreduce.ops.merged_attention`).

    Raises:
        ValueError: a CLS need (no prefix token survives a merger).
    """
    if needs & {Need.CLS_ATTN, Need.CLS_ATTN_PER_HEAD}:
        raise ValueError("the tokens of a patch merger have no CLS token, so there is no CLS attention row")
    out: Dict[str, Any] = {}
    if Need.KEYS in needs:
        out["keys"] = group_mean(k, group).mean(dim=1)
    if Need.KEYS_PER_HEAD in needs:
        out["keys_per_head"] = group_mean(k, group)
    if Need.VALUES_PER_HEAD in needs:
        out["values_per_head"] = group_mean(v, group)
    if needs & {Need.ATTN, Need.ATTN_ROWS}:
        rows = MergedAttentionRows(q, k, scale, segments, group)
        if Need.ATTN_ROWS in needs:
            out["attn_rows"] = rows
        if Need.ATTN in needs:
            b, m = q.shape[0], q.shape[2] // group
            out["attn"] = rows(torch.arange(m, device=q.device).expand(b, m))
    return out


def instruction_rows(instructions: Any, num_rows: int,
                     rows_per_image: Optional[Sequence[int]] = None) -> Optional[List[Any]]:
    """``Need.INSTRUCTION``: one instruction per row of the tower's batch, from what ``tokenreduce.instructions``
    stored on the adapter (None when nothing was given: the method decides what that means).

    Args:
        instructions: None; one instruction for every row (a ``str`` or a ``tuple`` of token ids); or a ``list``
            with one per image, in the order the images are encoded (batch-major, as in ``pixel_values``).
        num_rows: rows of the tower's batch in this call.
        rows_per_image: for an adapter that encodes each image as several rows (crops), how many; None: one row per
            image.

    Raises:
        ValueError: a list whose length is not the number of images of the call.
    """
    if instructions is None:
        return None
    if not isinstance(instructions, list):
        return [instructions] * num_rows
    counts = [1] * len(instructions) if rows_per_image is None else [int(c) for c in rows_per_image]
    if len(instructions) != len(counts) or sum(counts) != num_rows:
        images = len(counts) if rows_per_image is not None else num_rows
        raise ValueError(f"tokenreduce.instructions gave {len(instructions)} instructions, but the vision tower "
                         f"encodes {images} images in this call: give one per image, in the order of pixel_values "
                         "(a prompt with several images repeats its instruction once per image), or one string for "
                         "all")
    return [text for text, c in zip(instructions, counts) for _ in range(c)]


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """Index (0-based) of the encoder layer whose output is ``hidden_states[vision_feature_layer]``; -1 for the
    embeddings."""
    n = num_layers + 1
    if not -n <= vision_feature_layer < n:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} is out of range for a {num_layers}-layer tower")
    return vision_feature_layer % n - 1


class TowerTap:
    """Forward hook storing a feature-layer tensor while the adapter's window is open (picklable)."""

    def __init__(self, site: "TowerSite", name: str) -> None:
        self.site, self.name = site, name

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        rec = self.site.owner.record
        if rec is not None and rec.status == Status.RUNNING:
            setattr(rec.taps, self.name, output[0] if isinstance(output, tuple) else output)


class ProjectorInput:
    """Forward pre-hook on the projector: the method's tokens instead of the selected features."""

    def __init__(self, site: "TowerSite") -> None:
        self.site = site

    def __call__(self, module: nn.Module, args: Tuple) -> Optional[Tuple]:
        rec = self.site.owner.record
        if rec is None or rec.status != Status.RUNNING:
            return None
        return (self.site.reduce(args[0]),)


class TowerSite:
    """Runs a ``TOWER_OUT`` method at a VLM's feature layer.

    Args:
        owner: the adapter (its ``record`` and ``method`` are read at run time).
        family: how the tower's layers are built (where q / k / v are).
        layers: the tower's encoder layers.
        feature_layer: index of the layer whose output feeds the projector.
        num_prefix: tokens before the patches in that output (1 for CLIP's CLS, 0 for SigLIP).
        projector: the VLM's projector module.
        grid: ``(rows, cols)`` of the patch tokens per image.
    """

    def __init__(self, owner: Any, family: LayerFamily, layers, feature_layer: int, num_prefix: int,
                 projector: nn.Module, grid: Optional[Tuple[int, int]]) -> None:
        self.owner, self.family = owner, family
        self.layer = layers[feature_layer]
        self.feature_layer, self.num_prefix = int(feature_layer), int(num_prefix)
        self.projector, self.grid = projector, grid

    def install(self, patcher: Patcher, method: ReductionMethod) -> None:
        self.needs: FrozenSet[str] = frozenset(method.needs_at(self.feature_layer, False))
        taps = set()
        if self.needs & (ATTENTION_NEEDS - {Need.VALUES_PER_HEAD}):
            taps.add("k")
        if self.needs & {Need.CLS_ATTN, Need.CLS_ATTN_PER_HEAD, Need.ATTN, Need.ATTN_ROWS}:
            taps.add("q")
        if Need.VALUES_PER_HEAD in self.needs:
            taps.add("v")
        for name, module in self.family.tap_modules(self.layer, frozenset(taps)).items():
            patcher.hook(module.register_forward_hook(TowerTap(self, name)))
        patcher.hook(self.layer.register_forward_hook(TowerTap(self, "out")))
        patcher.hook(self.projector.register_forward_pre_hook(ProjectorInput(self)))
        self.project = patcher.original(self.projector, "forward")

    def reduce(self, selected: torch.Tensor) -> torch.Tensor:
        """The projector's new input: the method's tokens from the feature layer's output."""
        rec, method = self.owner.record, self.owner.method
        taps = rec.taps
        if taps.out is None:
            raise RuntimeError("the vision tower's feature layer did not run before the projector")
        x = taps.out
        q, k, v = (None if t is None else self.family.to_heads(self.layer, name, t)
                   for name, t in (("q", taps.q), ("k", taps.k), ("v", taps.v)))
        found: Dict[str, Any] = analysis(self.needs, q, k, v, self.family.scale(self.layer), None)
        if Need.PROJECTED in self.needs:
            found["projected"] = self.project(x[:, self.num_prefix:])
        if Need.GRID in self.needs:
            found["grid"] = self.grid
        if Need.INSTRUCTION in self.needs:
            # an adapter that encodes an image as several rows (crops) sets ``rows_per_image`` for the call
            found["instruction"] = instruction_rows(getattr(self.owner, "instructions", None), x.shape[0],
                                                    getattr(self.owner, "rows_per_image", None))
        state = TokenState(x=x, size=rec.ensure_size(x), num_prefix=self.num_prefix, layer=self.feature_layer,
                           carry=rec.carry, **found)
        out = run_reduce(method, state)
        if out is state:
            rec.finish_layer(self.feature_layer, x.shape[1], x.shape[1], x)
            return selected
        reduced = apply_result(rec, method, state, out)
        rec.finish_layer(self.feature_layer, x.shape[1], x.shape[1], reduced)
        return reduced

    def output_tokens(self, num_tokens: int) -> Optional[int]:
        """Tokens per image the method returns for a feature layer of ``num_tokens`` (None: content-dependent)."""
        return self.owner.method.num_output(num_tokens)
