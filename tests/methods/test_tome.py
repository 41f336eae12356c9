"""ToMe against the official implementation's recorded outputs (../shared/fixtures/tome)."""
import pytest
import torch

import tokenreduce
from tokenreduce.ops import bipartite_soft_matching, merge_source, merge_weighted

from ..conftest import fixture_cases, load_case, run_forward_fixture


@pytest.mark.parametrize("case", fixture_cases("tome"))
def test_forward_fixture(case):
    results = run_forward_fixture("tome", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


@pytest.mark.parametrize("case", fixture_cases("tome", call="function"))
def test_bipartite_worked_example(case):
    spec, t = load_case("tome", case)
    num_prefix = int(spec["params"]["class_token"]) + int(spec["params"]["distill_token"])
    x = t["x"]
    match = bipartite_soft_matching(t["metric"], spec["params"]["r"], num_prefix)
    size0 = torch.ones(x.shape[:2], dtype=x.dtype)
    merged, size = merge_weighted(x, size0, match.assign, match.num_out)
    source = merge_source(torch.eye(x.shape[1], dtype=x.dtype)[None], match.assign, match.num_out)
    torch.testing.assert_close(merged, t["merged_x"], atol=1e-12, rtol=1e-12)
    assert torch.equal(size, t["size"].to(size.dtype))
    assert torch.equal(source, t["source"].to(source.dtype))


def test_worked_example_by_hand():
    """The 7-token example documented in the fixtures README, written out independently."""
    import math
    angles = torch.tensor([0, 10, 80, 12, 45, 85, 170], dtype=torch.float64) * math.pi / 180
    metric = torch.stack([angles.cos(), angles.sin()], -1)[None]
    x = (10 * torch.arange(7, dtype=torch.float64))[None, :, None]
    match = bipartite_soft_matching(metric, 2, num_prefix=1)
    merged, size = merge_weighted(x, torch.ones(1, 7, dtype=torch.float64), match.assign, match.num_out)
    assert merged.flatten().tolist() == [0.0, 60.0, 10.0, 35.0, 35.0]
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0, 2.0]
