"""The vLLM plugin's tests: collected only where vLLM is installed (its own venv, ``tools/ci/vllm_job.sh``).

In the main suite's venv (no vLLM) this directory is ignored, so ``pytest -m "not slow" tests`` neither collects nor
fails on it. Where vLLM is installed everything here runs, carries the ``vllm`` marker, and fails loudly.

This directory has no ``__init__.py`` on purpose: a test package named ``vllm`` would shadow the real one.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
from pathlib import Path

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if not HAVE_VLLM:
    collect_ignore_glob = ["*.py"]

# vLLM on a small CPU, in-process (see ../shared/notes/vllm.md); set before vLLM reads them, only where it runs.
if HAVE_VLLM:
    for _k, _v in dict(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                       VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_WORKER_MULTIPROC_METHOD="spawn",
                       TOKENIZERS_PARALLELISM="false").items():
        os.environ.setdefault(_k, _v)


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: tests of the vLLM plugin (run in the vLLM venv: make test-vllm)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny LLaVA on disk, its HF twin, images and prompts
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``(path, hf_model)``: a tiny random LLaVA written for vLLM, and the HF model holding the same weights."""
    from tokenreduce.integrations.vllm.checkpoint import write_checkpoint

    path = tmp_path_factory.mktemp("tiny-llava")
    model = write_checkpoint(path)
    return path, model


@pytest.fixture(scope="session")
def processor(checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint[0])


@pytest.fixture(scope="session")
def requests_():
    """Three ``(prompt, image)`` pairs: different text lengths, different images (56x56, the tower's input)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    texts = ["w1 w2 <image> w3 w4 w5", "w7 <image> w9 w10 w11 w12 w13 w14", "w20 w21 w22 w23 <image> w30"]
    return [(t, Image.fromarray((rng.rand(56, 56, 3) * 255).astype("uint8"))) for t in texts]


@pytest.fixture(scope="session")
def make_engine():
    """``make_engine(path, spec=None, **llm_kwargs)``: a context manager giving an in-process ``vllm.LLM``."""
    return engine


@contextlib.contextmanager
def engine(path, spec=None, **kwargs):
    """An in-process ``vllm.LLM`` on the tiny checkpoint (float32, eager), torn down afterwards."""
    from vllm import LLM

    overrides = {"tokenreduce": spec} if spec is not None else None
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4,
              limit_mm_per_prompt={"image": 1}, hf_overrides=overrides, seed=0, **kwargs)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        _destroy_distributed()


def _destroy_distributed():
    """Let the next in-process engine initialise vLLM's (single-process) distributed groups again."""
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
