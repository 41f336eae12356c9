"""DiffRate against the official implementation's recorded outputs (../shared/fixtures/diffrate): inference with
released rates, one rate-search step (loss, FLOPs, kept counts, logits, every block's rate-logit gradient), the
released rate tables, and parameter errors."""
import pytest
import torch

import tokenreduce
from tokenreduce.methods.diffrate import CONFIG_DIR, list_rate_configs, load_rates
from tokenreduce.train.rate_search import RateSearch, export_rates, flop_cost, rate_flops

from ..conftest import build_fixture_model, fixture_cases, load_case, run_forward_fixture, tiny_vit


@pytest.mark.parametrize("case", fixture_cases("diffrate"))
def test_forward_fixture(case):
    results = run_forward_fixture("diffrate", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


def _train_step(case):
    """One rate-search step exactly as the case's notes describe; returns (case, expected, actual)."""
    spec, t = load_case("diffrate", case)
    model = build_fixture_model(spec["model"])
    model.requires_grad_(False)
    tokenreduce.patch(model, "diffrate", **spec["params"])
    search = RateSearch(model, flops_weight=float(t["flops_weight"]))
    depth = len(model.blocks)
    for kind in ("prune", "merge"):
        for layer in range(depth):
            search.set_logits(kind, layer, t[f"theta.{kind}.{layer}"])
    model.train()
    logits = model(t["input"])
    loss, _ = search.loss(logits, t["target"], float(t["target_gflops"]))
    loss.backward()
    kept = search.last_kept()
    actual = {"logits": logits.detach(), "flops": search.flops().detach(), "loss": loss.detach(),
              "kept.prune": torch.tensor(kept["prune"]), "kept.merge": torch.tensor(kept["merge"])}
    for kind in ("prune", "merge"):
        for layer in range(depth):
            actual[f"grad.{kind}.{layer}"] = search.logits(kind, layer).grad
    assert search.last_search().live == [int(v) for v in t["live_tokens"].tolist()]
    return spec, t, actual, model


@pytest.mark.parametrize("case", fixture_cases("diffrate", call="diffrate_train_step"))
def test_train_step_fixture(case):
    spec, expected, actual, model = _train_step(case)
    failed = {}
    for name, tol in spec["compare"].items():
        a, e = actual[name], expected[name]
        assert a is not None, f"{name}: no gradient"
        a, e = a.double(), e.double()
        assert a.shape == e.shape, (name, a.shape, e.shape)
        err = (a - e).abs()
        if not bool((err <= tol["atol"] + tol["rtol"] * e.abs()).all()):
            failed[name] = float(err.max())
    assert not failed, failed
    # the backbone is frozen and untouched: no gradient anywhere else
    assert all(p.grad is None for p in model.parameters())


def test_rate_logits_outside_state_dict():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenreduce.patch(model, "diffrate")
    search = RateSearch(model)
    assert set(model.state_dict()) == set(before)
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in search.parameters())
    # block 0 is never compressed: one candidate; other blocks: every patch count
    assert search.logits("prune", 0).shape == (1,)
    assert search.logits("merge", 1).shape == (model.patch_embed.num_patches,)
    tokenreduce.unpatch(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_granularity_sets_candidates():
    model = tiny_vit()  # 64 patches
    tokenreduce.patch(model, "diffrate", granularity=[4, 8])
    search = RateSearch(model)
    assert search.logits("prune", 2).shape == (16,) and search.logits("merge", 2).shape == (8,)
    # zero logits: expected count = mean of the candidates, ceil, + CLS
    assert search.kept_counts()["prune"] == [65] + [35] * 3
    assert search.kept_counts()["merge"] == [65] + [37] * 3


def test_search_mode_eval_uses_chosen_counts():
    """In eval mode a rate-search model runs inference with the counts its logits choose now."""
    x = torch.randn(2, 3, 32, 32)
    model = tiny_vit()
    tokenreduce.patch(model, "diffrate")
    search = RateSearch(model)
    with torch.no_grad():
        search.logits("merge", 2)[:40] = 5.0  # favour large counts in block 2
        counts = search.kept_counts()
        out = model(x)
    tokens = tokenreduce.info(model).tokens_per_layer
    fixed = tiny_vit()
    tokenreduce.patch(fixed, "diffrate", prune_kept=counts["prune"], merge_kept=counts["merge"])
    with torch.no_grad():
        torch.testing.assert_close(out, fixed(x), rtol=0, atol=0)
    assert tokens == tokenreduce.info(fixed).tokens_per_layer
    assert tokens[1] == 65 and tokens[2] == min(counts["prune"][1], counts["merge"][1])


def test_inference_flops_match_info():
    """DiffRate's counter (patch embedding on N incl. CLS) and info().flops differ only by CLS's embedding."""
    spec, _ = load_case("diffrate", "deit_vits_2.9")
    model = build_fixture_model(spec["model"])
    tokenreduce.patch(model, "diffrate", rates="deit_small@2.9")
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224, dtype=torch.float64))
    cost = flop_cost(model)
    ours = rate_flops(spec["params"]["prune_kept"], spec["params"]["merge_kept"], cost)
    assert ours - float(tokenreduce.info(model).flops) == model.embed_dim * 16 * 16 * 3


