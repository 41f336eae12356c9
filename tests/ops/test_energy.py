"""PiToMe's energy score against a plain-loop float64 reference of the paper's definition."""
import math

import pytest
import torch

from tokenreduce.ops.energy import energy_score


def reference_energy(metric, margin, alpha):
    """One sample, plain Python: E_i = mean_j f(cos_ij - margin), f = ELU with saturation alpha."""
    n = metric.shape[0]
    unit = [row / max(float(row.norm()), 1e-12) for row in metric]
    out = []
    for i in range(n):
        total = 0.0
        for j in range(n):
            x = float(unit[i] @ unit[j]) - margin
            total += x if x > 0 else alpha * (math.exp(x) - 1.0)
        out.append(total / n)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("margin,alpha", [(0.75, 1.0), (0.0, 1.0), (0.3, 0.5), (-0.2, 2.0)])
def test_matches_reference(margin, alpha):
    metric = torch.randn(3, 9, 5, dtype=torch.float64)
    out = energy_score(metric, margin, alpha)
    assert out.shape == (3, 9) and out.dtype == torch.float64
    for b in range(3):
        torch.testing.assert_close(out[b], reference_energy(metric[b], margin, alpha), rtol=1e-12, atol=1e-12)


def test_scale_invariant_and_zero_row():
    metric = torch.randn(2, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(energy_score(metric, 0.5), energy_score(3.0 * metric, 0.5))
    metric[0, 2] = 0.0  # F.normalize leaves a zero row at zero: similarity 0 to everything, no NaN
    out = energy_score(metric, 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], reference_energy(metric[0], 0.5, 1.0))


def test_tokens_in_a_crowd_have_more_energy():
    """Three near-duplicates outrank an isolated token: the property PiToMe's ordering relies on."""
    base = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    metric = torch.stack([base, base + 0.01, base - 0.01, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)])[None]
    energy = energy_score(metric, 0.75)
    assert energy[0, :3].min() > energy[0, 3]


def test_float32_close_to_float64():
    metric = torch.randn(2, 50, 16, dtype=torch.float64)
    torch.testing.assert_close(energy_score(metric.float(), 0.6).double(), energy_score(metric, 0.6),
                               atol=1e-6, rtol=1e-5)
