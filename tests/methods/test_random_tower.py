"""The random baseline at a VLM's tower output (``patch(llava, "random", keep=N)``): N visual tokens per image,
uniformly random, in spatial order, the same for an image alone or in a batch; the ViT behaviour is tested in
test_baselines.py."""
import pytest
import torch

import tokenreduce
from tokenreduce.core import Geometry, Site

from ..llava_helpers import pixels, tiny_llava
from ._tower_checks import PATCHES, check_batch_equals_alone, check_keep_all_is_unpatched


def _kept(model, px):
    with torch.no_grad():
        model.get_image_features(pixel_values=px)
    return tokenreduce.info(model).kept[0]


def test_binds_the_tower_output_on_a_vlm_and_keeps_random_patches():
    model = tiny_llava(vision_layers=2, lm_layers=1)
    tokenreduce.patch(model, "random", keep=10, seed=3)
    assert tokenreduce.method_of(model).site == Site.TOWER_OUT
    kept = _kept(model, pixels(2))
    want = torch.rand(PATCHES, generator=torch.Generator().manual_seed(3)).topk(10).indices.sort().values + 1
    assert kept.tolist() == [want.tolist()] * 2  # one seeded draw per image, CLS (index 0) dropped
    assert torch.equal(_kept(model, pixels(2, seed=5)), kept)  # seeded per forward: the same every forward
    tokenreduce.patch(model, "random", keep=10, seed=4)
    assert not torch.equal(_kept(model, pixels(2)), kept)
    tokenreduce.patch(model, "random", keep=10, seed=None)
    torch.manual_seed(0)
    fresh = _kept(model, pixels(2))
    assert fresh.shape == (2, 10) and not torch.equal(fresh[0], fresh[1])


def test_batched_generate_equals_each_sample_alone():
    check_batch_equals_alone("random", dict(keep=9), keep=9)


def test_keep_all_is_unpatched():
    check_keep_all_is_unpatched("random", dict(keep=PATCHES))


def test_vit_site_is_unchanged():
    from tokenreduce.methods.baselines import RandomPrune
    m = RandomPrune(Geometry(num_blocks=12, num_prefix=1, num_patches=196, dim=8, num_heads=2, site=Site.BLOCK_OUT),
                    keep=50, layers=[3])
    assert m.site == Site.BLOCK_OUT and m.steps == {3: 50} and m.num_output(197) is None


def test_tower_parameters_and_errors():
    m = tokenreduce.build_method("random", Geometry(num_blocks=23, num_prefix=1, num_patches=576, dim=8, num_heads=2,
                                                    site=Site.TOWER_OUT), keep_ratio=0.25)
    assert m.num_output(577) == 144
    model = tiny_llava(vision_layers=2, lm_layers=1)
    with pytest.raises(ValueError, match="layers does not apply there"):
        tokenreduce.patch(model, "random", keep=8, layers=[0])
    with pytest.raises(ValueError, match="an int"):
        tokenreduce.patch(model, "random", keep=0.5)
    with pytest.raises(ValueError, match="exceeds the 64 patch tokens"):
        tokenreduce.patch(model, "random", keep=65)
    assert not tokenreduce.is_patched(model)
