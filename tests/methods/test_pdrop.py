"""PyramidDrop against the official implementation's recorded outputs (../shared/fixtures/pdrop), against a plain
per-prompt reference (unpatched decoder layers called one by one, layer L's ranking row written out per head,
positions renumbered), batched with left / right padding and a two-image prompt, and its schedule parameters."""
import pytest
import torch

import tokenreduce
from tokenreduce.core import Geometry
from tokenreduce.methods.pdrop import PyramidDrop, default_layers, resolve_schedule, select_stage, stage_keep

from ..conftest import fixture_cases
from ..llava_helpers import IMAGE_TOKEN, greedy, pixels, prompts, run_llava_case, tiny_llava
from ._llm_reference import attention_row, best, check_against_reference, language_model, reference_logits


@pytest.mark.parametrize("case", fixture_cases("pdrop", call="llava"))
def test_llava_fixture(case):
    ok, msgs = run_llava_case("pdrop", case)
    assert ok, msgs


def pdrop_reference(layers, ratios):
    """PyramidDrop on one prompt: before each boundary L, layer L's own q/k on the current tokens (positions
    0..S_k-1) rank the image tokens by the last token's head-mean row; int(n0 * ratio) survive; renumber."""
    def run(model, ids, px):
        lm = language_model(model)
        state = {"image": (ids == IMAGE_TOKEN).tolist()}
        n0 = sum(state["image"])

        def before(i, hidden, positions):
            if i not in layers:
                return None
            image = state["image"]
            row = attention_row(lm, i, hidden, positions, hidden.shape[0] - 1).mean(dim=0).tolist()
            chosen = best(row, [j for j, v in enumerate(image) if v], int(n0 * ratios[layers.index(i)]))
            keep = sorted([j for j, v in enumerate(image) if not v] + chosen)
            state["image"] = [image[j] for j in keep]
            return hidden[keep], torch.arange(len(keep))
        return reference_logits(model, ids, px, before=before)
    return run


@pytest.mark.parametrize("text_model", ["llama", "qwen2", pytest.param("qwen3", marks=pytest.mark.slow)])
def test_batched_equals_reference_and_alone(text_model):
    """Per-sample ranking and counts under left / right padding (upstream crashes with a padding mask and in
    batched generate); the two-image prompt keeps int(128 * ratio)."""
    layers, ratios = [1, 2, 3], [0.5, 0.3, 0.125]
    info = check_against_reference("pdrop", dict(layers=layers, keep_ratio=ratios), pdrop_reference(layers, ratios),
                                   text_model=text_model, lm_layers=4, expected_lengths=[9 + 8, 9 + 16, 9 + 8])
    # tokens entering each layer: the longest sample (9 text + 128 image -> 64 -> 38 -> 16)
    assert info.tokens_per_layer[1:] == [9 + 64, 9 + 38, 9 + 16]


def test_schedule_resolution():
    assert default_layers(32) == [8, 16, 24] and default_layers(8) == [2, 4, 6]
    assert resolve_schedule(None, [0.5, 0.25, 0.125], 32) == ([8, 16, 24], [0.5, 0.25, 0.125])
    assert resolve_schedule([8, 16, 24], 0.5, 32)[1] == [0.5, 0.25, 0.125]            # lambda**k
    assert resolve_schedule([8, 16, 24], [1.0, 0.5, 0.25, 0.125], 32)[1] == [0.5, 0.25, 0.125]  # scripts' 1.0
    assert stage_keep(576, 0.3) == 172 and stage_keep(576, 0.6) == 345      # int() of the float product
    with pytest.raises(ValueError, match="must not increase"):
        resolve_schedule([2, 4], [0.25, 0.5], 8)
    with pytest.raises(ValueError, match=r"in 1\.\.7"):
        resolve_schedule([2, 8], [0.5, 0.25], 8)
    with pytest.raises(ValueError, match="one ratio per boundary"):
        resolve_schedule([2, 4, 6], [0.5, 0.25], 8)


def test_select_stage_ties_and_padding():
    image = torch.tensor([0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    scores = torch.tensor([0.0, 0.2, 0.4, 0.4, 0.1, 0.0, 0.0], dtype=torch.float64)
    assert select_stage(scores, image, valid, 1).nonzero()[:, 0].tolist() == [0, 2, 5]
    assert select_stage(scores, image, valid, 3).nonzero()[:, 0].tolist() == [0, 1, 2, 3, 5]


def test_nothing_dropped_equals_unpatched():
    """Ratios of 1.0 keep every token: renumbering then gives the original positions, and every layer's decode
    position (its own cache length) is the prompt length, as unpatched."""
    model, ref = tiny_llava(lm_layers=4), tiny_llava(lm_layers=4)
    rows = prompts(lengths=((3, 5),))
    ids, mask, px = rows[0][None], torch.ones(1, len(rows[0]), dtype=torch.long), pixels(1)
    tokenreduce.patch(model, "pdrop", layers=[1, 3], keep_ratio=[1.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=px).logits,
                                   ref(input_ids=ids, pixel_values=px).logits, atol=1e-12, rtol=1e-12)
    a, b = greedy(model, ids, mask, px), greedy(ref, ids, mask, px)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-10, rtol=1e-10)


def test_parameter_errors_and_names():
    model = tiny_llava(lm_layers=4)
    with pytest.raises(ValueError, match="strictly increasing"):
        tokenreduce.patch(model, "pdrop", layers=[3, 1], keep_ratio=[0.5, 0.25])
    with pytest.raises(ValueError, match="numbers in"):
        tokenreduce.patch(model, "pdrop", layers=[1], keep_ratio=[1.5])
    with pytest.raises(ValueError, match=r"in 1\.\.3"):
        tokenreduce.patch(model, "pdrop", layers=[4], keep_ratio=[0.5])
    assert not tokenreduce.is_patched(model)
    method = PyramidDrop(Geometry(num_blocks=4, num_prefix=0, num_patches=None, dim=8, num_heads=2),
                         layers=None, keep_ratio=[0.5, 0.25, 0.125])
    assert method.layers == [1, 2, 3] and [method.acts_at(j) for j in range(5)] == [False, True, True, True, False]
    tokenreduce.patch(model, "pdrop", layer_list=[2], image_token_ratio_list=[1.0, 0.25])
    rows = prompts(lengths=((3, 5),))
    with torch.no_grad():
        out = model(input_ids=rows[0][None], pixel_values=pixels(1), use_cache=True)
    assert [l.keys.shape[-2] for l in out.past_key_values.layers] == [72, 72, 24, 24]
