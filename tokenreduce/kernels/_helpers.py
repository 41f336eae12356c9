"""``@triton.jit`` helpers shared by the kernels (imports Triton; only the kernel modules import this)."""
import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to ``DTYPE`` (round to nearest, ties to even) and return it as fp32.

    bf16 is rounded with integer arithmetic on the fp32 bit pattern instead of ``x.to(tl.bfloat16)``: Triton 3.x's
    interpreter truncates on that cast while GPUs round to nearest, and the kernels must round like PyTorch on both.
    A value returned here is exactly representable in ``DTYPE``, so a later cast to it is exact everywhere.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # wrapping int32 add; NaN is kept below
        y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float32:
        y = x
    else:
        y = x.to(DTYPE).to(tl.float32)
    return y
