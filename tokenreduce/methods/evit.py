"""EViT off the shelf (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022; youweiliang/evit).

In each of ``layers``, between the attention residual and the MLP, keep the ``ceil(keep_ratio · n)`` non-prefix
tokens the CLS token attends to most (head mean of this block's attention), in descending score order, and fuse
the others into one extra token ``sum_j a_j x_j`` weighted by their raw CLS attention (``fuse=True``) or drop them.
The fused token is appended last and competes like any other token at the next step.

It is ``topk_attn`` (``methods/baselines.py``) with EViT's placement (inside the block, so the MLP already runs on
the kept tokens), order and fusion: the schedule parameters (``layers``, ``keep``, ``keep_ratio``,
``target_flops``), their validation and defaults (``floor(d/4), floor(d/2), floor(3d/4)``: EViT's 3, 6, 9 for 12
blocks) come from :mod:`tokenreduce.methods.pruning`. Defaults reproduce youweiliang/evit at 5ca95a7 (its
``--base_keep_rate 0.7 --fuse_token`` evaluation).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean
from ..ops.evit import evit_keep_count, fuse_inattentive, topk_by_score
from ..ops.pruning import KeepSpec, search_keep_ratio
from .pruning import SCHEDULE_PARAMS, default_prune_layers, resolve_steps
from .state_ops import select_state

#: EViT's headline setting (EViT/0.7 with inattentive-token fusion), used when no keep is given.
DEFAULT_KEEP_RATIO = 0.7


def _with_aliases(param: Param, *aliases: str) -> Param:
    return dataclasses.replace(param, aliases=param.aliases + aliases)


def evit_plan(num_patches: int, num_prefix: int, num_blocks: int, steps: Dict[int, KeepSpec],
              fuse: bool) -> List[Tuple[int, int]]:
    """``(tokens into the attention, tokens into the MLP)`` of every block, prefix included.

    Raises:
        ValueError: naming the step whose int keep exceeds the tokens present.
    """
    n, out = num_patches, []
    for layer in range(num_blocks):
        n_in = num_prefix + n
        if layer in steps:
            try:
                k = evit_keep_count(n, steps[layer])
            except ValueError:
                raise ValueError(f"evit: the step in block {layer} keeps {steps[layer]} tokens but only {n} "
                                 "non-prefix tokens are present there at the model's default input size") from None
            if k != n:
                n = k + int(fuse)
        out.append((n_in, num_prefix + n))
    return out


@register_method
class EViT(ReductionMethod):
    name = "evit"
    site = Site.BLOCK_MID
    # Sources are part of what upstream reports (its kept indices, and what the fused token absorbed).
    needs = frozenset({Need.CLS_ATTN, Need.SOURCE})
    summary = ("EViT: keep the tokens the CLS token attends to most (descending order) and fuse the rest into one "
               "token, inside given blocks")
    params: Dict[str, Param] = {
        "layers": _with_aliases(SCHEDULE_PARAMS["layers"], "drop_loc"),
        "keep": SCHEDULE_PARAMS["keep"],
        "keep_ratio": dataclasses.replace(
            _with_aliases(SCHEDULE_PARAMS["keep_ratio"], "base_keep_rate"),
            doc=f"fraction of the non-prefix tokens present kept at every step, ceil(keep_ratio * n); "
                f"{DEFAULT_KEEP_RATIO} when neither keep nor target_flops is given"),
        "target_flops": SCHEDULE_PARAMS["target_flops"],
        "fuse": Param(True, "fuse the inattentive tokens into one extra token (False: drop them)", boolean,
                      aliases=("fuse_token",)),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        if not geometry.has_class_token:
            raise ValueError("evit keeps the tokens the CLS token attends to, and this model has no class token "
                             "(class_token=False); use tome, zero_tprune or random")
        super().__init__(geometry, **params)
        self.fuse: bool = bool(params.get("fuse", True))
        keep, ratio, target = params.get("keep"), params.get("keep_ratio"), params.get("target_flops")
        layers: Optional[Sequence[int]] = params.get("layers")
        if keep is None and ratio is None and target is None:
            ratio = DEFAULT_KEEP_RATIO
        if target is not None and keep is None and ratio is None:
            ratio, target = self._search_ratio(layers, float(target)), None
        # The shared resolution validates layers and conflicts; the token plan (with the fused token and EViT's
        # exact ceil) is checked here, so it is resolved without the patch count.
        unsized = dataclasses.replace(geometry, num_patches=None)
        self.steps: Dict[int, KeepSpec] = resolve_steps(unsized, layers, keep, ratio, target)
        if geometry.num_patches is not None:
            evit_plan(geometry.num_patches, geometry.num_prefix, geometry.num_blocks, self.steps, self.fuse)

    def _search_ratio(self, layers: Optional[Sequence[int]], target: float) -> float:
        """The largest uniform keep ratio whose MACs (fused token included) meet ``target``."""
        g = self.geometry
        if g.num_patches is None or g.cost is None:
            raise ValueError("evit: target_flops needs the model's patch count and MAC model at its default input "
                             "size; give keep or keep_ratio instead")
        layers = list(layers) if layers is not None else default_prune_layers(g.num_blocks)
        bad = [layer for layer in layers if not 0 <= layer < g.num_blocks]
        if bad:
            raise ValueError(f"layers {bad} are out of range: the model has {g.num_blocks} blocks")

        def cost(ratio: float) -> float:
            steps = {layer: float(ratio) for layer in layers}
            return float(g.cost.macs(evit_plan(g.num_patches, g.num_prefix, g.num_blocks, steps, self.fuse)))

        dense = cost(1.0)
        budget = target * dense if target <= 1.0 else target
        ratio = search_keep_ratio(cost, budget)
        if ratio is None:
            raise ValueError(f"evit: target_flops={target} is unreachable with layers={layers}: keeping one token per "
                             f"step costs {cost(0.0) / dense:.3f} of the unreduced model; reduce earlier or raise "
                             "the budget")
        return min(1.0, ratio) if ratio > 0 else 1e-9

    # -----------------------------------------------------------------------------------------------------------
    def acts_at(self, layer: int) -> bool:
        return layer in self.steps

    def planned_tokens(self) -> Optional[List[Tuple[int, int]]]:
        """``(attention, MLP)`` tokens of every block at the default input size (None when it is unknown)."""
        g = self.geometry
        if g.num_patches is None:
            return None
        return evit_plan(g.num_patches, g.num_prefix, g.num_blocks, self.steps, self.fuse)

    def kept_count(self, state: TokenState) -> int:
        present = state.num_tokens - state.num_prefix
        try:
            return evit_keep_count(present, self.steps[state.layer])
        except ValueError:
            raise ValueError(f"evit: the step in block {state.layer} keeps {self.steps[state.layer]} tokens but "
                             f"only {present} non-prefix tokens are present (input smaller than the default size?)"
                             ) from None

    def reduce(self, state: TokenState) -> TokenState:
        p = state.num_prefix
        k = self.kept_count(state)
        if k == state.num_tokens - p:
            return state  # upstream leaves the block unchanged when everything would be kept
        keep = topk_by_score(state.cls_attn, p, k)
        kept = select_state(state, keep)
        if not self.fuse:
            return kept
        fused, fused_size, member = fuse_inattentive(state.x, state.size, state.cls_attn, keep, p)
        source = None
        if state.source is not None:
            union = (state.source * member.to(state.source.dtype).unsqueeze(-1)).amax(dim=1, keepdim=True)
            source = torch.cat([kept.source, union], dim=1)
        marker = keep.new_full((keep.shape[0], 1), -1)  # the fused token is synthesised
        return state.replace(x=torch.cat([kept.x, fused], dim=1), size=torch.cat([kept.size, fused_size], dim=1),
                             source=source, kept=torch.cat([keep, marker], dim=1))
