"""VisionZip against the official implementation's recorded outputs (../shared/fixtures/visionzip) and against a
plain-loop reference of its selection and merge."""
import pytest
import torch

from tokenreduce.core import Geometry
from tokenreduce.methods.visionzip import VisionZip, contextual_merge, dominant_indices, uniform_targets
from tokenreduce.core import TokenState

from ..conftest import fixture_cases
from ..llava_helpers import run_llava_case


@pytest.mark.parametrize("case", fixture_cases("visionzip", call="llava"))
def test_llava_fixture(case):
    ok, msgs = run_llava_case("visionzip", case)
    assert ok, msgs


def _reference(x, cls_attn, keys, dominant, contextual):
    """VisionZip for one image written as loops: ``x [N, C]`` -> ``[dominant + contextual, C]``."""
    n = x.shape[0]
    order = sorted(range(1, n), key=lambda i: -float(cls_attn[i]))
    dom = [0] + sorted(order[:dominant - 1])
    rest = [i for i in range(n) if i not in dom]
    if contextual == 0:
        return torch.stack([x[i] for i in dom])
    m = len(rest)
    step = max(1, m // contextual)
    targets = list(range(0, m, step))[:contextual]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    groups = {t: [] for t in targets}
    for j in range(m):
        if j in groups:
            continue
        sims = [float(unit[rest[j]] @ unit[rest[t]]) for t in targets]
        groups[targets[max(range(len(targets)), key=lambda k: sims[k])]].append(rest[j])
    ctx = [x[rest[t]] + (torch.stack([x[i] for i in groups[t]]).mean(0) if groups[t] else 0) for t in targets]
    return torch.stack([x[i] for i in dom] + ctx)


@pytest.mark.parametrize("dominant,contextual", [(5, 3), (1, 4), (8, 0), (12, 7)])
def test_reduce_matches_loop_reference(dominant, contextual):
    g = torch.Generator().manual_seed(dominant * 10 + contextual)
    b, n, c, d = 2, 26, 6, 4
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    attn = torch.rand(b, n, generator=g, dtype=torch.float64).softmax(-1)
    keys = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    method = VisionZip(Geometry(num_blocks=1, num_prefix=1, num_patches=n - 1, dim=c, num_heads=1),
                       dominant=dominant, contextual=contextual)
    out = method.reduce(TokenState(x=x, size=torch.ones(b, n, dtype=x.dtype), num_prefix=1, cls_attn=attn,
                                   keys=keys))
    assert out.x.shape == (b, dominant + contextual, c)
    for i in range(b):
        torch.testing.assert_close(out.x[i], _reference(x[i], attn[i], keys[i], dominant, contextual))
    assert out.kept[:, 0].eq(0).all()
    assert out.size.sum(1).tolist() == [float(dominant + (n - dominant if contextual else 0))] * b


def test_helpers():
    attn = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.7]])
    assert dominant_indices(attn, 3).tolist() == [[0, 2, 4]]  # CLS, then the top patches in spatial order
    assert uniform_targets(10, 3).tolist() == [0, 3, 6]
    assert uniform_targets(2, 5).tolist() == [0, 1]
    hidden = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    ctx = contextual_merge(hidden, keys, 2)  # targets 0 and 2; 1 joins 0, 3 joins 2
    assert ctx.tokens.flatten().tolist() == [3.0, 12.0] and ctx.counts.tolist() == [[1, 1]]


def test_bad_parameters():
    geo = Geometry(num_blocks=23, num_prefix=1, num_patches=576, dim=1024, num_heads=16)
    with pytest.raises(ValueError, match="contextual=500 exceeds the 490 tokens"):
        VisionZip(geo, dominant=87, contextual=500)
    with pytest.raises(ValueError, match="exceeds the 577 tokens"):
        VisionZip(geo, dominant=600, contextual=0)
    assert VisionZip(geo, dominant=54, contextual=10).num_output(577) == 64
