"""Visualisation: label maps from source / kept, overlays, per-block recording, the visualize and plot commands."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tokenreduce
from tokenreduce import cli, viz
from tokenreduce.cli.plot import main as plot_main
from tokenreduce.cli.visualize import main as visualize_main
from tokenreduce.methods import Site, get_method

from .conftest import tiny_vit

RED, BLUE, GREEN, WHITE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 1.0)


def _four_patch_image(p=8):
    """A 2x2-patch image (patch p x p pixels): red, blue / green, white."""
    img = np.zeros((2 * p, 2 * p, 3))
    img[:p, :p], img[:p, p:], img[p:, :p], img[p:, p:] = RED, BLUE, GREEN, WHITE
    return img


def _hand_source():
    """1 prefix token + 4 patches -> 3 tokens: CLS; patches 0+1 merged; patch 2 alone; patch 3 pruned."""
    return torch.tensor([[1, 0, 0, 0, 0],
                         [0, 1, 1, 0, 0],
                         [0, 0, 0, 1, 0]], dtype=torch.float32)


def test_source_to_labels_hand_made():
    labels = viz.source_to_labels(_hand_source(), num_prefix=1, grid=(2, 2))
    assert labels.tolist() == [[1, 1], [2, -1]]
    with pytest.raises(ValueError):
        viz.source_to_labels(_hand_source(), num_prefix=1, grid=(3, 3))


def test_overlay_colours_the_expected_patches():
    p = 8
    img = _four_patch_image(p)
    labels = viz.source_to_labels(_hand_source(), 1, (2, 2))
    out = viz.render_overlay(img, labels, fill="mean", alpha=1.0, border=None, hatch=0).astype(float) / 255
    merged = (np.array(RED) + np.array(BLUE)) / 2
    # the two merged patches share their mean colour
    assert np.allclose(out[:p, :p], merged, atol=1 / 255)
    assert np.allclose(out[:p, p:], merged, atol=1 / 255)
    # a token holding one patch shows the image
    assert np.allclose(out[p:, :p], GREEN, atol=1 / 255)
    # the pruned patch is a flat grey, no longer white
    grey = out[p:, p:]
    assert np.allclose(grey, grey[0, 0]) and np.allclose(grey[..., 0], grey[..., 1])
    assert grey[0, 0, 0] < 0.95
    # palette fill: one colour per group, shared by the merged patches
    pal = viz.render_overlay(img, labels, fill="palette", alpha=1.0, border=None, singletons=True, hatch=0)
    assert (pal[:p, :p] == pal[0, 0]).all() and (pal[:p, p:] == pal[0, 0]).all()
    assert not (pal[p:, :p] == pal[0, 0]).all()


def test_overlay_borders_between_groups_only():
    p = 8
    img = _four_patch_image(p)
    labels = viz.source_to_labels(_hand_source(), 1, (2, 2))
    out = viz.render_overlay(img, labels, border=(0, 0, 0), hatch=0)
    black = (out == 0).all(axis=-1)
    # between the merged patches 0 and 1 (same token): no line
    assert not black[:p - 1, p].any()
    # between token {0, 1} (top) and patch 2 (bottom left), and between patch 2 and the dropped patch 3: lines
    assert black[p, 1:p - 1].all()
    assert black[p + 1:, p].all()


def test_kept_list_greys_out_dropped_patches():
    # 1 prefix + a 3x3 grid; two pruning steps with indices into each step's input
    kept = {3: torch.tensor([[0, 2, 4, 5, 7, 8, 9]]), 6: torch.tensor([[0, 1, 3, 4, 6]])}
    alive = viz.kept_to_alive(kept, num_tokens=10)
    assert np.flatnonzero(alive).tolist() == [0, 2, 5, 7, 9]
    assert np.flatnonzero(viz.kept_to_alive(kept, 10, upto=3)).tolist() == [0, 2, 4, 5, 7, 8, 9]
    labels = viz.alive_to_labels(alive, num_prefix=1, grid=(3, 3))
    assert (labels >= 0).ravel().tolist() == [False, True, False, False, True, False, True, False, True]
    p = 4
    img = np.full((3 * p, 3 * p, 3), 0.2)
    img[..., 0] = 0.9  # reddish: grey is recognisable as R == G == B
    out = viz.render_overlay(img, labels, border=None, hatch=0)
    for patch in range(9):
        r, c = divmod(patch, 3)
        block = out[r * p:(r + 1) * p, c * p:(c + 1) * p].astype(int)
        is_grey = (block[..., 0] == block[..., 1]).all() and (block[..., 1] == block[..., 2]).all()
        assert is_grey == (labels.ravel()[patch] < 0), patch
    with pytest.raises(ValueError):
        viz.kept_to_alive({0: torch.tensor([[0, 12]])}, num_tokens=10)


def test_same_grouping_ignores_label_values():
    a = np.array([[1, 1], [2, -1]])
    assert viz.same_grouping(a, np.array([[7, 7], [3, -1]]))
    assert not viz.same_grouping(a, np.array([[1, 2], [2, -1]]))
    assert not viz.same_grouping(a, np.array([[1, 1], [2, 3]]))


def test_record_layers_matches_info_source():
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=6, trace_source=True)
    view = viz.model_view(model)
    assert view.grid == (8, 8) and view.num_prefix == 1
    records = viz.record_layers(model, torch.randn(1, 3, 32, 32), view=view)
    info = tokenreduce.info(model)
    assert [r.layer for r in records] == [-1, 0, 1, 2, 3]
    assert [r.tokens for r in records] == [65, 59, 53, 47, 41]
    final = records[-1].labels
    assert viz.same_grouping(final, viz.source_to_labels(info.source[0], 1, (8, 8)))
    assert len(np.unique(final)) == 41 - 1  # every non-prefix token holds some patches
    assert tokenreduce.is_patched(model)


@pytest.mark.parametrize("variant", ["distilled", "registers", "avg_pool", "dynamic"])
def test_prefix_tokens_and_dynamic_size(variant):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer
    kw = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)
    model = {"distilled": lambda: VisionTransformerDistilled(**kw),
             "registers": lambda: VisionTransformer(reg_tokens=4, no_embed_class=True, **kw),
             "avg_pool": lambda: VisionTransformer(class_token=False, global_pool="avg", **kw),
             "dynamic": lambda: VisionTransformer(dynamic_img_size=True, **kw)}[variant]().eval()
    prefix = {"distilled": 2, "registers": 5, "avg_pool": 0, "dynamic": 1}[variant]
    size = 48 if variant == "dynamic" else None
    grid = (12, 12) if variant == "dynamic" else (8, 8)
    image = Image.fromarray((np.random.default_rng(0).random((50, 60, 3)) * 255).astype(np.uint8))
    records, view = viz.capture(model, image, "zero_tprune", img_size=size, keep_ratio=0.6)
    assert view.num_prefix == prefix and view.grid == grid
    last = records[-1]
    assert records[0].tokens == prefix + grid[0] * grid[1]
    assert (last.labels >= 0).sum() == last.tokens - prefix  # pruning: one patch per surviving token
    if variant != "dynamic":
        with pytest.raises(ValueError, match="dynamic_img_size"):
            viz.model_view(model, img_size=48)


def _timm_params(name):
    """A setting that reduces tokens on the tiny ViT, for the methods that need one; defaults otherwise."""
    return {
        "tome": {"r": 4}, "pitome": {"ratio": 0.9}, "atc": {"r": 4},
        "diffrate": {"prune_kept": [65, 60, 50, 40], "merge_kept": [65, 55, 45, 35]},
        "zero_tprune": {"keep_ratio": 0.7}, "topk_attn": {"keep_ratio": 0.7}, "random": {"keep_ratio": 0.7},
    }.get(name, {})


BLOCK_SITES = (Site.BLOCK_IN, Site.BLOCK_MID, Site.BLOCK_OUT)
TIMM_METHODS = [m for m in tokenreduce.list_methods()
                if any(s in BLOCK_SITES for s in (get_method(m).sites or (get_method(m).site,)))]


def test_the_timm_method_list_is_not_empty():
    assert {"tome", "pitome", "atc", "diffrate", "zero_tprune", "random"} <= set(TIMM_METHODS)


@pytest.mark.parametrize("method", TIMM_METHODS)
def test_every_timm_method_draws(method, tmp_path):
    model = tiny_vit()
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    records, view = viz.capture(model, image, method, **_timm_params(method))
    assert not tokenreduce.is_patched(model)
    assert records[0].layer == -1 and all(r.labels.shape == (8, 8) for r in records)
    assert all(r.exact for r in records)
    last = records[-1]
    groups = np.unique(last.labels[last.labels >= 0])
    assert len(groups) <= last.tokens  # each group is one output token
    if _timm_params(method):
        assert last.tokens < records[0].tokens
    fig = viz.layer_grid(image.resize((64, 64)), viz.changed_layers(records, max_panels=4))
    _png_ok(viz.save_png(fig, tmp_path / "grid.png", colors=64))


def test_changed_layers_thins_and_keeps_ends():
    recs = [viz.LayerRecord(i - 1, 20 - i, np.full((2, 2), i)) for i in range(10)]
    recs.insert(5, viz.LayerRecord(3, recs[4].tokens, recs[4].labels + 5))  # no change: relabelled only
    picked = viz.changed_layers(recs, max_panels=4)
    assert len(picked) == 4 and picked[0] is recs[0] and picked[-1] is recs[-1]
    assert len(viz.changed_layers(recs)) == 10


def _png_ok(path, min_size=16):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_size
        return im.size


@pytest.fixture
def tiny_image(tmp_path):
    path = tmp_path / "tiny.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((30, 36, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_visualize_command_writes_png(tmp_path, tiny_image, capsys):
    out = tmp_path / "out.png"
    rc = visualize_main([str(tiny_image), "--model", "fmnist_reference", "--method", "tome", "--param", "r=20",
                             "--max-panels", "4", "--out", str(out)])
    assert rc == 0
    _png_ok(out, 100)
    assert "wrote" in capsys.readouterr().out
    final = tmp_path / "final.png"
    assert visualize_main([str(tiny_image), "--model", "fmnist_reference", "--method", "zero_tprune",
                               "--param", "keep_ratio=0.5", "--final-only", "--display-size", "56", "--colors", "32",
                               "--out", str(final)]) == 0
    assert _png_ok(final) == (56, 56)
    assert visualize_main([str(tiny_image), "--model", "fmnist_reference", "--method", "tome",
                               "--param", "nope=1", "--out", str(tmp_path / "x.png")]) == 2


def test_tokenreduce_cli_has_visualize_and_plot(tmp_path, tiny_image):
    assert {"visualize", "plot"} <= set(cli.COMMANDS)
    out = tmp_path / "cli.png"
    assert cli.main(["visualize", str(tiny_image), "--model", "fmnist_reference", "--method", "tome",
                     "--param", "r=20", "--final-only", "--out", str(out)]) == 0
    _png_ok(out)
    results = _results_file(tmp_path)
    assert cli.main(["plot", str(results), "--out", str(tmp_path / "plot.png")]) == 0
    _png_ok(tmp_path / "plot.png")


def _results_file(tmp_path, name="results.json", model="reference"):
    rows = [
        {"label": "unpatched", "method": "none", "status": "ok", "top1": 80.0, "gflops": 4.6, "img_per_s": 1000.0},
        {"label": "tome r=8", "method": "tome", "status": "ok", "top1": 79.5, "gflops": 3.4, "img_per_s": 1300.0},
        {"label": "tome r=13", "method": "tome", "status": "ok", "top1": 78.9, "gflops": 2.7, "img_per_s": 1600.0},
        {"label": "zero_tprune", "method": "zero_tprune", "status": "ok", "top1": 79.0, "gflops": 3.0,
         "img_per_s": None},
        {"label": "dart", "method": "dart", "status": "skipped", "top1": None, "gflops": None, "img_per_s": None},
    ]
    path = tmp_path / name
    path.write_text(json.dumps({"model": model, "device": "CPU", "batch_size": 8, "rows": rows}))
    return path


def test_plot_command_writes_png(tmp_path, capsys):
    a = _results_file(tmp_path, "a.json", "model-a")
    b = _results_file(tmp_path, "b.json", "model-b")
    out = tmp_path / "plot.png"
    assert plot_main([str(a), str(b), "--out", str(out)]) == 0
    w, h = _png_ok(out, 200)
    assert w > h
    assert "8 points" in capsys.readouterr().out  # 4 ok rows per file, skipped rows left out
    rows = viz.read_results([a])
    assert {r["method"] for r in rows} == {"none", "tome", "zero_tprune"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"method": "tome", "status": "failed"}]}))
    assert plot_main([str(bad), "--out", str(tmp_path / "none.png")]) == 2


def test_hf_clip_tower_draws():
    import transformers  # noqa: F401  (a dev dependency)
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8)
    model = CLIPVisionModel(cfg).eval()
    image = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    records, view = viz.capture(model, image, "tome", r=3)
    assert view.grid == (4, 4)
    assert [r.tokens for r in records] == [17, 14, 11, 8]
    assert all(r.exact for r in records)
    records, _ = viz.capture(model, image, "zero_tprune", keep_ratio=0.5)
    assert (records[-1].labels < 0).sum() > 0


def test_llava_vision_tower_draws():
    import transformers  # noqa: F401  (a dev dependency)
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=32, patch_size=8)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=64)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=63,
                                                      vision_feature_layer=-2)).eval()
    image = Image.fromarray((np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8))
    records, view = viz.capture(model, image, "tome", r=2)  # inside the tower: sources traced
    assert view.kind == "llava" and view.grid == (4, 4)
    assert records[-1].tokens < 17 and all(r.exact for r in records)
    records, _ = viz.capture(model, image, "visionzip", dominant=6, contextual=2)
    # VisionZip reports kept indices only: kept patches drawn, the merged rest flagged as not traced
    assert records[-1].tokens == 8 and (records[-1].labels >= 0).sum() == 7 and not records[-1].exact
    with pytest.raises(ValueError, match="language model"):
        viz.capture(model, image, "dart")
