"""Small helpers shared by the Triton kernels (no kernel code here).

Everything in this module is plain Python/PyTorch so that it imports without Triton.
"""
from __future__ import annotations

import contextlib
import os

import torch

#: dtypes every kernel accepts; anything else (float64 included) stays on the PyTorch reference path.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton decides interpreter vs compiler when a ``@triton.jit`` function is *defined*, i.e. when a kernel module is
    first imported: the variable must be set before ``tokenreduce.kernels.matching`` (etc.) is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_block(d: int, max_block: int = 128) -> int:
    """Width of the feature-dimension tile: ``d`` rounded up to a power of two (>= 16, the ``tl.dot`` minimum),
    capped at ``max_block`` (larger ``d`` is looped over in chunks of this width)."""
    return max(16, min(next_pow2(d), max_block))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` that matches what ``torch.matmul`` does for this dtype.

    fp32: TF32 only when PyTorch itself is allowed to use it (``torch.set_float32_matmul_precision`` other than
    "highest", or ``torch.backends.cuda.matmul.allow_tf32``); otherwise full IEEE fp32 products, so the kernel and
    the reference agree to fp32 rounding. fp16/bf16 operands always multiply exactly into fp32 accumulators.
    """
    if dtype != torch.float32:
        return "ieee"
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Whether the kernel must convert its ``tl.dot`` operands to fp32 before the product.

    Only under the interpreter with bf16: Triton 3.x's interpreter stores bf16 as raw uint16 and its ``tl.dot``
    multiplies the raw bit patterns. Converting exactly to fp32 first gives the same products as the GPU's
    bf16 x bf16 -> fp32 tensor-core dot. On a GPU this is always False.
    """
    return dtype == torch.bfloat16 and interpreting()


def batch_key(n: int) -> int:
    """Autotuning bucket for a size: its next power of two (ToMe changes N every layer; buckets keep the number of
    tuning runs small)."""
    return next_pow2(max(1, n))


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current device for the launch (Triton launches on the current device, which need not
    be the tensors' one on multi-GPU hosts); a no-op for CPU tensors under the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
