"""The spatial-pooling control: the output grid rule, a plain-loop float64 reference of the pooling (bins, sizes,
sources), batched generation and errors."""
import pytest
import torch

import tokenreduce
from tokenreduce.core import TokenState
from tokenreduce.methods.pool import Pool
from tokenreduce.ops.pool import adaptive_bins, pool_grid, poolable_near

from ..llava_helpers import tiny_llava
from ._tower_checks import PATCHES, check_batch_equals_alone, check_keep_all_is_unpatched, geometry


def test_output_grid_rule():
    # square budgets on LLaVA-1.5's 24 x 24 grid: sqrt(N) x sqrt(N); others: the most nearly square factorisation
    assert pool_grid(24, 24, 64) == (8, 8) and pool_grid(24, 24, 144) == (12, 12) and pool_grid(24, 24, 36) == (6, 6)
    assert pool_grid(24, 24, 128) == (8, 16) and pool_grid(24, 24, 192) == (12, 16)
    assert pool_grid(27, 27, 64) == (8, 8)  # SigLIP's 27 x 27: adaptive bins
    assert pool_grid(20, 30, 150) == (10, 15) and pool_grid(30, 20, 150) == (15, 10)  # the image's aspect ratio
    assert pool_grid(24, 24, 58) is None and pool_grid(24, 24, 29) is None  # 2 x 29, 29: no fit
    assert poolable_near(24, 24, 58) == [56, 57, 60, 63]
    assert pool_grid(24, 24, 576) == (24, 24)


def test_adaptive_bins_are_windows_when_they_divide():
    assert adaptive_bins(24, 8) == [(3 * i, 3 * i + 3) for i in range(8)]
    assert adaptive_bins(24, 16)[:3] == [(0, 2), (1, 3), (3, 5)]  # 1.5 per cell: neighbours share a row
    assert adaptive_bins(27, 8)[-1] == (23, 27)


def _reference(x, grid, out):
    """Loops: each output cell the plain mean of the patches in its row and column bins."""
    rows, cols = grid
    cells, sizes = [], []
    for r0, r1 in adaptive_bins(rows, out[0]):
        for c0, c1 in adaptive_bins(cols, out[1]):
            members = [r * cols + c for r in range(r0, r1) for c in range(c0, c1)]
            cells.append(torch.stack([x[m] for m in members]).mean(0))
            sizes.append(float(len(members)))
    return torch.stack(cells), sizes


@pytest.mark.parametrize("grid,keep,num_prefix", [((8, 8), 16, 1), ((8, 8), 24, 1), ((6, 9), 6, 0), ((7, 5), 35, 1)])
def test_pooling_matches_loop_reference(grid, keep, num_prefix):
    g = torch.Generator().manual_seed(keep)
    b, p = 2, grid[0] * grid[1]
    x = torch.randn(b, num_prefix + p, 5, generator=g, dtype=torch.float64)
    n = num_prefix + p
    source = torch.eye(n, dtype=torch.float64).expand(b, n, n)
    state = TokenState(x=x, size=torch.ones(b, n, dtype=torch.float64), source=source, num_prefix=num_prefix,
                       grid=grid)
    out = Pool(geometry(num_prefix, p, grid=grid), keep=keep).reduce(state)
    want, sizes = _reference(x[0, num_prefix:], grid, pool_grid(*grid, keep))
    torch.testing.assert_close(out.x[0], want, atol=1e-14, rtol=1e-12)
    assert out.size[0].tolist() == sizes and out.num_prefix == 0 and out.kept is None
    assert out.source[0].sum(-1).tolist() == sizes and out.source[:, :, :num_prefix].sum() == 0


def test_batched_generate_equals_each_sample_alone():
    check_batch_equals_alone("pool", dict(keep=16), keep=16)
    check_batch_equals_alone("pool", dict(keep=24), keep=24, model=tiny_llava(vision_layers=2, lm_layers=2))


def test_keep_all_is_unpatched():
    check_keep_all_is_unpatched("pool", dict(keep=PATCHES))


def test_errors_and_count():
    assert tokenreduce.build_method("pool", geometry(1, 576, grid=(24, 24)), keep=192).num_output(577) == 192
    model = tiny_llava(vision_layers=2, lm_layers=1)
    with pytest.raises(ValueError, match=r"keep=11 cannot be laid out .* nearest budgets that can: \[9, 10, 12, 14\]"):
        tokenreduce.patch(model, "pool", keep=11)
    with pytest.raises(ValueError, match="exceeds the 64 patch tokens"):
        tokenreduce.patch(model, "pool", keep=65)
    assert not tokenreduce.is_patched(model)
