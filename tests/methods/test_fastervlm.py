"""FasterVLM against the official implementation's recorded outputs (../shared/fixtures/fastervlm), a plain-loop
float64 reference of its selection (with and without a CLS token), batched generation and its errors."""
import pytest
import torch

import tokenreduce
from tokenreduce.methods.fastervlm import FasterVLM
from tokenreduce.ops.tower_scores import received_attention

from ..conftest import fixture_cases
from ..llava_helpers import run_llava_case, tiny_llava
from ._tower_checks import (PATCHES, check_batch_equals_alone, check_keep_all_is_unpatched, geometry,
                            random_state)


@pytest.mark.parametrize("case", fixture_cases("fastervlm", call="llava"))
def test_llava_fixture(case):
    ok, msgs = run_llava_case("fastervlm", case)
    assert ok, msgs


def _reference(scores, keep):
    """One image: the ``keep`` patches with the highest score (a Python sort), ascending."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return sorted(order[:keep])


@pytest.mark.parametrize("num_prefix", [1, 0])
@pytest.mark.parametrize("keep", [1, 7, 30])
def test_selection_matches_loop_reference(num_prefix, keep):
    state, probs = random_state(num_prefix=num_prefix, seed=keep)
    out = FasterVLM(geometry(num_prefix, 30), keep=keep).reduce(state)
    for b in range(state.batch_size):
        if num_prefix:  # the CLS row, head mean, prefix column dropped
            scores = [float(probs[b, :, 0, num_prefix + i].mean()) for i in range(30)]
        else:  # mean attention received: over every query and head
            scores = [float(probs[b, :, :, i].mean()) for i in range(30)]
        want = _reference(scores, keep)
        assert out.kept[b].tolist() == [i + num_prefix for i in want]
        torch.testing.assert_close(out.x[b], state.x[b, [i + num_prefix for i in want]])
    assert out.num_prefix == 0 and out.x.shape[1] == keep  # only patches leave


def test_received_attention_in_chunks_equals_the_full_matrix():
    state, probs = random_state(num_prefix=0, patches=150, seed=3)
    got = received_attention(state.attn_rows, 2, 150, state.x.device, chunk=64)
    torch.testing.assert_close(got, probs.mean(dim=2).mean(dim=1), atol=1e-14, rtol=1e-12)


def test_needs_follow_the_tower():
    assert FasterVLM(geometry(1), keep=8).needs_at(0) == {"cls_attn"}
    assert FasterVLM(geometry(0), keep=8).needs_at(0) == {"attn_rows"}


def test_batched_generate_equals_each_sample_alone():
    check_batch_equals_alone("fastervlm", dict(keep=12), keep=12)


def test_keep_ratio_and_all_patches():
    check_keep_all_is_unpatched("fastervlm", dict(keep=PATCHES))
    check_batch_equals_alone("fastervlm", dict(keep_ratio=0.3), keep=round(0.3 * PATCHES),
                             model=tiny_llava(vision_layers=2, lm_layers=2))


def test_num_output_and_errors():
    m = tokenreduce.build_method("fastervlm", geometry(1, 576), visual_token_num=58)  # upstream's name
    assert m.num_output(577) == 58 and m.num_output(730) == 58
    assert FasterVLM(geometry(1, 576), keep_ratio=0.25).num_output(577) == 144
    assert FasterVLM(geometry(1, 576)).num_output(577) == 64  # the default budget
    model = tiny_llava(vision_layers=2, lm_layers=1)
    with pytest.raises(ValueError, match="keep=65 exceeds the 64 patch tokens"):
        tokenreduce.patch(model, "fastervlm", keep=65)
    with pytest.raises(ValueError, match="not both"):
        tokenreduce.patch(model, "fastervlm", keep=8, keep_ratio=0.5)
    with pytest.raises(ValueError, match="must be >= 1"):
        tokenreduce.patch(model, "fastervlm", keep=0)
    assert not tokenreduce.is_patched(model)