def test_fixed_rates_train_mode_removes_tokens():
    """With fixed counts, model.train() takes the inference path (tokens removed), e.g. for fine-tuning."""
    model = tiny_vit()
    model.train()
    tokenreduce.patch(model, "diffrate", prune_kept=[65, 50, 40, 30], merge_kept=[65, 45, 35, 20])
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert tokenreduce.info(model).tokens_per_layer == [65, 65, 45, 35]
    assert model.head.weight.grad is not None


def test_only_one_kind():
    x = torch.randn(1, 3, 32, 32)
    model = tiny_vit()
    tokenreduce.patch(model, "diffrate", prune_kept=[65, 40, 30, 20])
    with torch.no_grad():
        model(x)
    assert tokenreduce.info(model).tokens_per_layer == [65, 65, 40, 30]
    assert torch.equal(tokenreduce.info(model).size, torch.ones(1, 20, dtype=torch.float32))  # no merge


# ---------------------------------------------------------------------------------------------------------------
# Rate tables
def test_named_config_is_the_released_table():
    spec, _ = load_case("diffrate", "deit_vits_2.9")
    table = load_rates("deit_small@2.9")
    assert table.prune_kept == spec["params"]["prune_kept"]
    assert table.merge_kept == spec["params"]["merge_kept"]
    assert table.model == "deit_small_patch16_224" and table.target_gflops == 2.9
    # also by timm model name and upstream name
    assert load_rates("deit_small_patch16_224@2.9").prune_kept == table.prune_kept
    assert load_rates("ViT-S-DeiT@2.90").merge_kept == table.merge_kept


def test_every_released_table():
    configs = list_rate_configs()
    assert configs == {
        "deit_tiny": ["0.6", "0.7", "0.8", "0.9", "1.0"],
        "deit_small": ["2.3", "2.5", "2.7", "2.9", "3.1"],
        "deit_base": ["8.7", "10.0", "10.4", "11.5", "12.5"],
        "mae_base": ["8.7", "10.0", "10.4", "11.5"],
        "mae_large": ["31.0", "34.7", "38.5", "42.3", "46.1"],
        "mae_huge": ["83.7", "93.2", "103.4", "124.5"],
    }
    depth = {"deit_tiny": 12, "deit_small": 12, "deit_base": 12, "mae_base": 12, "mae_large": 24, "mae_huge": 32}
    for name, targets in configs.items():
        for target in targets:
            table = load_rates(f"{name}@{target}")
            assert len(table.prune_kept) == len(table.merge_kept) == depth[name]
            assert table.prune_kept[0] == table.merge_kept[0] == (257 if name == "mae_huge" else 197)
            assert table.target_gflops == float(target) and table.model


def test_rates_on_fixture_model_equal_lists():
    spec, t = load_case("diffrate", "deit_vits_2.3")
    model = build_fixture_model(spec["model"])
    tokenreduce.patch(model, "diffrate", rates="deit_small@2.3")
    with torch.no_grad():
        torch.testing.assert_close(model(t["input"]), t["logits"], atol=1e-9, rtol=1e-9)


def test_export_round_trip(tmp_path):
    model = tiny_vit()
    tokenreduce.patch(model, "diffrate", granularity=2)
    search = RateSearch(model)
    with torch.no_grad():
        for layer in range(1, 4):
            search.logits("prune", layer).normal_()
            search.logits("merge", layer).normal_()
    counts = search.kept_counts()
    doc = search.export(tmp_path / "rates.yaml", model="tiny", target_gflops=0.01)
    assert doc["prune_kept"] == counts["prune"] and doc["model"] == "tiny"
    table = load_rates(tmp_path / "rates.yaml")
    assert table.prune_kept == counts["prune"] and table.merge_kept == counts["merge"]
    assert table.target_gflops == 0.01
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        searched = model(x)
        tokenreduce.patch(model, "diffrate", rates=str(tmp_path / "rates.yaml"))
        torch.testing.assert_close(model(x), searched, rtol=0, atol=0)


