"""tools/train_rates.py: a 2-process DDP (gloo) rate search on CPU, checkpoint/resume, and the YAML export."""
import json
import os
import subprocess
import sys

import torch

import tokenreduce
from tokenreduce.train.rate_search import SearchConfig, search_rates
from tokenreduce.methods.diffrate import load_rates

from .conftest import REPO, tiny_vit

TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}


def test_two_process_gloo_search(tmp_path):
    out = tmp_path / "search"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tools" / "train_rates.py"), "--model", "vit_tiny_patch16_224",
           "--model-kwargs", json.dumps(TINY), "--synthetic", "--synthetic-size", "32", "--batch-size", "4",
           "--max-steps", "3", "--lr", "0.5", "--target-gflops", "0.005", "--workers", "0", "--no-progress",
           "--output", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    ranks = summary["per_rank"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert summary["ranks_agree"] and ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["prune"] == ranks[1]["prune"] and ranks[0]["merge"] == ranks[1]["merge"]
    # the rates moved away from the zero init (large lr): not every block keeps the initial mean count
    assert ranks[0]["prune"][1:] != [34, 34, 34] or ranks[0]["merge"][1:] != [34, 34, 34]

    table = load_rates(out / "rates.yaml")
    assert table.prune_kept == ranks[0]["prune"] and table.merge_kept == ranks[0]["merge"]
    assert table.target_gflops == 0.005 and table.model == "vit_tiny_patch16_224"
    model = tiny_vit()
    tokenreduce.patch(model, "diffrate", rates=str(out / "rates.yaml"))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    expected = [65, 65] + [min(p, m) for p, m in zip(table.prune_kept[1:3], table.merge_kept[1:3])]
    assert tokenreduce.info(model).tokens_per_layer[:2] == expected[:2]
    assert tokenreduce.info(model).tokens_per_layer[2] == min(expected[2], 65)


def test_checkpoint_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = dict(model="vit_tiny_patch16_224", model_kwargs=TINY, synthetic=True, synthetic_size=16, batch_size=4,
               target_gflops=0.005, workers=0, progress=False, output=str(tmp_path / "r"), lr=0.3)
    first = search_rates(SearchConfig(**cfg, max_steps=2))
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and first["steps"] == 2
    resumed = search_rates(SearchConfig(**cfg, max_steps=4, resume=True))
    straight = search_rates(SearchConfig(**{**cfg, "output": str(tmp_path / "s")}, max_steps=4))
    assert resumed["steps"] == 4
    # resuming gives exactly the uninterrupted run (same data order, optimizer state, schedule)
    assert resumed["per_rank"][0]["digest"] == straight["per_rank"][0]["digest"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 4


def test_fashion_mnist_data():
    """The project's default dataset feeds the search (training split, at the model's input size)."""
    import pytest
    from tokenreduce.train.trainer import training_data as _dataset
    from tokenreduce.evaluation.reference import create_reference_model
    try:
        data = _dataset(SearchConfig(data="fashion-mnist"), create_reference_model())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    image, label = data[0]
    assert len(data) == 60000 and image.shape == (1, 28, 28) and 0 <= label < 10
