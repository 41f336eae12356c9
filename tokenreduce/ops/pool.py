"""Average pooling of an image's patch tokens on their grid to a fixed number of tokens (the spatial-pooling control
of VLM token-reduction benchmarks), as pure functions."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F


@lru_cache(maxsize=256)
def pool_grid(rows: int, cols: int, keep: int) -> Optional[Tuple[int, int]]:
    """The output grid ``(a, b)`` with exactly ``a · b == keep`` cells, ``a <= rows``, ``b <= cols``, whose aspect
    ratio is closest to the input's (smallest ``|log(a/b) - log(rows/cols)|``; a tie goes to the one with fewer rows).
    None when no factorisation of ``keep`` fits the grid (e.g. a prime larger than both sides).

    On a square grid this is ``√keep × √keep`` for a square ``keep`` (64 on 24×24: 8×8), else the most nearly square
    factorisation (128: 8×16, 192: 12×16)."""
    target = math.log(rows / cols)
    best, best_cost = None, None
    for a in range(1, min(rows, keep) + 1):
        if keep % a or keep // a > cols:
            continue
        b = keep // a
        cost = abs(math.log(a / b) - target)
        if best_cost is None or cost < best_cost - 1e-12:
            best, best_cost = (a, b), cost
    return best


def poolable_near(rows: int, cols: int, keep: int, count: int = 2) -> List[int]:
    """Up to ``count`` token counts on each side of ``keep`` that :func:`pool_grid` can give (for error messages)."""
    below = [k for k in range(keep - 1, 0, -1) if pool_grid(rows, cols, k)][:count]
    above = [k for k in range(keep + 1, rows * cols + 1) if pool_grid(rows, cols, k)][:count]
    return sorted(below + above)


def adaptive_bins(size: int, out: int) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` of adaptive pooling along one axis: cell i covers ``[floor(i·size/out),
    ceil((i+1)·size/out))`` (PyTorch's ``adaptive_avg_pool``). When ``out`` divides ``size`` these are the windows of
    a plain pooling with kernel = stride = ``size / out``; otherwise neighbouring cells may share a row or column."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pool_membership(grid: Tuple[int, int], out: Tuple[int, int], dtype: torch.dtype = torch.float32,
                    device=None) -> torch.Tensor:
    """``[a·b, rows·cols]`` 0/1: which input patches (row-major) each output cell (row-major) averages."""
    rows, cols = grid
    m = torch.zeros(out[0], out[1], rows, cols, dtype=dtype, device=device)
    for i, (r0, r1) in enumerate(adaptive_bins(rows, out[0])):
        for j, (c0, c1) in enumerate(adaptive_bins(cols, out[1])):
            m[i, j, r0:r1, c0:c1] = 1
    return m.view(out[0] * out[1], rows * cols)


def grid_pool(x: torch.Tensor, grid: Tuple[int, int], out: Tuple[int, int]) -> torch.Tensor:
    """Average-pool patch tokens ``x [B, rows·cols, C]`` (row-major on ``grid``) to ``[B, a·b, C]`` (row-major on
    ``out``) by adaptive average pooling."""
    b, n, c = x.shape
    rows, cols = grid
    img = x.transpose(1, 2).reshape(b, c, rows, cols)
    return F.adaptive_avg_pool2d(img, out).reshape(b, c, out[0] * out[1]).transpose(1, 2)
