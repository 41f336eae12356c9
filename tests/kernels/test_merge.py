"""Fused weighted merge against ``tokenreduce.ops.merge.merge_weighted`` (interpreter on CPU, compiled on CUDA)."""
import pytest
import torch

from tokenreduce.kernels import dispatch
from tokenreduce.kernels.merge import merge_weighted as kernel_merge, segments
from tokenreduce.ops.matching import bipartite_soft_matching
from tokenreduce.ops.merge import merge_weighted

from .conftest import DEVICE, DTYPES, LOW, assert_within_torch_error


def reference(x, size, assign, num_out):
    with dispatch.override("off"):
        return merge_weighted(x, size, assign, num_out)


def random_assign(bsz, n, m, seed=0, skew=False):
    """A random surjection of N tokens onto M slots (every slot used), per sample; ``skew`` sends most tokens to
    one slot (one long segment)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(bsz):
        extra = torch.zeros(n - m, dtype=torch.long) if skew else torch.randint(0, m, (n - m,), generator=g)
        slots = torch.cat([torch.arange(m), extra])
        rows.append(slots[torch.randperm(n, generator=g)])
    return torch.stack(rows).to(DEVICE)


def tome_assign(bsz, n, r, prefix, seed=0):
    g = torch.Generator().manual_seed(seed)
    match = bipartite_soft_matching(torch.randn(bsz, n, 16, generator=g, dtype=torch.float64), r, prefix)
    return match.assign.to(DEVICE), match.num_out


def inputs(bsz, n, c, dtype, seed=0, size_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, c, generator=g, dtype=torch.float64)
    size = torch.randint(1, 9, (bsz, n), generator=g).double() * torch.rand(bsz, n, generator=g, dtype=torch.float64)
    return x.to(dtype).to(DEVICE), (size + 0.25).to(size_dtype or dtype).to(DEVICE)


def check(x, size, assign, num_out, out, out_size):
    """Outputs against the exact (float64) merge of the same inputs: fp32 to fp32 rounding, fp16/bf16 no worse than
    2x PyTorch's own error in that dtype."""
    ref_x, ref_size = reference(x, size, assign, num_out)
    exact_x, exact_size = reference(x.double(), size.double(), assign, num_out)
    assert out.dtype == x.dtype and out_size.dtype == size.dtype
    assert out.shape == ref_x.shape and out_size.shape == ref_size.shape
    if x.dtype in LOW:
        assert_within_torch_error(out, ref_x, exact_x, x.dtype, what="merged x")
    else:
        torch.testing.assert_close(out.double(), exact_x, rtol=2e-6, atol=2e-6)
    if size.dtype in LOW:
        assert_within_torch_error(out_size, ref_size, exact_size, size.dtype, what="merged size")
    else:
        torch.testing.assert_close(out_size.double(), exact_size, rtol=2e-6, atol=0)


CASES = [  # (B, N, C, r, num_prefix): ToMe assignments
    (1, 2, 8, 1, 0), (1, 3, 5, 1, 1), (2, 17, 64, 8, 1), (3, 33, 37, 5, 0), (1, 65, 48, 16, 2),
    (2, 77, 100, 30, 1), (1, 197, 192, 16, 1), (4, 50, 3, 20, 5),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda s: "B{}-N{}-C{}-r{}-p{}".format(*s))
