"""``@triton.jit`` helpers shared by the kernels (imports Triton; only the kernel modules import this)."""
import triton
import triton.language as tl

#: Autotuning tiles of the kernels that stream ``BLOCK_N`` rows past ``BLOCK_M`` resident ones (matching, energy)
TILE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3),
        (128, 64, 8, 3), (128, 128, 8, 3), (32, 128, 4, 3), (16, 64, 2, 2),
    ]
]
#: fp32 operands (IEEE products on CUDA cores) take twice the registers: smaller tiles, 32-wide feature chunks
TILE_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 64, 4, 2), (64, 32, 4, 2), (16, 64, 2, 2), (64, 64, 8, 2)]
]


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


@triton.jit
def row_sq_norms(a_rows, row_ok, offs_d, D, stride_d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Squared L2 norms (fp32) of ``BLOCK_M`` rows of width ``D``, read in ``BLOCK_D``-wide chunks.

    ``a_rows``: ``[BLOCK_M, 1]`` pointers to the rows' first elements; rows with ``row_ok`` false read zeros.
    Bytes: ``BLOCK_M·D`` elements read; FLOPs: ``2·BLOCK_M·D``.
    """
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        dk = k0 + offs_d
        a_k = tl.load(a_rows + dk[None, :] * stride_d, mask=row_ok[:, None] & (dk[None, :] < D), other=0.0)
        a_k = a_k.to(tl.float32)
        sq += tl.sum(a_k * a_k, axis=1)
    return sq


@triton.jit
def tile_dots(a_tile, a_rows, b_cols, row_ok, col_ok, offs_d, D, stride_ad, stride_bd,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, COL_NORMS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``A·Bᵀ`` (fp32 accumulation), and with ``COL_NORMS`` the squared norms
    ``[BLOCK_N]`` of the tile's B rows (fp32; zeros without ``COL_NORMS``).

    ``SINGLE_K`` (``D <= BLOCK_D``): ``a_tile [BLOCK_M, BLOCK_D]`` holds A's rows (loaded once by the caller, kept
    in registers across column tiles) and one ``BLOCK_D x BLOCK_N`` tile of B is read. Otherwise ``a_tile`` is
    unused (None) and A (through ``a_rows [BLOCK_M, 1]`` pointers) and B stream through in ``BLOCK_D`` chunks.
    ``b_cols [1, BLOCK_N]``: pointers to the B rows' first elements. ``UPCAST``: fp32 operands (IEEE products) for
    dtypes the tensor cores would round. FLOPs: ``2·BLOCK_M·BLOCK_N·D`` (+ ``2·BLOCK_N·D`` for the norms); bytes:
    ``BLOCK_N·D`` elements of B (+ ``BLOCK_M·D`` of A when streamed).
    """
    if SINGLE_K:
        b_tile = tl.load(b_cols + offs_d[:, None] * stride_bd, mask=col_ok[None, :] & (offs_d[:, None] < D),
                         other=0.0)
        if UPCAST:
            b_tile = b_tile.to(tl.float32)
        dots = tl.dot(a_tile, b_tile, input_precision=PRECISION)
        if COL_NORMS:
            b_f = b_tile.to(tl.float32)
            sq_b = tl.sum(b_f * b_f, axis=0)
        else:
            sq_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        sq_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            dk = k0 + offs_d
            a_k = tl.load(a_rows + dk[None, :] * stride_ad, mask=row_ok[:, None] & (dk[None, :] < D), other=0.0)
            b_k = tl.load(b_cols + dk[:, None] * stride_bd, mask=col_ok[None, :] & (dk[:, None] < D), other=0.0)
            if UPCAST:
                a_k = a_k.to(tl.float32)
                b_k = b_k.to(tl.float32)
            dots = tl.dot(a_k, b_k, dots, input_precision=PRECISION)
            if COL_NORMS:
                b_f = b_k.to(tl.float32)
                sq_b += tl.sum(b_f * b_f, axis=0)
    return dots, sq_b
