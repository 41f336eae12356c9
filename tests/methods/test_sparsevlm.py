"""SparseVLM v1.0 against the official implementation's recorded outputs (../shared/fixtures/sparsevlm), against a
plain per-prompt reference (raters and rater attention written out, unpatched decoder layers called one by one,
DPC-KNN recycling by the loop reference of tests/methods/_cluster_reference.py), batched with left / right padding
and a two-image prompt, and its parameters."""
import math

import pytest
import torch

import tokenreduce
from tokenreduce.methods.sparsevlm import STAGE_TABLE, recycle, select_raters, stage_sample

from ..conftest import fixture_cases
from ..llava_helpers import IMAGE_TOKEN, pixels, prompts, run_llava_case, tiny_llava
from ._cluster_reference import cluster_means_one, dpc_knn_one
from ._llm_reference import (attention_row, best, check_against_reference, image_runs, input_embeddings,
                             language_model, reference_logits)


@pytest.mark.parametrize("case", fixture_cases("sparsevlm", call="llava"))
def test_llava_fixture(case):
    ok, msgs = run_llava_case("sparsevlm", case)
    assert ok, msgs


def reference_raters(embeds, image):
    """Candidates: the text after the first image; relevance = mean over visual tokens of the softmax over them."""
    first = image.index(True)
    cand = [j for j in range(first + 1, len(image)) if not image[j]]
    vis = [j for j, v in enumerate(image) if v]
    relevance = [0.0] * len(cand)
    for v in vis:
        logits = [float((embeds[v] * embeds[t]).sum()) for t in cand]
        top = max(logits)
        e = [math.exp(x - top) for x in logits]
        for i, x in enumerate(e):
            relevance[i] += x / sum(e) / len(vis)
    mean = sum(relevance) / len(relevance)
    return [cand[i] for i in range(len(cand)) if relevance[i] > mean] or cand


def sparsevlm_reference(layers, counts, recycle_tokens=True):
    def run(model, ids, px):
        lm = language_model(model)
        image = (ids == IMAGE_TOKEN).tolist()
        images = len(image_runs(image))
        state = {"image": image, "raters": reference_raters(input_embeddings(model, ids, px), image)}

        def before(i, hidden, positions):
            if i in layers:  # the pruning layer's own attention, on its input, rows = raters
                rows = [attention_row(lm, i, hidden, positions, r).mean(dim=0) for r in state["raters"]]
                state["score"] = (sum(rows) / len(rows)).tolist()
            return None

        def after(i, hidden, positions):
            if i not in layers:
                return None
            image, score = state["image"], state["score"]
            vis = [j for j, v in enumerate(image) if v]
            kept = best(score, vis, min(counts[layers.index(i)] * images, len(vis) - 1))
            pruned = [j for j in vis if j not in kept]
            merged = hidden.new_zeros(0, hidden.shape[1])
            if recycle_tokens and pruned:
                chosen = best(score, pruned, int(len(pruned) * 0.3) + 1)
                c = int(len(chosen) / 10) + 1
                points = hidden[chosen]
                _, assign = dpc_knn_one(points, c, c)
                merged = cluster_means_one(points, assign, c)
            keep = sorted([j for j, v in enumerate(image) if not v] + kept)
            head = [j for j in keep if j <= vis[-1]]
            tail = [j for j in keep if j > vis[-1]]
            order = head + [None] * merged.shape[0] + tail
            state["image"] = [True if j is None else image[j] for j in order]
            state["raters"] = [n for n, j in enumerate(order) if j in set(state["raters"])]
            new = torch.cat([hidden[head], merged, hidden[tail]])
            return new, torch.arange(new.shape[0])
        return reference_logits(model, ids, px, before=before, after=after)
    return run


