"""DivPrune against the official implementation's recorded outputs (../shared/fixtures/divprune), a plain-loop
float64 reference of its max-min selection, batched generation and errors."""
import pytest
import torch

import tokenreduce
from tokenreduce.methods.divprune import DivPrune
from tokenreduce.ops.divprune import cosine_distance, max_min_select

from ..conftest import fixture_cases
from ..llava_helpers import run_llava_case, tiny_llava
from ._tower_checks import PATCHES, check_batch_equals_alone, check_keep_all_is_unpatched, geometry, random_state


@pytest.mark.parametrize("case", fixture_cases("divprune", call="llava"))
def test_llava_fixture(case):
    ok, msgs = run_llava_case("divprune", case)
    assert ok, msgs


def _reference(feats, k):
    """One image, loops: d = 1 - cos; step 0 by the nearest-neighbour distance, then max of the min distance to the
    chosen ones."""
    n = feats.shape[0]
    unit = [f / f.norm() for f in feats]
    d = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [sorted(d[i][j] for i in range(n))[1] for j in range(n)]
    chosen = [max(range(n), key=lambda j: (nearest[j], -j))]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(d[s][j] for s in chosen), -j)))
    return chosen


@pytest.mark.parametrize("k", [1, 2, 9, 30])
def test_selection_matches_loop_reference(k):
    state, _ = random_state(patches=30, seed=k)
    got = max_min_select(cosine_distance(state.projected), k)
    for b in range(state.batch_size):
        assert got[b].tolist() == _reference(state.projected[b], k)
    out = DivPrune(geometry(1, 30), keep=k).reduce(state)
    assert out.kept.tolist() == [sorted(i + 1 for i in row) for row in got.tolist()]  # spatial order, CLS dropped
    assert out.x.shape[1] == k and out.num_prefix == 0


def test_exact_duplicates_are_never_chosen_twice():
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    got = max_min_select(cosine_distance(feats), 4)[0].tolist()
    assert sorted(got) == [0, 1, 2, 3]


def test_batched_generate_equals_each_sample_alone():
    check_batch_equals_alone("divprune", dict(keep=11), keep=11)


def test_keep_all_is_unpatched():
    check_keep_all_is_unpatched("divprune", dict(keep=PATCHES))


def test_ratio_like_upstream_and_errors():
    assert tokenreduce.build_method("divprune", geometry(1, 576), subset_ratio=0.098).num_output(577) == 56
    assert tokenreduce.build_method("divprune", geometry(1, 576), keep=192).num_output(577) == 192
    model = tiny_llava(vision_layers=2, lm_layers=1)
    with pytest.raises(ValueError, match="exceeds the 64 patch tokens"):
        tokenreduce.patch(model, "divprune", keep=65)
    with pytest.raises(ValueError, match="keep_ratio"):
        tokenreduce.patch(model, "divprune", keep_ratio=1.5)
    assert not tokenreduce.is_patched(model)