def test_tome_assignments(case, dtype):
    bsz, n, c, r, prefix = case
    assign, num_out = tome_assign(bsz, n, r, prefix, seed=n)
    x, size = inputs(bsz, n, c, dtype, seed=n)
    out, out_size = kernel_merge(x, size, assign, num_out)
    check(x, size, assign, num_out, out, out_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_surjections_small_tiles(dtype):
    """Arbitrary assignments (not ToMe-shaped) through 8-slot x 16-channel tiles: several slot and channel tiles,
    segments of different lengths in one tile."""
    assign = random_assign(3, 41, 13, seed=1)
    x, size = inputs(3, 41, 37, dtype, seed=1)
    out, out_size = kernel_merge(x, size, assign, 13, config={"BLOCK_M": 8, "BLOCK_C": 16})
    check(x, size, assign, 13, out, out_size)


def test_one_long_segment():
    assign = random_assign(2, 90, 4, seed=2, skew=True)
    x, size = inputs(2, 90, 24, torch.bfloat16, seed=2)
    out, out_size = kernel_merge(x, size, assign, 4)
    check(x, size, assign, 4, out, out_size)


def test_identity_and_single_token():
    x, size = inputs(2, 9, 20, torch.float16)
    ident = torch.arange(9, device=DEVICE).expand(2, -1)
    out, out_size = kernel_merge(x, size, ident, 9)
    assert torch.equal(out, x) and torch.equal(out_size, size)  # x*s/s in fp32 is exact, then rounds back to x
    x1, s1 = inputs(1, 1, 5, torch.float32)
    out, out_size = kernel_merge(x1, s1, torch.zeros(1, 1, dtype=torch.long, device=DEVICE), 1)
    check(x1, s1, torch.zeros(1, 1, dtype=torch.long, device=DEVICE), 1, out, out_size)


def test_size_dtype_and_layouts():
    """fp32 sizes with bf16 tokens (the reference weights by size.to(x.dtype)), a non-contiguous x, sizes expanded
    from one row (stride 0), int32 assignments."""
    assign, num_out = tome_assign(3, 40, 12, 1, seed=3)
    x, size = inputs(3, 40, 30, torch.bfloat16, seed=3, size_dtype=torch.float32)
    out, out_size = kernel_merge(x, size, assign, num_out)
    check(x, size, assign, num_out, out, out_size)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)
    ones = torch.ones(1, 40, device=DEVICE, dtype=torch.bfloat16).expand(3, -1)
    out, out_size = kernel_merge(x_t, ones, assign.int(), num_out)
    check(x_t, ones, assign, num_out, out, out_size)


def test_empty_slot_is_nan_like_the_reference():
    assign = torch.tensor([[0, 0, 2, 2]], device=DEVICE)  # slot 1 unused (the reference's contract forbids it)
    x, size = inputs(1, 4, 6, torch.float32)
    out, out_size = kernel_merge(x, size, assign, 3)
    ref_x, ref_size = reference(x, size, assign, 3)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(ref_x[0, 1]).all() and out_size[0, 1] == 0 == ref_size[0, 1]
    torch.testing.assert_close(out[0, [0, 2]], ref_x[0, [0, 2]])


def test_deterministic_across_runs_and_tilings():
    """The sum order is fixed (increasing token index): bitwise-equal results for any launch configuration."""
    assign = random_assign(2, 70, 20, seed=4)
    x, size = inputs(2, 70, 40, torch.bfloat16, seed=4)
    first = kernel_merge(x, size, assign, 20, config={"BLOCK_M": 8, "BLOCK_C": 16})
    for config in ({"BLOCK_M": 8, "BLOCK_C": 16}, {"BLOCK_M": 32, "BLOCK_C": 64}, None):
        again = kernel_merge(x, size, assign, 20, config=config)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_segments():
    assign = torch.tensor([[2, 0, 2, 1, 0], [0, 1, 2, 2, 2]], device=DEVICE)
    perm, bounds = segments(assign, 3)
    assert perm.tolist() == [[1, 4, 3, 0, 2], [0, 1, 2, 3, 4]]
    assert bounds.tolist() == [[0, 2, 3, 5], [0, 1, 2, 5]]


def test_empty_shapes_and_validation():
    x, size = inputs(2, 4, 6, torch.float32)
    out, out_size = kernel_merge(x, size, torch.zeros(2, 4, dtype=torch.long, device=DEVICE)[:, :4], 0)
    assert out.shape == (2, 0, 6) and out_size.shape == (2, 0)
    with pytest.raises(ValueError):
        kernel_merge(x, size[:, :3], torch.zeros(2, 4, dtype=torch.long, device=DEVICE), 2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", [(8, 577, 384, 48, 1), (2, 1025, 768, 100, 1), (16, 197, 768, 16, 1)],
                         ids=lambda s: "B{}-N{}-C{}-r{}-p{}".format(*s))
def test_medium_shapes(case, dtype):
    bsz, n, c, r, prefix = case
    assign, num_out = tome_assign(bsz, n, r, prefix, seed=n)
    x, size = inputs(bsz, n, c, dtype, seed=n)
    out, out_size = kernel_merge(x, size, assign, num_out,
                                 config=None if DEVICE == "cuda" else {"BLOCK_M": 128, "BLOCK_C": 256})
    check(x, size, assign, num_out, out, out_size)
