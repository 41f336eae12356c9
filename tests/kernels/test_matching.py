"""Fused matching kernel against ``tokenreduce.ops.matching.best_match`` (interpreter on CPU, compiled on CUDA)."""
import math

import pytest
import torch

from tokenreduce.kernels import dispatch
from tokenreduce.kernels.matching import best_match as kernel_best_match
from tokenreduce.ops.matching import best_match

from .conftest import DEVICE, DTYPES, LOW, assert_within_torch_error

SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}


def unit_metric(bsz, n, d, dtype, clustered=False, seed=0):
    """ToMe's metric: unit-norm rows; ``clustered`` puts the tokens in a few tight groups (near-ties, like
    background patches), where rounding to fp16/bf16 creates exact ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, d, generator=g, dtype=torch.float64)
    if clustered:
        centres = torch.randn(bsz, 4, d, generator=g, dtype=torch.float64)
        x = centres[:, torch.randint(0, 4, (n,), generator=g)] + 0.05 * x
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype).to(DEVICE)


def masked_scores(a, b, protect_rows=0, protect_cols=0, valid_cols=None, dtype=None):
    """Score matrix of the reference (in ``dtype``, default a's) with every mask applied."""
    dtype = dtype or a.dtype
    scores = a.to(dtype) @ b.to(dtype).transpose(-1, -2)
    cols = torch.arange(b.shape[1], device=a.device)
    keep = cols >= protect_cols
    if valid_cols is not None:
        limit = valid_cols if isinstance(valid_cols, torch.Tensor) else torch.full((a.shape[0],), valid_cols)
        keep = keep & (cols[None, :] < limit.to(a.device)[:, None])
    rows = torch.arange(a.shape[1], device=a.device) >= protect_rows
    keep = keep.expand(a.shape[0], -1)[:, None, :] & rows[:, None]
    return scores.masked_fill(~keep, float("-inf"))


def reference(a, b, protect_rows=0, protect_cols=0, valid_cols=None):
    if valid_cols is None:
        with dispatch.override("off"):
            return best_match(a, b, protect_rows, protect_cols)
    return masked_scores(a, b, protect_rows, protect_cols, valid_cols).max(dim=-1)


def check(a, b, values, index, protect_rows=0, protect_cols=0, valid_cols=None, normalized_from=None):
    """Indices equal to the reference's except at near-ties (where the kernel's choice must score within one
    rounding step of the best), values within one rounding step, and no worse than 2x PyTorch's own error."""
    dtype = a.dtype
    ref_values, ref_index = reference(a, b, protect_rows, protect_cols, valid_cols)
    exact_scores = masked_scores(a, b, protect_rows, protect_cols, valid_cols, dtype=torch.float64)
    exact = exact_scores.max(dim=-1).values
    assert values.dtype == dtype and index.dtype == torch.long
    assert torch.equal(values == float("-inf"), ref_values == float("-inf"))
    finite = torch.isfinite(ref_values)
    step = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
    assert torch.allclose(values[finite].double(), ref_values[finite].double(), rtol=0, atol=step)
    if dtype in LOW:
        assert_within_torch_error(values, ref_values, exact, dtype, what="best_match score")
    differ = index != ref_index
    if differ.any():
        chosen = exact_scores.gather(-1, index[..., None])[..., 0]
        gap = (exact - chosen)[differ]
        assert (gap <= 2 * step).all(), f"{int(differ.sum())} index mismatches, not ties: gaps {gap.tolist()[:5]}"
        assert differ.float().mean() < 0.05, "too many near-tie mismatches"
    assert (index[~finite] == 0).all()


SHAPES = [  # (B, N tokens before the parity split, d, num_prefix)
    (1, 2, 8, 0), (1, 3, 5, 0), (2, 17, 64, 1), (3, 33, 40, 0), (1, 65, 24, 2), (2, 77, 100, 1),
    (1, 197, 64, 1), (4, 50, 3, 5), (2, 129, 200, 0), (1, 31, 64, 31),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-d{}-p{}".format(*s))
def test_tome_parity_split(shape, dtype):
    bsz, n, d, prefix = shape
    metric = unit_metric(bsz, n, d, dtype, clustered=n % 2 == 1, seed=n)
    a, b = metric[:, ::2], metric[:, 1::2]  # strided views, as ToMe passes them
    pr, pc = (prefix + 1) // 2, prefix // 2
    values, index = kernel_best_match(a, b, pr, pc)
    check(a, b, values, index, pr, pc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_tiles_cross_every_boundary(dtype):
    """16-wide tiles: several row tiles, column tiles and feature chunks, a protected-column range ending inside a
    tile, clustered (tie-prone) rows."""
    metric = unit_metric(2, 67, 40, dtype, clustered=True, seed=1)
    a, b = metric[:, ::2], metric[:, 1::2]
    values, index = kernel_best_match(a, b, 3, 17, config=SMALL_TILES)
    check(a, b, values, index, 3, 17)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_go_to_lowest_index(dtype):
    """Identical B rows at several positions, across tiles: the lowest index wins, as in torch.max. Entries are
    multiples of 1/8, so every dot product is exact in any summation order (float matmuls of real data give
    identical columns different last bits, on both paths)."""
    g = torch.Generator().manual_seed(2)
    a = (torch.randint(-3, 4, (1, 20, 24), generator=g) / 8).to(dtype).to(DEVICE)
    b = (torch.randint(-3, 4, (1, 40, 24), generator=g) / 8).to(dtype).to(DEVICE)
    b[0, 5] = b[0, 21] = b[0, 37] = a[0, 0]   # exact best for row 0 at 5, 21, 37 (three 16-column tiles)
    b[0, 30] = b[0, 18] = a[0, 1]              # row 1: best at 18 and 30
    for config in (None, {"BLOCK_M": 16, "BLOCK_N": 16}):
        values, index = kernel_best_match(a, b, config=config)
        assert index[0, 0] == 5 and index[0, 1] == 18
        check(a, b, values, index)
    values, index = kernel_best_match(a, b, protect_cols=6, config={"BLOCK_M": 16, "BLOCK_N": 16})
    assert index[0, 0] == 21


def test_rounding_ties_break_like_the_reference():
    """Distinct fp32 scores that round to the same bf16 value: the kernel rounds before comparing, so it picks
    the lowest such index exactly as the reference (which compares rounded matmul outputs)."""
    d = 16
    a = torch.zeros(1, 1, d, dtype=torch.float64)
    a[0, 0, 0] = 1.0
    b = torch.zeros(1, 4, d, dtype=torch.float64)
    b[0, :, 0] = torch.tensor([0.5, 0.75 + 2 ** -12, 0.75 + 2 ** -10, 0.75])  # last three round to 0.75 in bf16
    b[0, :, 1] = (1 - b[0, :, 0] ** 2).sqrt()
    a, b = a.to(torch.bfloat16).to(DEVICE), b.to(torch.bfloat16).to(DEVICE)
    values, index = kernel_best_match(a, b)
    ref_values, ref_index = reference(a, b)
    assert torch.equal(index, ref_index) and torch.equal(values, ref_values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_valid_cols(dtype):
    metric = unit_metric(3, 81, 32, dtype, seed=4)
    a, b = metric[:, ::2], metric[:, 1::2]
    values, index = kernel_best_match(a, b, 0, 2, valid_cols=30)
    check(a, b, values, index, 0, 2, valid_cols=30)
    per_sample = torch.tensor([40, 17, 0], device=DEVICE)  # the last sample has no eligible column
    values, index = kernel_best_match(a, b, 1, 0, valid_cols=per_sample, config={"BLOCK_M": 32, "BLOCK_N": 16})
    check(a, b, values, index, 1, 0, valid_cols=per_sample)
    assert (values[2] == float("-inf")).all() and (index[2] == 0).all()


def test_column_range_is_a_view():
    """A shared column range [c0, c1) is protect_cols=c0, valid_cols=c1; it equals matching against b[:, c0:c1]."""
    metric = unit_metric(2, 60, 64, torch.float32, seed=5)
    a, b = metric[:, :20], metric[:, 20:]
    values, index = kernel_best_match(a, b, protect_cols=7, valid_cols=31)
    ref_values, ref_index = reference(a, b[:, 7:31])
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-6)
    assert torch.equal(index, ref_index + 7)


def test_everything_masked_and_empty():
    a = unit_metric(2, 5, 16, torch.float32)
    b = unit_metric(2, 4, 16, torch.float32, seed=1)
    for pr, pc in [(5, 0), (9, 0), (0, 4), (0, 10)]:
        values, index = kernel_best_match(a, b, pr, pc)
        check(a, b, values, index, pr, pc)
        assert (values == float("-inf")).all() and (index == 0).all()
    values, index = kernel_best_match(a, b[:, :0])  # Nb = 0 (ToMe with a single token): nothing to match
    assert (values == float("-inf")).all() and (index == 0).all()
    values, index = kernel_best_match(a[:, :0], b)
    assert values.shape == (2, 0) and index.shape == (2, 0)


def test_nan_wins_like_torch_max():
    a = unit_metric(1, 6, 16, torch.float32)
    b = unit_metric(1, 50, 16, torch.float32, seed=1)
    a[0, 2] = float("nan")        # a NaN row: every score NaN -> NaN at index 0
    b[0, 33] = float("nan")       # a NaN column: wins every other row
    values, index = kernel_best_match(a, b, config={"BLOCK_M": 16, "BLOCK_N": 16})
    ref_values, ref_index = reference(a, b)
    assert torch.equal(index, ref_index)
    assert torch.equal(torch.isnan(values), torch.isnan(ref_values)) and torch.isnan(values).all()
    values, index = kernel_best_match(a, b, protect_rows=3, valid_cols=33)   # masks hide both NaNs
    ref_values, ref_index = reference(a, b, 3, 0, valid_cols=33)
    assert torch.equal(index, ref_index) and not torch.isnan(values).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalize_in_kernel(dtype):
    g = torch.Generator().manual_seed(6)
    raw = (torch.randn(2, 45, 40, generator=g) * torch.rand(2, 45, 1, generator=g) * 5).to(dtype).to(DEVICE)
    unit = (raw.double() / raw.double().norm(dim=-1, keepdim=True)).to(dtype)
    values, index = kernel_best_match(raw[:, ::2], raw[:, 1::2], 1, 0, normalize=True)
    check(unit[:, ::2], unit[:, 1::2], values, index, 1, 0)
    values, index = kernel_best_match(raw[:, ::2], raw[:, 1::2], 1, 0, normalize=True, config=SMALL_TILES)
    check(unit[:, ::2], unit[:, 1::2], values, index, 1, 0)


def test_arbitrary_strides():
    """Non-contiguous features (a transposed buffer) and a batch stride of 0 (expanded B)."""
    base = unit_metric(1, 64, 24, torch.float16, seed=7)
    a = base[:, :30].transpose(1, 2).contiguous().transpose(1, 2).expand(3, -1, -1)
    b = base[:, 30:].expand(3, -1, -1)
    assert a.stride(2) != 1 and b.stride(0) == 0
    values, index = kernel_best_match(a, b, 1, 1)
    check(a, b, values, index, 1, 1)


def test_validation():
    a = unit_metric(1, 4, 8, torch.float32)
    with pytest.raises(ValueError):
        kernel_best_match(a, a[:, :, :4])
    with pytest.raises(TypeError):
        kernel_best_match(a, a.half())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(8, 577, 64, 1), (2, 1025, 64, 1), (1, 4097, 64, 0), (16, 197, 64, 2)],
                         ids=lambda s: "B{}-N{}-d{}-p{}".format(*s))
def test_medium_shapes(shape, dtype):
    bsz, n, d, prefix = shape
    metric = unit_metric(bsz, n, d, dtype, clustered=True, seed=n)
    a, b = metric[:, ::2], metric[:, 1::2]
    pr, pc = (prefix + 1) // 2, prefix // 2
    values, index = kernel_best_match(a, b, pr, pc, config=None if DEVICE == "cuda" else {"BLOCK_M": 128,
                                                                                        "BLOCK_N": 128})
    check(a, b, values, index, pr, pc)
    assert math.isfinite(values[:, pr:].float().min().item())
