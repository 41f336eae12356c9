"""``Need.INSTRUCTION`` at the tower-output site: ``tokenreduce.instructions`` and how its entries map to the rows of
the tower's batch (the method that reads them, CDPruner, is tested in tests/methods/test_cdpruner.py)."""
import pytest
import torch

import tokenreduce
from tokenreduce.backbones.vlm.tower import instruction_rows
from tokenreduce.core import Need, ReductionMethod, Site, register_method
from tokenreduce.core.registry import _METHODS

from ..llava_helpers import pixels, tiny_llava


def test_instruction_rows():
    assert instruction_rows(None, 3) is None
    assert instruction_rows("what?", 3) == ["what?"] * 3
    assert instruction_rows(["a", (1, 2)], 2) == ["a", (1, 2)]
    assert instruction_rows(["a", "b"], 5, rows_per_image=[2, 3]) == ["a", "a", "b", "b", "b"]  # crops
    with pytest.raises(ValueError, match="gave 2 instructions, but the vision tower encodes 3 images"):
        instruction_rows(["a", "b"], 3)


class _Seen(ReductionMethod):
    """Records the instruction the site hands it and changes nothing."""

    name = "_seen_instruction"
    site = Site.TOWER_OUT
    needs = frozenset({Need.INSTRUCTION})
    seen = []

    def reduce(self, state):
        type(self).seen.append(state.instruction)
        return state


@pytest.fixture
def seen_method():
    register_method(_Seen)
    yield _Seen
    _METHODS.pop(_Seen.name, None)
    _Seen.seen.clear()


def test_the_site_hands_each_image_its_instruction(seen_method):
    model = tiny_llava(vision_layers=2, lm_layers=1)
    tokenreduce.patch(model, "_seen_instruction")

    def call():
        with torch.no_grad():
            model.get_image_features(pixel_values=pixels(2))
        return seen_method.seen[-1]

    assert call() is None
    with tokenreduce.instructions(model, ["first?", [4, 5, 6]]) as same:
        assert same is model and call() == ["first?", (4, 5, 6)]
        with tokenreduce.instructions(model, "all?"):
            assert call() == ["all?", "all?"]
        assert call() == ["first?", (4, 5, 6)]  # the inner block restored the outer one
    assert call() is None
    adapter = tokenreduce.api._adapter_of(model)
    adapter.rows_per_image = [2]  # what a crop-encoding adapter sets for a call: one image as two rows
    with tokenreduce.instructions(model, ["one image?"]):
        assert call() == ["one image?", "one image?"]
    del adapter.rows_per_image
    with pytest.raises(TypeError, match="wrap a single list of token ids"):
        with tokenreduce.instructions(model, [1, 2, 3]):
            pass
    with pytest.raises(TypeError, match="string or a non-empty list of token ids"):
        with tokenreduce.instructions(model, ["ok", 3.5]):
            pass
    tokenreduce.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        with tokenreduce.instructions(model, "x"):
            pass
