"""FastV against the official HF-LLaVA implementation's recorded outputs (../shared/fixtures/fastv), against a plain
per-prompt reference (unpatched decoder layers called one by one, the ranking row written out per head), batched with
left / right padding and a two-image prompt, and its parameters."""
import pytest
import torch

import tokenreduce
from tokenreduce.core import Geometry
from tokenreduce.methods.fastv import FastV, image_keep_count, select_image_tokens

from ..conftest import fixture_cases
from ..llava_helpers import IMAGE_TOKEN, greedy, pixels, prompts, run_llava_case, tiny_llava
from ._llm_reference import (attention_row, best, check_against_reference, image_runs, language_model,
                             reference_logits)


@pytest.mark.parametrize("case", fixture_cases("fastv", call="llava"))
def test_llava_fixture(case):
    ok, msgs = run_llava_case("fastv", case)
    assert ok, msgs


def fastv_reference(layer, count):
    """FastV on one prompt: layer K-1's head-mean attention row of the last token ranks each image's tokens; the kept
    tokens keep their positions from layer K on."""
    def run(model, ids, px):
        image = (ids == IMAGE_TOKEN).tolist()
        lm, saved = language_model(model), {}

        def before(i, hidden, positions):
            if i == layer - 1:
                saved["row"] = attention_row(lm, i, hidden, positions, hidden.shape[0] - 1).mean(dim=0).tolist()
            if i == layer:
                keep = [j for j, v in enumerate(image) if not v]
                for s, e in image_runs(image):
                    keep += best(saved["row"], range(s, e), count(e - s))
                keep = sorted(keep)
                return hidden[keep], positions[keep]
            return None
        return reference_logits(model, ids, px, before=before)
    return run


@pytest.mark.parametrize("text_model", ["llama", "qwen2", pytest.param("qwen3", marks=pytest.mark.slow)])
def test_batched_equals_reference_and_alone(text_model):
    """Per-sample ranking (upstream uses batch row 0): left and right padding, different prompt lengths, a prompt with
    two images (16 kept per image); prefill logits equal the reference, generate equals each prompt alone."""
    info = check_against_reference("fastv", dict(layer=1, keep=16), fastv_reference(1, lambda n: min(16, n)),
                                   text_model=text_model, expected_lengths=[9 + 16, 9 + 32, 9 + 16])
    assert info.tokens_per_layer[0] > info.tokens_per_layer[1] == 41


def test_upstream_names_and_ratios():
    model = tiny_llava(lm_layers=3)
    rows = prompts(lengths=((3, 5),))
    ids, px = rows[0][None], pixels(1)
    kept = {}
    for params in (dict(layer=2, keep=16), dict(fastv_k=2, fastv_r=1 - 16 / 64), dict(fastv_k=2, keep_ratio=0.25),
                   dict(layer=2, fast_v_attention_rank=16)):
        tokenreduce.patch(model, "fastv", **params)
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px)
        kept[str(params)] = tokenreduce.info(model).kept[2]
        assert out.logits.shape[1] == 8 + 16
        tokenreduce.unpatch(model)
    first = next(iter(kept.values()))
    assert all(torch.equal(k, first) for k in kept.values())


def test_keep_count_expressions():
    assert image_keep_count(576, None, None, 1 - 64 / 576) == 64      # upstream round(576 * (1 - fastv_r))
    assert image_keep_count(576, None, None, 0.75) == 144
    assert image_keep_count(576, None, 0.5, None) == 288
    assert image_keep_count(9, None, 0.5, None) == 4                  # Python round: half to even
    assert image_keep_count(10, 16, None, None) == 10                 # an image smaller than keep keeps all


def test_select_image_tokens_per_image_and_ties():
    image = torch.tensor([0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    scores = torch.tensor([9.0, 0.1, 0.5, 0.5, 0.2, 9.0, 0.3, 0.1, 0.3, 9.0, 9.0], dtype=torch.float64)
    keep = select_image_tokens(scores, image, valid, lambda n: 2)
    # image 1 keeps 2 and 3 (a tie at 0.5, both kept); image 2 ties at 0.3: the earlier (6) and 8; padding dropped
    assert keep.nonzero()[:, 0].tolist() == [0, 2, 3, 5, 6, 8, 9]
    keep = select_image_tokens(scores, image, valid, lambda n: 1)
    assert keep.nonzero()[:, 0].tolist() == [0, 2, 5, 6, 9]


def test_nothing_pruned_equals_unpatched():
    model = tiny_llava(lm_layers=3)
    ref = tiny_llava(lm_layers=3)
    rows = prompts(lengths=((3, 5),))
    ids, mask, px = rows[0][None], torch.ones(1, len(rows[0]), dtype=torch.long), pixels(1)
    tokenreduce.patch(model, "fastv", layer=1, keep_ratio=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=px).logits,
                                   ref(input_ids=ids, pixel_values=px).logits, atol=1e-12, rtol=1e-12)
    a, b = greedy(model, ids, mask, px), greedy(ref, ids, mask, px)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-10, rtol=1e-10)


def test_parameter_errors():
    model = tiny_llava(lm_layers=3)
    with pytest.raises(ValueError, match="not keep and drop_ratio"):
        tokenreduce.patch(model, "fastv", keep=16, fastv_r=0.5)
    with pytest.raises(ValueError, match="must be >= 1"):
        tokenreduce.patch(model, "fastv", layer=0, keep=16)
    with pytest.raises(ValueError, match="below the language model's 3 layers"):
        tokenreduce.patch(model, "fastv", layer=3, keep=16)
    with pytest.raises(ValueError, match="keep_ratio"):
        tokenreduce.patch(model, "fastv", keep_ratio=1.5)
    assert not tokenreduce.is_patched(model)


def test_default_is_the_papers_half():
    method = FastV(Geometry(num_blocks=32, num_prefix=0, num_patches=None, dim=8, num_heads=2),
                   layer=2, keep=None, keep_ratio=None, drop_ratio=None)
    assert method.count(576) == 288 and method.acts_at(2) and not method.acts_at(1)


def test_static_cache_refused():
    model = tiny_llava(lm_layers=3)
    rows = prompts(lengths=((3, 5),))
    ids = rows[0][None]
    tokenreduce.patch(model, "fastv", layer=1, keep=16)
    with pytest.raises(ValueError, match="static"):
        greedy(model, ids, torch.ones_like(ids), pixels(1), cache_implementation="static")


def test_added_padding_carries_no_label():
    """Samples keeping different numbers of tokens are re-padded; those slots are no prompt token, so the loss path
    (labels gathered by the final kept indices) must give them -100, whatever token 0's label is."""
    from tokenreduce.api import _adapter_of
    from ._llm_reference import mixed_prompts, pad
    rows, _, px = mixed_prompts()
    model = tiny_llava(lm_layers=3)
    tokenreduce.patch(model, "fastv", layer=1, keep=16)
    ids, mask = pad(rows, "right")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=ids)
    adapter = _adapter_of(model)
    kept = adapter.decoder.final_kept(adapter.record.decoder)
    valid = tokenreduce.info(model).valid
    assert bool((kept[~valid] == -1).all()) and bool((kept[valid] >= 0).all()) and int((~valid).sum()) == 32
    assert torch.isfinite(out.loss)
