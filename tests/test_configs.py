"""Config files: the published settings load and validate; mistakes are clear errors; patch(config=...) works."""
from __future__ import annotations

import pytest
import torch
import yaml

import tokenreduce
from tokenreduce.configs import CONFIG_DIR, ConfigError, load_config, validate_config

from .conftest import tiny_vit


def method_configs():
    """Every YAML under configs/ that is a method config (has 'method'; rate tables and such are data)."""
    found = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "method" in data:
            found.append(path)
    return found


@pytest.mark.parametrize("path", method_configs(), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_configs_are_valid(path):
    data = yaml.safe_load(path.read_text())
    registered = data["method"] in tokenreduce.list_methods()
    cfg = load_config(path, check_params=registered)
    assert cfg.method == data["method"] and cfg.name == path.stem
    if cfg.paper_top1 is not None:
        assert 0 < cfg.paper_top1 <= 100


def test_tome_configs_name_pinned_timm_models():
    import timm
    paths = [p for p in method_configs() if p.parent.name == "tome"]
    assert len(paths) >= 5
    for path in paths:
        cfg = load_config(path)
        assert cfg.model, path
        if cfg.checkpoint is None:  # weights from timm's hub: the pretrained tag must exist
            assert "." in cfg.model and cfg.model in timm.list_pretrained(), cfg.model


@pytest.mark.parametrize("data,match", [
    ({"method": "tome", "params": {"r": 4}, "typo": 1}, r"unknown key\(s\) \['typo'\]"),
    ({"params": {"r": 4}}, "missing 'method'"),
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"method": "tome", "params": {"rr": 4}}, "unknown parameter"),
    ({"method": "tome", "params": {"r": -1}}, "invalid r"),
    ({"method": "tome", "params": [4]}, "'params' must be a mapping"),
    ({"method": "tome", "preprocessing": {"size": 224}}, r"preprocessing: unknown key\(s\) \['size'\]"),
    ({"method": "tome", "preprocessing": {"crop_pct": 1.5}}, "crop_pct must be in"),
    ({"method": "tome", "preprocessing": {"interpolation": "cubic"}}, "interpolation must be one of"),
    ({"method": "tome", "paper": {"top1": "79"}}, "paper.top1 must be a number"),
    ({"method": "tome", "paper": {"acc": 79.0}}, r"paper: unknown key\(s\) \['acc'\]"),
    ({"method": 3}, "'method' must be a string"),
    ([1, 2], "must be a mapping"),
])
def test_validation_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(data, source="x.yaml")


def test_load_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [tome\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_load_by_short_name():
    assert load_config("tome/vit_s16_augreg_r13").params == {"r": 13}


def test_patch_with_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: tome\nparams: {r: 3}\n")
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    tokenreduce.patch(model, config=str(path))
    out = model(x)
    assert tokenreduce.info(model).tokens_per_layer == [65, 62, 59, 56]
    tokenreduce.patch(model, "tome", r=3)
    torch.testing.assert_close(model(x), out)
    tokenreduce.patch(model, config=str(path), r=1)  # keyword parameters override the config's
    model(x)
    assert tokenreduce.info(model).tokens_per_layer == [65, 64, 63, 62]
    with pytest.raises(ValueError, match="contradicts"):
        tokenreduce.patch(model, "pitome", config=str(path))
    tokenreduce.unpatch(model)


def test_eval_prints_paper_beside_measured(tmp_path, capsys, monkeypatch):
    import json
    from .test_data import make_fmnist
    from safetensors.torch import save_file
    from tokenreduce.cli.eval import main
    from tokenreduce.evaluation.reference import REFERENCE_ARCH, create_reference_model
    arch = dict(REFERENCE_ARCH, embed_dim=16, num_heads=2, depth=2)
    ckpt = tmp_path / "ref.safetensors"
    save_file(create_reference_model(arch).state_dict(), str(ckpt))
    ckpt.with_suffix(".json").write_text(json.dumps({"arch": arch}))
    make_fmnist(tmp_path, n=4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: tome\nparams: {r: 2}\npaper: {top1: 12.34, baseline_top1: 56.78}\n")
    rc = main(["--data", str(tmp_path), "--checkpoint", str(ckpt), "--config", str(cfg), "--baseline",
               "--no-progress", "--no-timing"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "paper: 12.34, here:" in out and "paper: 56.78, here:" in out


def test_data_folders_ship_in_the_wheel(tmp_path):
    """configs/ and checkpoints/ are installed as tokenreduce._configs / tokenreduce._checkpoints."""
    import configparser
    from pathlib import Path
    from tokenreduce.resources import data_dir
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    mapping = cfg["options"]["package_dir"]
    assert "tokenreduce._configs = configs" in mapping and "tokenreduce._checkpoints = checkpoints" in mapping
    assert (data_dir("configs") / "tome").is_dir()
    assert (data_dir("checkpoints") / "fmnist_vit_reference.safetensors").is_file()


def test_every_subpackage_is_declared_for_the_wheel():
    """setup.cfg lists the packages explicitly (two of them are mapped data folders): a subpackage missing from the
    list would be missing from every non-editable install (``tokenreduce`` the command included)."""
    import configparser
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    declared = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "tokenreduce").rglob("__init__.py")}
    assert found - declared == set(), f"add to setup.cfg [options] packages: {sorted(found - declared)}"
    assert declared - found == {"tokenreduce._configs", "tokenreduce._checkpoints"}
