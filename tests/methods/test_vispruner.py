"""VisPruner against the official implementation's recorded outputs (../shared/fixtures/vispruner), a plain-list
float64 reference of its selection (odd counts, small diverse budgets, no CLS token), batched generation and errors."""
import math

import pytest
import torch

import tokenreduce
from tokenreduce.methods.vispruner import VisPruner, important_count
from tokenreduce.ops.vispruner import remove_duplicates

from ..conftest import fixture_cases
from ..llava_helpers import run_llava_case, tiny_llava
from ._tower_checks import PATCHES, check_batch_equals_alone, check_keep_all_is_unpatched, geometry, random_state


@pytest.mark.parametrize("case", fixture_cases("vispruner", call="llava"))
def test_llava_fixture(case):
    ok, msgs = run_llava_case("vispruner", case)
    assert ok, msgs


def _cos(u, v):
    return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))


def _reference(scores, feats, important, diverse):
    """One image with Python lists: descending-score order, the top ``important``; the rest shrunk by the
    even/odd matching rounds of the paper's code (at most 8 per round, never more than the even tokens)."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    imp, res = order[:important], order[important:]
    while diverse and len(res) > diverse:
        a, b = res[0::2], res[1::2]
        best = [max(_cos(feats[i], feats[j]) for j in b) for i in a]
        by_sim = sorted(range(len(a)), key=lambda t: -best[t])
        drop = min(8, len(res) - diverse, len(a))
        res = [a[t] for t in by_sim[drop:]] + b
    if not diverse:
        res = []
    return sorted(imp + res)


@pytest.mark.parametrize("num_prefix", [1, 0])
@pytest.mark.parametrize("keep,important", [(10, 4), (10, 5), (9, 0), (12, 12), (20, 17), (6, 1), (40, 0)])
def test_selection_matches_loop_reference(num_prefix, keep, important):
    """Covers odd important (an odd residual: one more even token), diverse < 8 (the last round would drop more even
    tokens than there are), only diverse and only important tokens, and both tower kinds."""
    patches = 41
    state, probs = random_state(num_prefix=num_prefix, patches=patches, seed=keep * 7 + important)
    out = VisPruner(geometry(num_prefix, patches), keep=keep, important=important, important_ratio=None).reduce(state)
    for b in range(state.batch_size):
        cols = range(num_prefix, num_prefix + patches)
        scores = [float(probs[b, :, 0, c].mean()) if num_prefix else float(probs[b, :, :, c].mean()) for c in cols]
        feats = state.x[b, num_prefix:]
        want = _reference(scores, feats, important, keep - important)
        assert out.kept[b].tolist() == [i + num_prefix for i in want]
    assert out.x.shape[1] == keep and out.num_prefix == 0


def test_remove_duplicates_order_feeds_the_next_round():
    """Two rounds by hand: the survivors of round one come first, by descending similarity, then the odd tokens."""
    unit = torch.eye(6, dtype=torch.float64)[None]
    unit = unit.clone()
    unit[0, 0] = torch.tensor([1.0, 0.9, 0, 0, 0, 0]) / math.hypot(1, 0.9)  # token 0 ~ token 1
    got = remove_duplicates(unit, torch.tensor([[0, 1, 2, 3, 4, 5]]), 5, max_drop=8)
    assert got.tolist() == [[2, 4, 1, 3, 5]]  # 0 (the most similar even token) dropped


def test_important_count_truncates_like_upstream():
    assert important_count(64, None, 0.75) == 48 and important_count(100, None, 0.29) == 28  # int(28.999...)
    assert important_count(64, None, None) == 32 and important_count(64, 7, None) == 7
    with pytest.raises(ValueError, match="exceeds keep"):
        important_count(10, 11, None)


def test_batched_generate_equals_each_sample_alone():
    check_batch_equals_alone("vispruner", dict(keep=13, important=5), keep=13)


def test_keep_all_is_unpatched():
    check_keep_all_is_unpatched("vispruner", dict(keep=PATCHES))
    check_keep_all_is_unpatched("vispruner", dict(keep=PATCHES, important=0))


def test_parameters_and_errors():
    m = tokenreduce.build_method("vispruner", geometry(1, 576), visual_token_num=64, important_ratio=0.75)
    assert m.num_output(577) == 64 and important_count(64, m.important, m.important_ratio) == 48
    assert VisPruner(geometry(1, 576), keep=None, keep_ratio=None, important=None,
                     important_ratio=None).num_output(577) == 64
    model = tiny_llava(vision_layers=2, lm_layers=1)
    with pytest.raises(ValueError, match="not both"):
        tokenreduce.patch(model, "vispruner", keep=10, important=4, important_ratio=0.5)
    with pytest.raises(ValueError, match="important=11 exceeds keep=10"):
        tokenreduce.patch(model, "vispruner", keep=10, important=11)
    with pytest.raises(ValueError, match="must be <= 1.0"):
        tokenreduce.patch(model, "vispruner", keep=10, important_ratio=1.5)
    with pytest.raises(ValueError, match="exceeds the 64 patch tokens"):
        tokenreduce.patch(model, "vispruner", keep=100)
    assert not tokenreduce.is_patched(model)
