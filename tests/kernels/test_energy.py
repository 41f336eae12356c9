"""Fused PiToMe energy kernel against ``tokenreduce.ops.energy.energy_score`` (interpreter on CPU, compiled on CUDA)."""
import pytest
import torch

from tokenreduce.kernels import dispatch
from tokenreduce.kernels.energy import energy_score as kernel_energy

from .conftest import DEVICE, DTYPES, LOW, assert_within_torch_error

from tokenreduce.ops import energy as ops_energy  # noqa: E402


def reference(metric, margin, alpha):
    with dispatch.override("off"):
        return ops_energy.energy_score(metric, margin, alpha)


def features(bsz, n, d, dtype, seed=0, clustered=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, d, generator=g, dtype=torch.float64)
    if clustered:  # realistic similarity spread: groups of similar tokens around a few centres, varied norms
        centres = torch.randn(bsz, 3, d, generator=g, dtype=torch.float64)
        x = centres[:, torch.randint(0, 3, (n,), generator=g)] + 0.6 * x
    x = x * (0.5 + 3 * torch.rand(bsz, n, 1, generator=g, dtype=torch.float64))
    return x.to(dtype).to(DEVICE)


def check(metric, margin, alpha, out):
    exact = reference(metric.double(), margin, alpha)
    assert out.dtype == metric.dtype and out.shape == metric.shape[:2]
    if metric.dtype in LOW:
        assert_within_torch_error(out, reference(metric, margin, alpha), exact, metric.dtype, what="energy")
    else:
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-6)


SHAPES = [(1, 1, 8), (1, 2, 5), (2, 17, 64), (3, 33, 40), (1, 65, 24), (2, 77, 100), (1, 197, 64), (4, 50, 3),
          (2, 40, 200)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-d{}".format(*s))
def test_shapes(shape, dtype):
    metric = features(*shape, dtype, seed=shape[1])
    margin = 0.75 * (1 - shape[1] % 12 / 12)   # PiToMe's per-layer margins 0.75 (1 - l / L)
    check(metric, margin, 1.0, kernel_energy(metric, margin, 1.0))


@pytest.mark.parametrize("margin,alpha", [(0.0, 1.0), (0.9, 0.5), (-0.3, 2.0), (1.5, 1.0)])
def test_margins_and_alpha(margin, alpha):
    metric = features(2, 45, 32, torch.float32, seed=1)
    check(metric, margin, alpha, kernel_energy(metric, margin, alpha))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_tiles(dtype):
    """16-wide tiles: several row and column tiles and three feature chunks (d = 40)."""
    metric = features(2, 53, 40, dtype, seed=2)
    out = kernel_energy(metric, 0.5, 1.0, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16})
    check(metric, 0.5, 1.0, out)


def test_zero_row_and_strides():
    """A zero row has similarity 0 to everything (F.normalize's eps); strided (parity) views are read in place."""
    metric = features(2, 31, 24, torch.float32, seed=3)
    metric[1, 4] = 0
    check(metric, 0.6, 1.0, kernel_energy(metric, 0.6, 1.0))
    view = metric[:, 1::2]
    check(view, 0.6, 1.0, kernel_energy(view, 0.6, 1.0))
    expanded = metric[:1].expand(3, -1, -1)
    check(expanded, 0.2, 1.0, kernel_energy(expanded, 0.2, 1.0))


def test_empty_and_validation():
    assert kernel_energy(torch.zeros(2, 0, 8, device=DEVICE), 0.5).shape == (2, 0)
    with pytest.raises(ValueError):
        kernel_energy(torch.zeros(2, 8, device=DEVICE), 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(4, 577, 64), (1, 1025, 64), (16, 196, 64)], ids=lambda s: "B{}-N{}-d{}".format(*s))
def test_medium_shapes(shape, dtype):
    metric = features(*shape, dtype, seed=shape[1])
    out = kernel_energy(metric, 0.375, 1.0,
                        config=None if DEVICE == "cuda" else {"BLOCK_M": 128, "BLOCK_N": 128})
    check(metric, 0.375, 1.0, out)
