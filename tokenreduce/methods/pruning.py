"""What every pruning method shares: the keep schedule (its parameters, validation and resolution) and applying
a selection to the token state.

A pruning step runs after a block (``Site.BLOCK_OUT``) and keeps the prefix tokens plus a number of the other
tokens. The schedule is given by one of

- ``keep`` (with ``layers``, upstream ``prune_layers``): per step an int count of non-prefix tokens kept, or a float fraction of the
  non-prefix tokens present (rounded up); one value for every step or one per step;
- ``keep_ratio``: the same fraction at every step (EViT's ``keep_rate``);
- ``target_flops``: a FLOPs budget; the largest uniform keep ratio that meets it at the model's default input
  size (see :func:`resolve_steps`).

``layers`` defaults to the blocks ``floor(d/4), floor(d/2), floor(3d/4)`` (3, 6, 9 for a 12-block ViT, as
in EViT) whenever a keep is given; on models too shallow for those (fewer than 4 blocks) to the middle block. Everything is resolved once, at patch time; int counts are checked there
against the default input size and again at run time against the tokens actually present.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..core import Geometry, Param, ReductionMethod, Site, TokenState
from ..core.params import fraction, is_int
from ..ops.pruning import KeepSpec, keep_count, search_keep_ratio, tokens_per_block
from .state_ops import select_state


def _is_fraction(v: Any) -> bool:
    return isinstance(v, float) and 0.0 < v <= 1.0


def check_layers(v: Any) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v, (list, tuple)) and all(is_int(x) and x >= 0 for x in v):
        return None
    return "layers must be None or a list of block indices (ints >= 0)"


def check_keep(v: Any) -> Optional[str]:
    ok = lambda x: (is_int(x) and x >= 1) or _is_fraction(x)  # noqa: E731
    if v is None or ok(v) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(ok(x) for x in v)):
        return None
    return ("keep must be None, an int >= 1 (non-prefix tokens kept), a float in (0, 1] (fraction of the "
            "non-prefix tokens present), or a list of those, one per prune layer")


def check_target(v: Any) -> Optional[str]:
    if v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0):
        return None
    return ("target_flops must be None, a fraction <= 1 of the unpruned model's FLOPs, or absolute "
            "multiply-accumulates per image (> 1, as tokenreduce.info(model).flops)")


#: The schedule parameters every pruning method accepts.
SCHEDULE_PARAMS: Dict[str, Param] = {
    "layers": Param(None, "blocks (0-based) after which a pruning step runs; None: floor(d/4), floor(d/2), "
                          "floor(3d/4) (3, 6, 9 for 12 blocks) when a keep is given", check_layers,
                    aliases=("prune_layers",)),
    "keep": Param(None, "non-prefix tokens kept by each step: int count or float fraction of those present; one "
                        "value, or one per prune layer", check_keep),
    "keep_ratio": Param(None, "shorthand: keep this fraction of the non-prefix tokens present at every step",
                        fraction(optional=True), aliases=("keep_rate",)),
    "target_flops": Param(None, "FLOPs budget (fraction <= 1 of the unpruned model, or MACs per image): picks the "
                                "largest uniform keep ratio that meets it", check_target),
}


def default_prune_layers(num_blocks: int) -> List[int]:
    """``floor(d/4), floor(d/2), floor(3d/4)``, deduplicated, without block 0 or the last block (a step after
    the last block saves nothing): 3, 6, 9 for d = 12 (EViT's positions), 6, 12, 18 for d = 24, 1, 2 for d = 4."""
    layers = sorted({num_blocks * q // 4 for q in (1, 2, 3)})
    layers = [layer for layer in layers if 0 < layer < num_blocks - 1]
    if not layers and num_blocks >= 2:
        layers = [(num_blocks - 1) // 2]  # shallow models (2 or 3 blocks): one step in the middle
    return layers


def resolve_steps(geometry: Geometry, prune_layers: Optional[Sequence[int]], keep: Any,
                  keep_ratio: Optional[float], target_flops: Optional[float]) -> Dict[int, KeepSpec]:
    """``{block: keep spec}`` of a pruning method, validated against the model.

    ``target_flops`` search: with the prune layers fixed, the cost of a uniform keep ratio ``rho`` (every step
    keeps ``ceil(rho · present)`` non-prefix tokens) is the adapter's analytic MAC count at the default input
    size, non-decreasing in ``rho``; a bisection finds the largest ``rho`` whose cost is within the budget. A
    budget <= 1 is a fraction of the unpruned model's MACs, a larger one absolute MACs per image. The resolved
    schedule is that fraction, so inputs of another size are pruned in the same proportions.

    Raises:
        ValueError: for conflicting parameters, layers outside the model, a keep list of the wrong length, an
            int keep larger than the tokens present at the default input size, or an unreachable budget.
    """
    d, p, n0 = geometry.num_blocks, geometry.num_prefix, geometry.num_patches
    given = [name for name, v in (("keep", keep), ("keep_ratio", keep_ratio), ("target_flops", target_flops))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of keep, keep_ratio and target_flops (got {', '.join(given)})")
    if not given:
        if prune_layers:
            raise ValueError("layers is set but nothing says how many tokens to keep: give keep, keep_ratio "
                             "or target_flops")
        return {}
    layers = list(prune_layers) if prune_layers is not None else default_prune_layers(d)
    bad = [layer for layer in layers if not 0 <= layer < d]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {d} blocks (indices 0..{d - 1})")
    if any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers must be strictly increasing, got {layers}")
    if not layers:
        return {}

    if keep_ratio is not None:
        keep = float(keep_ratio)
    if target_flops is not None:
        keep = _search_ratio(geometry, layers, float(target_flops))
        if keep >= 1.0:
            return {}
    if isinstance(keep, (list, tuple)):
        if len(keep) != len(layers):
            raise ValueError(f"keep lists {len(keep)} values but there are {len(layers)} pruning layers {layers}")
        specs = list(keep)
    else:
        specs = [keep] * len(layers)
    # A fraction of 1.0 keeps everything: leave that block alone (no attention matrix, no step).
    steps = {layer: (float(k) if isinstance(k, float) else int(k)) for layer, k in zip(layers, specs)
             if not (isinstance(k, float) and k >= 1.0)}
    if n0 is not None:
        check_steps(steps, n0, p, d, where=" at the model's default input size")
    return steps


def check_steps(steps: Dict[int, KeepSpec], num_patches: int, num_prefix: int, num_blocks: int,
                where: str = "") -> List[int]:
    """Tokens entering every block; ValueError naming the step whose int keep exceeds the tokens present."""
    n = num_patches
    for layer in range(num_blocks):
        if layer in steps:
            try:
                n = keep_count(n, steps[layer])
            except ValueError:
                raise ValueError(f"the pruning step after block {layer} keeps {steps[layer]} tokens but only {n} "
                                 f"non-prefix tokens are present there{where}") from None
    return tokens_per_block(num_patches, num_prefix, num_blocks, steps)


def _search_ratio(geometry: Geometry, layers: List[int], target: float) -> float:
    d, p, n0 = geometry.num_blocks, geometry.num_prefix, geometry.num_patches
    if n0 is None:
        raise ValueError("target_flops needs the model's number of patches at its default input size, which this "
                         "model does not report; give keep or keep_ratio instead")
    if geometry.cost is None:
        raise ValueError("target_flops needs the model's FLOP model, which this adapter does not report; give keep "
                         "or keep_ratio instead")

    def cost(ratio: float) -> float:
        tokens = tokens_per_block(n0, p, d, {layer: float(ratio) for layer in layers})  # ratio 0 keeps 1
        return float(geometry.cost.macs([(n, n) for n in tokens]))

    dense = cost(1.0)
    budget = target * dense if target <= 1.0 else target
    ratio = search_keep_ratio(cost, budget)
    if ratio is None:
        raise ValueError(f"target_flops={target} is unreachable with layers={layers}: keeping one token per "
                         f"step costs {cost(0.0):.4g} MACs ({cost(0.0) / dense:.3f} of the unpruned {dense:.4g}); "
                         "prune earlier or raise the budget")
    return ratio if ratio > 0 else 1e-9


class PruningMethod(ReductionMethod):
    """Base of the pruning methods: resolves the schedule and applies selections.

    Subclasses implement :meth:`select`, returning ``[B, p + k]`` indices (prefix first, survivors in spatial
    order) for a state and the number ``k`` of non-prefix tokens to keep.
    """

    site = Site.BLOCK_OUT

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.steps: Dict[int, KeepSpec] = resolve_steps(
            geometry, params.get("layers"), params.get("keep"), params.get("keep_ratio"),
            params.get("target_flops"))

    def acts_at(self, layer: int) -> bool:
        return layer in self.steps

    def planned_tokens(self) -> Optional[List[int]]:
        """Tokens entering every block at the default input size (None when the patch count is unknown)."""
        g = self.geometry
        if g.num_patches is None:
            return None
        return tokens_per_block(g.num_patches, g.num_prefix, g.num_blocks, self.steps)

    def kept_count(self, state: TokenState) -> int:
        """Non-prefix tokens this step keeps for the tokens present (ValueError if an int keep is too large)."""
        present = state.num_tokens - state.num_prefix
        spec = self.steps[state.layer]
        try:
            return keep_count(present, spec)
        except ValueError:
            raise ValueError(f"{self.name}: the pruning step after block {state.layer} keeps {spec} tokens but only "
                             f"{present} non-prefix tokens are present (input smaller than the default size?)"
                             ) from None

    def select(self, state: TokenState, k: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reduce(self, state: TokenState) -> TokenState:
        k = self.kept_count(state)
        if k == state.num_tokens - state.num_prefix:
            return state
        return select_state(state, self.select(state, k))
