"""lmms-eval integration tests: run only where lmms-eval is installed (its own venv, tools/ci/lmms_job.sh).

The main suite's venv has no lmms-eval, so there these files are not collected at all. Asking for them
explicitly (``-m lmms``) without lmms-eval is an error, not an empty green run.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None

if not HAVE_LMMS:
    collect_ignore_glob = ["test_*.py"]

# Tests never download: lmms-eval, datasets and transformers must stay offline even if a hub id slips in.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def pytest_configure(config: pytest.Config) -> None:
    if HAVE_LMMS:
        import torch
        # One thread: these models are tiny, and on a shared 2-core machine idle OpenMP workers spinning for
        # more threads than free cores make every matmul ~15x slower.
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "lmms: needs lmms-eval (run by tools/ci/lmms_job.sh in .venv-lmms)")
    if not HAVE_LMMS and (config.option.markexpr or "").strip() == "lmms":
        raise pytest.UsageError("-m lmms asks for the lmms-eval tests, but lmms-eval is not installed in this "
                                "Python; run bash tools/ci/lmms_job.sh")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random LLaVA-1.5 saved to disk with its locally built tokenizer and processor."""
    from tokenreduce.integrations.lmms_eval.smoke import build_tiny_llava
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="session")
def tiny_next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random LLaVA-NeXT (anyres crops, image newlines) saved the same way."""
    from tokenreduce.integrations.lmms_eval.smoke import build_tiny_llava
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny_llava_next"), family="llava_next"))


@pytest.fixture(scope="session")
def smoke_runs(tiny_checkpoint: str, task_manager, tmp_path_factory: pytest.TempPathFactory):
    """``(method, params, batch_size) -> (lmms-eval output, records)``, each evaluated once per session."""
    from .lmms_helpers import evaluate, model_args, read_records

    cache: dict = {}
    folder = tmp_path_factory.mktemp("records")

    def run(method, params, batch_size):
        key = (method, tuple(sorted(params.items())), batch_size)
        if key not in cache:
            path = folder / f"{method}_{len(cache)}.jsonl"
            args = model_args(tiny_checkpoint, method, params, records=path)
            cache[key] = (evaluate("tokenreduce", task_manager, args=args, batch_size=batch_size),
                          read_records(path))
        return cache[key]
    return run


@pytest.fixture(scope="session")
def task_manager():
    """lmms-eval's task index with only the shipped five-sample smoke tasks (the ~1,900 built-ins skipped)."""
    from lmms_eval.tasks import TaskManager

    from tokenreduce.integrations.lmms_eval.smoke import smoke_task_dir
    return TaskManager("WARNING", include_path=str(smoke_task_dir()), include_defaults=False)
