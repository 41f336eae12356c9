"""Fused bipartite matching: for every row of A, the best cosine similarity over B and its argmax.

Reference: :func:`tokenreduce.ops.matching.best_match` (``scores = a @ b^T``, masked, ``scores.max(-1)``). This
kernel equals it without ever writing the ``Na x Nb`` score matrix: each program owns ``BLOCK_M`` rows of A, keeps
them in registers, and streams B through in ``BLOCK_N``-column tiles, keeping a running (max, argmax) per row.

Semantics shared with the reference (and with ``torch.max`` on CPU and CUDA):

* ties go to the **lowest column index** (``tl.max(..., return_indices_tie_break_left=True)`` within a tile,
  strict ``>`` across tiles, which are visited in increasing column order);
* each score is rounded to the input dtype before the comparison, exactly as the reference's fp16/bf16 matmul
  rounds its output, so ties created by that rounding break the same way (products are accumulated in fp32 in both);
* NaN is the largest value (like ``torch.max``): a NaN score wins, and its row reports NaN at the first NaN column;
* a row with no eligible column (protected row, or an empty column range) reports ``-inf`` at index 0.

Masks: ``protect_rows`` leading rows of A never match; columns outside ``[protect_cols, valid_cols)`` are never
chosen, where ``valid_cols`` is an int or a per-sample ``[B]`` tensor (padded batches, DiffRate's top-M
destinations). A column range ``[c0, c1)`` shared by the batch is simply ``protect_cols=c0, valid_cols=c1``; strided
views (ToMe's ``metric[:, ::2]`` / ``metric[:, 1::2]``) are read in place through their strides, no copy.

Cost, per sample (s = bytes per element): FLOPs ``2·Na·Nb·d`` (tensor cores for fp16/bf16). Bytes: A is read once
(``Na·d·s``), B once per row tile (``ceil(Na/BLOCK_M)·Nb·d·s``, mostly L2 hits: B is ~37 KB at N=577, d=64, fp16),
and ``Na·(s + 8)`` written. The reference additionally writes and re-reads the ``Na·Nb·s`` score matrix (twice more
when masks are applied), which dominates its traffic for ``Nb >> d``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from ._common import batch_key, device_guard, dot_block, dot_precision, interpreting, upcast_dot_operands
from ._helpers import TILE_CONFIGS, TILE_CONFIGS_FP32, round_to, row_sq_norms, tile_dots


@triton.jit
def _best_match_kernel(
    a_ptr, b_ptr, val_ptr, idx_ptr, valid_ptr,
    Na, Nb, D, protect_rows, col_start, col_end,
    stride_ab, stride_am, stride_ad,
    stride_bb, stride_bn, stride_bd,
    stride_vb, stride_ib,
    N_KEY, B_KEY,  # autotuning buckets only
    HAS_VALID: tl.constexpr, NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Na
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    a_base = a_ptr + pid_b * stride_ab + rows[:, None].to(tl.int64) * stride_am
    b_base = b_ptr + pid_b * stride_bb

    end = col_end
    if HAS_VALID:
        end = tl.minimum(end, tl.load(valid_ptr + pid_b).to(tl.int32))

    a_tile = None
    if SINGLE_K:  # the whole feature dimension fits one tile: load A once, keep it in registers
        a_tile = tl.load(a_base + offs_d[None, :] * stride_ad, mask=row_ok[:, None] & (offs_d[None, :] < D),
                         other=0.0)
        if UPCAST:
            a_tile = a_tile.to(tl.float32)
        if NORMALIZE:
            a_f = a_tile.to(tl.float32)
            inv_a = 1.0 / tl.sqrt(tl.where(row_ok, tl.sum(a_f * a_f, axis=1), 1.0))
    elif NORMALIZE:
        sq_a = row_sq_norms(a_base, row_ok, offs_d, D, stride_ad, BLOCK_M, BLOCK_D)
        inv_a = 1.0 / tl.sqrt(tl.where(row_ok, sq_a, 1.0))

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(col_start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        b_cols = b_base + cols[None, :].to(tl.int64) * stride_bn
        acc, sq_b = tile_dots(a_tile, a_base, b_cols, row_ok, col_ok, offs_d, D, stride_ad, stride_bd, UPCAST,
                              PRECISION, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_K)
        if NORMALIZE:
            acc = acc * inv_a[:, None] * (1.0 / tl.sqrt(tl.where(col_ok, sq_b, 1.0)))[None, :]
        # round like the reference's matmul output, then NaN -> +inf so it wins like in torch.max
        s = round_to(acc, val_ptr.dtype.element_ty)
        s = tl.where(s != s, float("inf"), s)
        s = tl.where((col_ok & (cols >= col_start))[None, :], s, float("-inf"))
        tile_best, tile_arg = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, n0 + tile_arg, best_idx)

    protected = rows < protect_rows
    best = tl.where(protected, float("-inf"), best)
    best_idx = tl.where(protected, 0, best_idx)
    best = tl.where(best == float("inf"), float("nan"), best)  # +inf only arises from NaN (cosines are finite)
    tl.store(val_ptr + pid_b * stride_vb + rows, best.to(val_ptr.dtype.element_ty), mask=row_ok)
    tl.store(idx_ptr + pid_b * stride_ib + rows, best_idx.to(tl.int64), mask=row_ok)


_CONFIGS, _CONFIGS_FP32 = TILE_CONFIGS, TILE_CONFIGS_FP32  # (the compile check reads them here)
_KEY = ["N_KEY", "B_KEY", "D", "HAS_VALID", "NORMALIZE"]
_tuned = triton.autotune(configs=_CONFIGS, key=_KEY)(_best_match_kernel)
_tuned_fp32 = triton.autotune(configs=_CONFIGS_FP32, key=_KEY)(_best_match_kernel)

#: block sizes used under the interpreter (no autotuning there); large tiles mean fewer interpreted programs.
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}


def best_match(
    a: torch.Tensor,
    b: torch.Tensor,
    protect_rows: int = 0,
    protect_cols: int = 0,
    valid_cols: Union[int, torch.Tensor, None] = None,
    normalize: bool = False,
    config: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused ``best_match``: per row of A the maximum cosine similarity over B and its argmax.

    Args:
        a: ``[B, Na, d]`` rows (unit-norm unless ``normalize``); any strides. fp32, fp16 or bf16.
        b: ``[B, Nb, d]`` same dtype and ``d``; any strides.
        protect_rows: the first rows of A never match (score -inf, index 0).
        protect_cols: the first columns (rows of B) are never chosen.
        valid_cols: only columns ``< valid_cols`` are eligible: an int, or an integer tensor ``[B]`` per sample.
        normalize: divide each dot product by both rows' norms in the kernel (A and B need not be unit-norm; a
            zero row gives NaN, as ``x / x.norm()`` does).
        config: explicit ``{"BLOCK_M", "BLOCK_N", "BLOCK_D"}`` (tests use small tiles); default: autotuned on a GPU,
            :data:`INTERPRETER_CONFIG` under the interpreter.

    Returns:
        ``(score [B, Na] in a's dtype, index [B, Na] int64)``, equal to
        ``tokenreduce.ops.matching.best_match(a, b, protect_rows, protect_cols)`` up to fp32 summation order.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"best_match: expected a [B, Na, d] and b [B, Nb, d], got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"best_match: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    bsz, na, d = a.shape
    nb = b.shape[1]
    values = torch.empty(bsz, na, dtype=a.dtype, device=a.device)
    index = torch.empty(bsz, na, dtype=torch.long, device=a.device)
    if bsz == 0 or na == 0:
        return values, index

    col_end = nb
    has_valid = isinstance(valid_cols, torch.Tensor)
    if valid_cols is not None and not has_valid:
        col_end = max(0, min(nb, int(valid_cols)))
    valid = valid_cols.to(device=a.device).reshape(bsz).contiguous() if has_valid else index  # else: unused
    col_start = max(0, min(int(protect_cols), nb))

    block_d = (config or {}).get("BLOCK_D", dot_block(d, 32 if a.dtype == torch.float32 else 128))
    common = dict(
        HAS_VALID=has_valid, NORMALIZE=bool(normalize), UPCAST=upcast_dot_operands(a.dtype),
        PRECISION=dot_precision(a.dtype), BLOCK_D=block_d, SINGLE_K=d <= block_d,
    )
    args = (
        a, b, values, index, valid, na, nb, d, int(protect_rows), col_start, col_end,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        values.stride(0), index.stride(0), batch_key(max(na, nb)), batch_key(bsz),
    )
    with device_guard(a):
        if config is None and not interpreting():
            grid = lambda meta: (triton.cdiv(na, meta["BLOCK_M"]), bsz)  # noqa: E731
            (_tuned_fp32 if a.dtype == torch.float32 else _tuned)[grid](*args, **common)
        else:
            blocks = dict(INTERPRETER_CONFIG, **{k: v for k, v in (config or {}).items() if k != "BLOCK_D"})
            grid = (triton.cdiv(na, blocks["BLOCK_M"]), bsz)
            _best_match_kernel[grid](*args, **common, **blocks)
    return values, index
