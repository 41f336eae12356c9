"""DART against the official implementation's recorded outputs (../shared/fixtures/dart) and against a plain
reference of its selection written the way the paper's code loops (Python sets of positions)."""
import pytest
import torch
import torch.nn.functional as F

from tokenreduce.core import Geometry
from tokenreduce.methods.dart import DART, resolve_per_pivot, select_sample, visit_order
from tokenreduce.core import TokenState

from ..conftest import fixture_cases
from ..llava_helpers import run_llava_case


@pytest.mark.parametrize("case", fixture_cases("dart", call="llava"))
def test_llava_fixture(case):
    ok, msgs = run_llava_case("dart", case)
    assert ok, msgs


def _reference(normed, l1, start, length, end, p_img, p_txt, per):
    """Upstream's selection for one prompt whose image occupies ``[start, start + length)`` and whose real tokens end
    at ``end``, with positions equal to indices."""
    img = (l1[start:start + length].topk(p_img).indices + start).tolist()
    txt = (l1[start + length:end].topk(p_txt).indices + start + length).tolist()
    chosen = set(img + txt)
    valid = set(range(start, start + length)) - set(img)
    for pivot in list(chosen):
        cand = sorted(valid)
        sim = -F.cosine_similarity(normed[pivot][None], normed[cand], dim=-1)
        picked = [cand[i] for i in sim.topk(per).indices.tolist()]
        chosen.update(picked)
        valid.difference_update(picked)
    chosen.difference_update(txt)
    return sorted(chosen)


@pytest.mark.parametrize("p_img,p_txt,per", [(4, 4, 3), (6, 2, 2), (1, 0, 5), (3, 1, 0)])
def test_select_sample_matches_reference(p_img, p_txt, per):
    g = torch.Generator().manual_seed(p_img * 100 + p_txt * 10 + per)
    s, start, length = 70, 7, 48
    normed = torch.randn(s, 8, generator=g, dtype=torch.float64)
    l1 = torch.rand(s, generator=g, dtype=torch.float64)
    got = select_sample(normed, l1, torch.arange(start, start + length), torch.arange(start + length, s),
                        torch.arange(s), p_img, p_txt, per)
    assert got.tolist() == _reference(normed, l1, start, length, s, p_img, p_txt, per)
    assert len(got) == p_img + (p_img + p_txt) * per


def test_reduce_keeps_text_and_is_per_sample_under_padding():
    """Left padding shifts indices; the kept image tokens (relative to each prompt) must not change."""
    g = torch.Generator().manual_seed(0)
    s, h, d, c = 40, 2, 4, 8
    x = torch.randn(1, s, c, generator=g, dtype=torch.float64)
    keys = torch.randn(1, h, s, d, generator=g, dtype=torch.float64)
    image = torch.zeros(1, s, dtype=torch.bool)
    image[0, 5:29] = True
    method = DART(Geometry(num_blocks=4, num_prefix=0, num_patches=None, dim=c, num_heads=h),
                  layer=1, image_pivots=2, text_pivots=2, per_pivot=3, budget=None, pivot_order="upstream")

    def run(pad):
        xp = torch.cat([torch.zeros(1, pad, c, dtype=x.dtype), x], 1)
        kp = torch.cat([torch.zeros(1, h, pad, d, dtype=x.dtype), keys], 2)
        valid = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, s, dtype=torch.bool)], 1)
        img = torch.cat([torch.zeros(1, pad, dtype=torch.bool), image], 1)
        state = TokenState(x=xp, size=torch.ones(1, s + pad, dtype=x.dtype), keys_per_head=kp, image_mask=img,
                           valid=valid, positions=(valid.long().cumsum(1) - 1).clamp(min=0), normed=xp)
        return method.reduce(state).kept - pad

    alone, padded = run(0), run(5)
    assert torch.equal(padded[:, 5:], alone)  # the 5 pads are kept (as non-image tokens) and come first
    assert alone.shape[1] == s - 24 + method.num_kept_image_tokens
    assert set(range(5)) | set(range(29, 40)) <= set(alone[0].tolist())


def test_visit_order_and_budget():
    assert visit_order([171, 382, 250, 102], [615, 612, 614, 621], "upstream") == \
        [612, 102, 615, 614, 171, 621, 250, 382]  # CPython set order, recorded upstream as pivot_order
    assert visit_order([3, 1], [9, 7], "score") == [3, 1, 9, 7]
    assert visit_order([3, 1], [9, 7], "position") == [1, 3, 7, 9]
    assert resolve_per_pivot(None, None, 4, 4) == 16  # the '128' setting keeps 4 + 8 * 16 = 132
    assert resolve_per_pivot(None, 192, 4, 4) == 24
    assert resolve_per_pivot(5, None, 4, 4) == 5
    with pytest.raises(ValueError, match="not both"):
        resolve_per_pivot(5, 128, 4, 4)
