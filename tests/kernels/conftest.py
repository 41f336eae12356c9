"""Kernel tests: every Triton kernel against its ``tokenreduce.ops`` reference.

Without a CUDA device the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set here, before any
kernel module is imported (Triton picks interpreter vs compiler when a ``@triton.jit`` function is defined). With a
CUDA device the same tests run the compiled kernels on the GPU. The ops' own dispatch sends CPU tensors to the
kernels only under ``TOKENREDUCE_KERNELS=1`` (see ``tokenreduce.kernels.dispatch``); the ``kernels_on`` fixture
sets it.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402,F401  (a dev dependency: the kernel tests must fail, not vanish, without it)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ulp(dtype: torch.dtype) -> float:
    """Spacing of ``dtype`` just below 1.0 (``eps / 2``): the resolution of a cosine similarity."""
    return torch.finfo(dtype).eps / 2


def assert_within_torch_error(out: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                              factor: float = 2.0, what: str = ""):
    """The kernel's error against an exact (float64) reference is at most ``factor`` times PyTorch's own error in
    ``dtype`` (plus half an output ulp, for cases where PyTorch happens to be exact)."""
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(out), torch.isnan(exact)), f"{what}: NaN positions differ"
    err = (out.double() - exact)[finite].abs().max().item() if finite.any() else 0.0
    torch_err = (torch_out.double() - exact)[finite].abs().max().item() if finite.any() else 0.0
    scale = exact[finite].abs().max().item() if finite.any() else 0.0
    slack = torch.finfo(dtype).eps * max(scale, 1e-3) / 2
    assert err <= factor * torch_err + slack, \
        f"{what} {dtype}: kernel error {err:.3g} > {factor} x torch {torch_err:.3g}"


@pytest.fixture
def kernels_on(monkeypatch):
    """Force the ops to dispatch to the kernels (CPU tensors go through the interpreter)."""
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "1")
    yield


@pytest.fixture
def kernels_off(monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "0")
    yield