@pytest.mark.parametrize("text_model", ["llama", "qwen2", pytest.param("qwen3", marks=pytest.mark.slow)])
def test_batched_equals_reference_and_alone(text_model):
    """Per-sample raters, scores and recycling under left / right padding (upstream uses batch row 0), a two-image
    prompt (the table counts are per image), and a stage after the last layer (layer 3 of 4: only the prefill
    logits see it)."""
    layers, counts = [0, 1, 3], [30, 12, 5]
    info = check_against_reference("sparsevlm", dict(layers=layers, counts=counts),
                                   sparsevlm_reference(layers, counts), text_model=text_model, lm_layers=4)
    assert info.tokens_per_layer[0] > info.tokens_per_layer[1] > info.tokens_per_layer[2]
    assert set(info.kept) == {1, 2, 4}


def test_without_recycling_equals_reference():
    layers, counts = [1, 2], [20, 6]
    check_against_reference("sparsevlm", dict(layers=layers, counts=counts, recycle=False),
                            sparsevlm_reference(layers, counts, recycle_tokens=False), lm_layers=3,
                            expected_lengths=[9 + 6, 9 + 12, 9 + 6])


def test_select_raters_edge_cases():
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(8, 4, generator=g, dtype=torch.float64)
    image = torch.tensor([0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    raters = select_raters(embeds, image, valid)
    assert raters.nonzero()[:, 0].tolist() == reference_raters(embeds[:7], image.tolist()[:7])  # padding excluded
    one = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    assert select_raters(embeds, image, one).nonzero()[:, 0].tolist() == [4]  # a single candidate rates
    with pytest.raises(ValueError, match="no real token after its image"):
        select_raters(embeds, image, torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool))


def test_stage_layout_and_recycling():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    image = torch.zeros(30, dtype=torch.bool)
    image[3:27] = True
    valid = torch.ones(30, dtype=torch.bool)
    score = torch.rand(30, generator=g, dtype=torch.float64)
    row, made = stage_sample(x, image, valid, score, 5, True)
    kept = sorted((score[3:27].argsort(descending=True)[:5] + 3).tolist())
    assert row.tolist() == [0, 1, 2] + kept + [-1] * made.shape[0] + [27, 28, 29]
    pruned = [j for j in range(3, 27) if j not in kept]
    chosen = sorted(pruned, key=lambda j: -float(score[j]))[:int(19 * 0.3) + 1]   # 6 recycled -> 1 cluster
    assert made.shape[0] == 1
    torch.testing.assert_close(made[0], x[chosen].sum(0) / (6 + 1e-6))
    row, made = stage_sample(x, image, valid, score, 99, False)            # at most v - 1 are kept
    assert made.shape[0] == 0 and len(row) == 6 + 23
    points = torch.randn(25, 6, generator=g, dtype=torch.float64)
    _, assign = dpc_knn_one(points, 3, 3)
    torch.testing.assert_close(recycle(points), cluster_means_one(points, assign, 3))


def test_parameters():
    model = tiny_llava(lm_layers=4)
    with pytest.raises(ValueError, match="<= 3 in this 4-layer"):
        tokenreduce.patch(model, "sparsevlm", keep=64)
    with pytest.raises(ValueError, match="3 stages"):
        tokenreduce.patch(model, "sparsevlm", layers=[1, 2])
    with pytest.raises(ValueError, match="one entry per layer"):
        tokenreduce.patch(model, "sparsevlm", layers=[1, 2], counts=[4])
    with pytest.raises(ValueError, match="must be one of"):
        tokenreduce.patch(model, "sparsevlm", keep=100, layers=[0, 1, 2])
    assert not tokenreduce.is_patched(model)
    assert STAGE_TABLE[64] == (66, 30, 17)
    tokenreduce.patch(model, "sparsevlm", retain_token=64, pruning_loc=[0, 1, 2])
    rows = prompts(lengths=((3, 5),))
    with torch.no_grad():
        out = model(input_ids=rows[0][None], pixel_values=pixels(1), use_cache=True)
    # 64 visual: keep min(66, 63) = 63 + 1 merged = 64; 30 + 2 (11 recycled) = 32; 17 + 1 (5 recycled) = 18
    assert [l.keys.shape[-2] for l in out.past_key_values.layers] == [72, 72, 8 + 32, 8 + 18]
    assert out.logits.shape[1] == 8 + 18
