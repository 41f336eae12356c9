"""The spatial-pooling control: average-pool each image's patch tokens on their grid to ``keep`` tokens at the tower
output, before the projector — the baseline recent VLM token-reduction benchmarks show every method must beat.

The output grid is the ``a × b`` grid with exactly ``keep`` cells whose aspect ratio is closest to the image's
(:func:`~tokenreduce.ops.pool.pool_grid`: ``√keep × √keep`` for a square budget on a square grid), pooled by adaptive
average pooling (plain window pooling with kernel = stride when the sides divide). See ``docs/methods/pool.md``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from ..core import Geometry, Need, ReductionMethod, Site, TokenState, register_method
from ..ops.pool import grid_pool, pool_grid, pool_membership, poolable_near
from .tower_select import Budget, keep_params


def output_grid(grid: Tuple[int, int], keep: int) -> Tuple[int, int]:
    """The pooled grid for ``keep`` tokens, or ValueError naming budgets that work."""
    rows, cols = int(grid[0]), int(grid[1])
    out = pool_grid(rows, cols, keep)
    if out is None:
        raise ValueError(f"pool: keep={keep} cannot be laid out as a grid of at most {rows}x{cols} cells (no a x b = "
                         f"{keep} with a <= {rows}, b <= {cols}); nearest budgets that can: "
                         f"{poolable_near(rows, cols, keep)}")
    return out


def image_grid(grid: Any, num_patches: int) -> Tuple[int, int]:
    """The one ``(rows, cols)`` of a batch (``state.grid``: a pair, or one pair per image, all equal here because the
    batch shares its token count) checked against the patch count."""
    if grid is None:
        raise ValueError("pool: the tower site gave no patch grid (Need.GRID)")
    pairs: Sequence = [grid] if len(grid) == 2 and all(isinstance(g, int) for g in grid) else list(grid)
    first = (int(pairs[0][0]), int(pairs[0][1]))
    if any((int(r), int(c)) != first for r, c in pairs):
        raise ValueError(f"pool: images of one tower batch have different grids {sorted(set(map(tuple, pairs)))}")
    if first[0] * first[1] != num_patches:
        raise ValueError(f"pool: the grid {first[0]}x{first[1]} does not hold the {num_patches} patch tokens")
    return first


@register_method
class Pool(ReductionMethod):
    name = "pool"
    site = Site.TOWER_OUT
    needs = frozenset({Need.GRID})
    summary = "Spatial-pooling control: adaptive average pooling of each image's patch grid to keep tokens"
    params = keep_params()

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.budget = Budget(self.name, params.get("keep"), params.get("keep_ratio"))
        self.budget.check(geometry)
        if geometry.grid is not None:
            output_grid(geometry.grid, self.budget.count(geometry.grid[0] * geometry.grid[1]))

    def num_output(self, num_tokens: int) -> Optional[int]:
        """``keep`` visual tokens per image (the prefix is dropped)."""
        return self.budget.count(num_tokens - self.geometry.num_prefix)

    def reduce(self, state: TokenState) -> TokenState:
        """``x [B, p + P, C]`` -> ``[B, keep, C]``: the pooled cells in row-major order; ``size`` counts the patches
        each cell averages; no prefix and no ``kept`` (every output token is synthesised)."""
        p = state.num_prefix
        grid = image_grid(state.grid, state.num_tokens - p)
        out = output_grid(grid, self.budget.count(state.num_tokens - p))
        x = grid_pool(state.x[:, p:], grid, out)
        member = pool_membership(grid, out, state.size.dtype, state.x.device)  # [K, P]
        size = state.size[:, p:] @ member.t()
        source = None
        if state.source is not None:
            source = (torch.einsum("kp,bpn->bkn", member.to(state.source.dtype), state.source[:, p:]) > 0).to(
                state.source.dtype)
        return state.replace(x=x, size=size, source=source, num_prefix=0)
