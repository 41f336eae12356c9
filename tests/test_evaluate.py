"""Evaluation: exact counts with 1 process and with 2 gloo processes, the shard sampler, and the eval command."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import tokenreduce
from tokenreduce.evaluation.datasets import eval_data_config, image_folder
from tokenreduce.evaluation import ShardSampler, evaluate, make_loader

from .conftest import tiny_vit
from .test_data import make_fmnist, make_image_folder

NUM_IMAGES = 13  # odd, so a padded DistributedSampler would count an image twice


def _model():
    model = tiny_vit(num_classes=3)  # seeded: every process builds the same weights
    model.pretrained_cfg = dict(input_size=(3, 32, 32), crop_pct=0.9, interpolation="bicubic",
                                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return model


def _metrics(folder: str, batch_size: int) -> dict:
    model = _model()
    tokenreduce.patch(model, "tome", r=3)
    ds = image_folder(folder, eval_data_config(model))
    m = evaluate(model, make_loader(ds, batch_size), timing=False, progress=False)
    return m.as_dict()


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = _metrics(folder, batch_size=4)
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    make_image_folder(root, classes=3, per_class=4)
    (root / "class_0" / "extra.png").write_bytes((root / "class_0" / "0.png").read_bytes())
    assert sum(1 for _ in root.rglob("*.png")) == NUM_IMAGES
    return root


@pytest.mark.parametrize("length,world", [(13, 2), (13, 3), (2, 3), (0, 2)])
def test_shard_sampler_covers_each_index_once(length, world):
    shards = [list(ShardSampler(length, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(length))
    assert [len(ShardSampler(length, r, world)) for r in range(world)] == [len(s) for s in shards]


def test_single_process_metrics_and_timing(folder):
    model = _model()
    ds = image_folder(folder, eval_data_config(model))
    m = evaluate(model, make_loader(ds, 5), timing=True, timing_warmup=1, timing_repeats=2, progress=False)
    assert m.images == NUM_IMAGES
    assert 0 <= m.top1 <= m.top5 <= 100
    assert m.img_per_s > 0
    # Unpatched GFLOPs equal the adapter's analytic count of an unreduced forward.
    tokenreduce.patch(model, "tome", r=0)
    model(torch.zeros(1, 3, 32, 32))
    assert m.gflops == pytest.approx(tokenreduce.info(model).flops / 1e9)
    tokenreduce.unpatch(model)
    patched = _metrics(str(folder), batch_size=5)
    assert patched["gflops"] < m.gflops


def test_two_gloo_processes_match_one(folder, tmp_path):
    single = _metrics(str(folder), batch_size=5)
    mp.spawn(_worker, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["images"] == single["images"] == NUM_IMAGES
    assert ranks[0]["top1"] == single["top1"] and ranks[0]["top5"] == single["top5"]
    assert ranks[0]["gflops"] == pytest.approx(single["gflops"], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The eval command on a generated Fashion-MNIST folder and a tiny reference checkpoint
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_reference(tmp_path, monkeypatch):
    """A 12-block, narrow reference ViT checkpoint and a generated Fashion-MNIST folder, wired through the
    environment variables the default job reads."""
    from safetensors.torch import save_file
    from tokenreduce.evaluation.reference import REFERENCE_ARCH, create_reference_model
    arch = dict(REFERENCE_ARCH, embed_dim=16, num_heads=2)
    torch.manual_seed(0)
    model = create_reference_model(arch)
    ckpt = tmp_path / "ref.safetensors"
    save_file(model.state_dict(), str(ckpt))
    ckpt.with_suffix(".json").write_text(json.dumps({"arch": arch, "test_top1": 10.0}))
    data = tmp_path / "fmnist"
    data.mkdir()
    make_fmnist(data, n=10)
    monkeypatch.setenv("TOKENREDUCE_FMNIST", str(data))
    monkeypatch.setenv("TOKENREDUCE_REFERENCE", str(ckpt))
    return ckpt, data


def test_eval_command_method_with_baseline(tiny_reference, tmp_path, capsys):
    from tokenreduce.cli.eval import main
    ckpt, data = tiny_reference
    out = tmp_path / "res" / "run.json"
    rc = main(["--data", str(data), "--checkpoint", str(ckpt), "--method", "tome", "--param", "r=4", "--baseline",
               "--no-progress", "--timing-repeats", "1", "--results-file", str(out), "--plot",
               str(tmp_path / "res" / "p.png")])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "tome"]
    assert all(r["images"] == 10 for r in rows)
    assert rows[1]["gflops"] < rows[0]["gflops"] and rows[1]["speedup"] > 0
    assert out.with_suffix(".csv").read_text().count("\n") == 3
    printed = capsys.readouterr().out
    assert "| tome r=4 |" in printed
    assert "fixed per-step costs dominate" not in printed  # that note is the default job's (tiny width) only


def test_default_job_runs_every_registered_method(tiny_reference, tmp_path, capsys):
    from tokenreduce.cli.eval import main
    out = tmp_path / "default.json"
    rc = main(["--no-progress", "--results-file", str(out), "--limit", "6"])
    result = json.loads(out.read_text())
    rows = result["rows"]
    failed = [(r["label"], r["note"]) for r in rows if r["status"] == "failed"]
    assert rc == 0 and not failed, failed
    assert rows[0]["method"] == "none"
    assert {r["method"] for r in rows} >= set(tokenreduce.list_methods())
    assert all(r["images"] == 6 for r in rows if r["status"] == "ok")
    printed = capsys.readouterr().out
    assert (tmp_path / "default_pareto.png").exists() or "matplotlib" in printed
    # The timing of a width-32 model is fixed per-step costs: the output says so and points to realistic models.
    assert "fixed per-step costs dominate" in printed and "tokenreduce bench" in printed


def test_eval_command_errors(tmp_path, capsys, monkeypatch):
    from tokenreduce.cli.eval import main
    monkeypatch.setenv("TOKENREDUCE_FMNIST", str(tmp_path / "none"))
    assert main(["--method", "tome", "--param", "r=2", "--no-progress"]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
    assert main(["--param", "r"]) == 2  # one error line, no traceback
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["--method", "tome", "--param", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
