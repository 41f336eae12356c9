"""Run-time choice between a fused Triton kernel and its PyTorch reference in ``tokenreduce.ops``.

The ops (``best_match``, ``merge_weighted``, ``energy_score``) ask :func:`use_kernel` before doing any work::

    if dispatch.use_kernel(a, b):
        return dispatch.kernels("matching").best_match(a, b, protect_rows, protect_cols)
    ...  # the PyTorch reference

Policy (``TOKENREDUCE_KERNELS`` environment variable, read at every call; :func:`override` takes precedence):

``auto`` (unset, empty or "auto")
    the kernel when every tensor is on a CUDA device and Triton imports (and ``TRITON_INTERPRET`` is not set); the
    PyTorch reference otherwise.
``0`` ("off", "false")
    always the PyTorch reference.
``1`` ("on", "true")
    the kernel wherever it can run: CUDA tensors, and also **CPU tensors when ``TRITON_INTERPRET=1``** (Triton's CPU
    interpreter; this is how the test suite exercises the kernels without a GPU). Raises ``RuntimeError`` when
    Triton cannot be imported. CPU tensors without the interpreter still take the PyTorch path.

In every mode the PyTorch reference is used when the kernel cannot reproduce the op's semantics:

* a dtype other than fp32 / fp16 / bf16 (float64 stays on the reference, which the float64 tests rely on);
* autograd would record the op (grad enabled and an input requires grad): the kernels have no backward;
* inside ``torch.compile`` tracing (Inductor already fuses the reference there; the kernels are plain launches);
* tensors on different devices, or a device that is neither CUDA nor (interpreted) CPU.

``TRITON_INTERPRET`` must be set before the kernel modules are first imported (Triton fixes interpreter vs
compiler when a ``@triton.jit`` function is defined); the kernel modules are imported lazily, on first use.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

from ._common import SUPPORTED_DTYPES, interpreting

ENV = "TOKENREDUCE_KERNELS"
_MODES = {"": "auto", "auto": "auto", "0": "off", "off": "off", "false": "off", "no": "off",
          "1": "on", "on": "on", "true": "on", "yes": "on"}
_override: Optional[str] = None
_triton_ok: Optional[bool] = None
_triton_error: str = ""


def mode() -> str:
    """The current policy: "auto", "on" or "off" (:func:`override` if active, else ``TOKENREDUCE_KERNELS``)."""
    if _override is not None:
        return _override
    raw = os.environ.get(ENV, "").strip().lower()
    if raw not in _MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected 0, 1 or auto")
    return _MODES[raw]


@contextlib.contextmanager
def override(new_mode: str) -> Iterator[None]:
    """Force a policy ("auto", "on", "off", or "0"/"1") for the duration of a ``with`` block (process-wide, not
    thread-local; meant for benchmarks and tests)."""
    global _override
    key = str(new_mode).strip().lower()
    if key not in _MODES:
        raise ValueError(f"kernel mode {new_mode!r}: expected 0, 1, auto, on or off")
    previous, _override = _override, _MODES[key]
    try:
        yield
    finally:
        _override = previous


def triton_available() -> bool:
    """Whether ``import triton`` works (cached after the first call)."""
    global _triton_ok, _triton_error
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_ok = True
        except Exception as exc:  # ImportError, or a broken install raising something else
            _triton_ok, _triton_error = False, f"{type(exc).__name__}: {exc}"
    return _triton_ok


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def use_kernel(*tensors: torch.Tensor) -> bool:
    """Whether an op called with these tensors should run its Triton kernel (see the module docstring).

    Integer tensors (indices) only count for the device check; floating tensors must all be fp32/fp16/bf16.
    """
    if _compiling():  # first: keeps dynamo from tracing the environment lookups below
        return False
    current = mode()
    if current == "off" or not tensors:
        return False
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        return False
    device = devices.pop()
    if device == "cuda":  # the interpreter is a debugging aid: interpreted CUDA launches only when forced
        runnable = current == "on" or not interpreting()
    elif device == "cpu":
        runnable = current == "on" and interpreting()
    else:
        runnable = False
    if not runnable:
        return False
    for t in tensors:
        if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if not triton_available():
        if current == "on":
            raise RuntimeError(f"{ENV}=1 forces the Triton kernels, but triton cannot be imported ({_triton_error})")
        return False
    return True


def kernels(name: str) -> ModuleType:
    """The kernel module ``tokenreduce.kernels.<name>`` ("matching", "merge", "energy"), imported on first use."""
    return importlib.import_module(f"{__package__}.{name}")
