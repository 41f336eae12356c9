"""Shared test helpers: the upstream fixtures in ../shared/fixtures and tiny timm models built in the test."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads this once, the first time
    # anything (torch.compile included) touches it, so it must be set before any test runs, not in tests/kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOKENREDUCE_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
#: Set to 1 to skip the upstream-fixture tests on a machine without ../shared (CI never sets it).
SKIP_FIXTURES = os.environ.get("TOKENREDUCE_SKIP_FIXTURES", "") not in ("", "0")


def pytest_sessionstart(session):
    """The faithfulness tests need the recorded upstream outputs: refuse to run without them (one clear error)
    unless the user opted out explicitly."""
    if not SKIP_FIXTURES and not (FIXTURES / "models").is_dir():
        raise pytest.UsageError(
            f"the upstream fixtures are expected at {FIXTURES} (../shared/fixtures beside the checkout) and are "
            "missing. Put ../shared beside the checkout, point TOKENREDUCE_SHARED at it, or set "
            "TOKENREDUCE_SKIP_FIXTURES=1 to skip the faithfulness tests.")


def _load_checker(name: str):
    path = SHARED / "tools" / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the tests need ../shared beside the checkout")
    spec = importlib.util.spec_from_file_location(f"_tokenreduce_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture_cases(method: str, call: str = "forward"):
    """Names of the cases in ../shared/fixtures/<method>/ whose call is ``call`` (for ``parametrize``).

    Never an empty list: a missing folder or a folder without such cases is an error, so the faithfulness checks
    cannot vanish; with ``TOKENREDUCE_SKIP_FIXTURES=1`` one explicitly skipped parameter stands in."""
    if SKIP_FIXTURES:
        return [pytest.param(None, marks=pytest.mark.skip(reason="TOKENREDUCE_SKIP_FIXTURES is set"))]
    folder = FIXTURES / method
    if not folder.is_dir():
        raise FileNotFoundError(f"no fixtures for {method!r} at {folder}")
    names = []
    for path in sorted(folder.glob("*.json")):
        case = json.loads(path.read_text())
        if case.get("method") == method and case.get("call", "forward") == call:
            names.append(path.stem)
    if not names:
        raise FileNotFoundError(f"{folder} has no {method!r} case with call {call!r}")
    return names


def load_case(method: str, name: str):
    """``(case json, tensors)`` of one fixture case."""
    from safetensors.torch import load_file
    path = FIXTURES / method / f"{name}.json"
    return json.loads(path.read_text()), load_file(str(path.with_suffix(".safetensors")))


def run_forward_fixture(method: str, name: str):
    """Run one forward case exactly as ../shared/tools/check_fixtures.py does; returns {tensor: (ok, err, msg)}."""
    checker = _load_checker("check_fixtures")
    case, tensors = load_case(method, name)
    return checker.run_forward_case(case, tensors, str(FIXTURES / "models"))


def build_fixture_model(name: str) -> torch.nn.Module:
    """A model under ../shared/fixtures/models, weights loaded, float64, eval mode."""
    return _load_checker("check_fixtures").build_model(str(FIXTURES / "models"), name)


def tiny_vit(**overrides) -> torch.nn.Module:
    """A small random timm VisionTransformer (no download)."""
    from timm.models.vision_transformer import VisionTransformer
    kwargs = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10, qkv_bias=True)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return VisionTransformer(**kwargs).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: Dynamo's caches (and its per-function recompile limit) would otherwise carry
    one test's compiled code objects into the next, so that a test passes or fails by what ran before it."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