def test_multi_table_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((CONFIG_DIR / "deit_small.yaml").read_text())
    assert load_rates(f"{path}@3.1").merge_kept == load_rates("deit_small@3.1").merge_kept


# ---------------------------------------------------------------------------------------------------------------
# Errors
@pytest.mark.parametrize("params, error, match", [
    (dict(prune_kept=[65, 40]), ValueError, "2 entries but the model has 4 blocks"),
    (dict(prune_kept=[65, 40, 1, 20]), ValueError, "more than the 1 prefix"),
    (dict(prune_kept=[65, 40, 0, 20]), ValueError, "ints >= 1"),
    (dict(merge_kept=[65, 40.5, 30, 20]), ValueError, "list of per-block kept token counts"),
    (dict(prune_kept=65), ValueError, "list of per-block kept token counts"),
    (dict(rates="deit_small@2.9", prune_kept=[65, 40, 30, 20]), ValueError, "either rates= or"),
    (dict(rates="deit_smol@2.9"), ValueError, "named configs: deit_base"),
    (dict(rates="deit_small@2.8"), ValueError, r"no table for 2.8 GFLOPs; it has 2.3, 2.5"),
    (dict(rates="deit_small"), ValueError, "pick one with '@<GFLOPs>'"),
    (dict(rates=3), ValueError, "YAML path or a named config"),
    (dict(granularity=0), ValueError, "int >= 1"),
    (dict(kept=[1]), TypeError, "unknown parameter"),
])
def test_bad_params(params, error, match):
    model = tiny_vit()
    with pytest.raises(error, match=match):
        tokenreduce.patch(model, "diffrate", **params)
    assert not tokenreduce.is_patched(model)


def test_released_table_on_wrong_depth():
    with pytest.raises(ValueError, match="12 entries but the model has 4 blocks"):
        tokenreduce.patch(tiny_vit(), "diffrate", rates="deit_small@2.9")


def test_needs_class_token():
    with pytest.raises(ValueError, match="no class token"):
        tokenreduce.patch(tiny_vit(class_token=False, global_pool="avg"), "diffrate", prune_kept=[64, 40, 30, 20])


def test_search_handle_errors(tmp_path):
    model = tiny_vit()
    tokenreduce.patch(model, "diffrate", prune_kept=[65, 40, 30, 20])
    with pytest.raises(ValueError, match="fixed DiffRate counts"):
        RateSearch(model)
    tokenreduce.patch(model, "tome", r=2)
    with pytest.raises(ValueError, match="not 'diffrate'"):
        RateSearch(model)
    tokenreduce.patch(model, "diffrate")
    search = RateSearch(model)
    with pytest.raises(RuntimeError, match="train\\(\\) mode"):
        search.flops()
    with pytest.raises(ValueError, match="have shape"):
        search.set_logits("prune", 1, torch.zeros(3))
    with pytest.raises(ValueError, match="kind must be"):
        search.logits("drop", 1)
    with pytest.raises(ValueError, match="single table"):
        export_rates(tmp_path / "r.yaml", {"prune": [65] * 4, "merge": [65] * 4}, 0.1)
        load_rates(f"{tmp_path / 'r.yaml'}@0.1")


# ---------------------------------------------------------------------------------------------------------------
# The adapter's attention_probs hook: fused attention at inference, the policy softmax only in the rate search
class _CountSDPA(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_inference_keeps_fused_attention():
    model = tiny_vit()
    tokenreduce.patch(model, "diffrate", prune_kept=[65, 40, 30, 20], merge_kept=[65, 35, 25, 10])
    with _CountSDPA() as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert counter.calls == 4
    tokenreduce.patch(model, "diffrate")
    RateSearch(model)
    model.train()
    with _CountSDPA() as counter:
        model(torch.randn(1, 3, 32, 32))
    assert counter.calls == 0  # every block ran the policy softmax instead


def test_search_without_reduction_is_the_model():
    """Logits that keep every token make the masked training forward the plain model (up to the 1e-6 smoothing)."""
    x = torch.randn(2, 3, 32, 32)
    model = tiny_vit().train()
    with torch.no_grad():
        expected = model(x)
    tokenreduce.patch(model, "diffrate")
    search = RateSearch(model)
    with torch.no_grad():
        for kind in ("prune", "merge"):
            for layer in range(1, 4):
                search.logits(kind, layer)[0] = 50.0  # all mass on "keep all 64 patches"
    out = model(x)
    assert search.last_kept() == {"prune": [65] * 4, "merge": [65] * 4}
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert search.flops().item() == rate_flops([65] * 4, [65] * 4, search.cost)
