"""Fused PiToMe energy score: per token, the mean over all tokens of ``ELU(cos - margin, alpha)``.

Reference: ``tokenreduce.ops.energy.energy_score(metric, margin, alpha)`` (``u = F.normalize(metric)``,
``sim = u @ u^T``, ``F.elu(sim - margin, alpha).mean(-1)``). The kernel never writes the ``N x N`` similarity
matrix: each program owns ``BLOCK_M`` rows, keeps them (and their inverse norms) in registers, and streams all
``N`` rows of the same sample through in ``BLOCK_N``-row tiles, accumulating the ELU sum in fp32. Row norms are
computed in the kernel (no normalised copy of ``metric``); column norms are recomputed per tile, ``BLOCK_N·d``
extra FMAs against the tile's ``BLOCK_M·BLOCK_N·d``.

Every token, itself included (cos = 1), counts in the mean, exactly like the reference. Norms are clamped below
at ``eps`` as ``F.normalize`` does (default 1e-12), so a zero row has similarity 0 to everything. (The fp16
reference clamps at ``eps`` rounded to fp16, i.e. 0, and gives NaN for a zero row; the kernel's fp32 norms keep 0.)
Deterministic: each row's sum runs over column tiles in a fixed order (no atomics; the symmetry of the similarity
matrix is not exploited, which would halve the FLOPs at the cost of atomics or a second pass).

Cost, per sample (s = bytes per element): FLOPs ``2·N²·d`` (tensor cores for fp16/bf16) + ``N²`` ``exp`` and
about 6 more element-wise ops per pair, which rival the dot products at d = 64: the kernel is compute-bound.
Bytes: ``N·d·s`` read once per row tile (``ceil(N/BLOCK_M)`` times, L2-resident), ``N·s`` written. The reference
writes and re-reads ``N²`` similarities three times (matmul, subtract, ELU) before the mean.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import batch_key, device_guard, dot_block, dot_precision, interpreting, upcast_dot_operands
from ._helpers import TILE_CONFIGS, TILE_CONFIGS_FP32, round_to, row_sq_norms, tile_dots


@triton.jit
def _energy_kernel(
    x_ptr, out_ptr,
    N, D, margin, alpha, eps,
    stride_xb, stride_xn, stride_xd, stride_ob,
    N_KEY, B_KEY,  # autotuning buckets only
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    base = x_ptr + pid_b * stride_xb
    a_rows = base + rows[:, None].to(tl.int64) * stride_xn

    if SINGLE_K:  # the whole feature dimension fits one tile: load the row block once, keep it in registers
        a_tile = tl.load(a_rows + offs_d[None, :] * stride_xd, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            a_tile = a_tile.to(tl.float32)
        a_f = a_tile.to(tl.float32)
        sq_a = tl.sum(a_f * a_f, axis=1)
    else:
        a_tile = None
        sq_a = row_sq_norms(a_rows, row_ok, offs_d, D, stride_xd, BLOCK_M, BLOCK_D)
    inv_a = 1.0 / tl.maximum(tl.sqrt(tl.where(row_ok, sq_a, 1.0)), eps)

    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < N
        b_cols = base + cols[None, :].to(tl.int64) * stride_xn
        dots, sq_b = tile_dots(a_tile, a_rows, b_cols, row_ok, col_ok, offs_d, D, stride_xd, stride_xd, UPCAST,
                               PRECISION, True, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_K)
        inv_b = 1.0 / tl.maximum(tl.sqrt(tl.where(col_ok, sq_b, 1.0)), eps)
        t = dots * inv_a[:, None] * inv_b[None, :] - margin
        elu = tl.where(t > 0, t, alpha * (tl.exp(tl.minimum(t, 0.0)) - 1.0))
        total += tl.sum(tl.where(col_ok[None, :], elu, 0.0), axis=1)

    energy = round_to(total / N, out_ptr.dtype.element_ty)
    tl.store(out_ptr + pid_b * stride_ob + rows, energy.to(out_ptr.dtype.element_ty), mask=row_ok)


_CONFIGS, _CONFIGS_FP32 = TILE_CONFIGS, TILE_CONFIGS_FP32  # (the compile check reads them here)
_tuned = triton.autotune(configs=_CONFIGS, key=["N_KEY", "B_KEY", "D"])(_energy_kernel)
_tuned_fp32 = triton.autotune(configs=_CONFIGS_FP32, key=["N_KEY", "B_KEY", "D"])(_energy_kernel)

#: block sizes under the interpreter (no autotuning there).
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}


def energy_score(
    metric: torch.Tensor, margin: float, alpha: float = 1.0, eps: float = 1e-12, config: Optional[dict] = None
) -> torch.Tensor:
    """Fused PiToMe energy: ``mean_j ELU(cos(x_i, x_j) - margin, alpha)`` for every token i.

    Args:
        metric: ``[B, N, d]`` features (not necessarily unit-norm), fp32/fp16/bf16, any strides.
        margin: subtracted from every cosine similarity.
        alpha: the ELU's negative-side scale.
        eps: lower bound on each row norm, as in ``F.normalize`` (0 gives plain ``x / x.norm()``).
        config: explicit ``{"BLOCK_M", "BLOCK_N", "BLOCK_D"}``; default: autotuned on a GPU,
            :data:`INTERPRETER_CONFIG` under the interpreter.

    Returns:
        ``[B, N]`` in metric's dtype, equal to ``tokenreduce.ops.energy.energy_score(metric, margin, alpha)``
        within the reference's own rounding (the kernel works in fp32 throughout and rounds once).
    """
    if metric.dim() != 3:
        raise ValueError(f"energy_score: expected metric [B, N, d], got {tuple(metric.shape)}")
    bsz, n, d = metric.shape
    out = torch.empty(bsz, n, dtype=metric.dtype, device=metric.device)
    if bsz == 0 or n == 0:
        return out
    block_d = (config or {}).get("BLOCK_D", dot_block(d, 32 if metric.dtype == torch.float32 else 128))
    common = dict(UPCAST=upcast_dot_operands(metric.dtype), PRECISION=dot_precision(metric.dtype),
                  BLOCK_D=block_d, SINGLE_K=d <= block_d)
    args = (metric, out, n, d, float(margin), float(alpha), float(eps),
            metric.stride(0), metric.stride(1), metric.stride(2), out.stride(0), batch_key(n), batch_key(bsz))
    with device_guard(metric):
        if config is None and not interpreting():
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), bsz)  # noqa: E731
            (_tuned_fp32 if metric.dtype == torch.float32 else _tuned)[grid](*args, **common)
        else:
            blocks = dict(INTERPRETER_CONFIG, **{k: v for k, v in (config or {}).items() if k != "BLOCK_D"})
            grid = (triton.cdiv(n, blocks["BLOCK_M"]), bsz)
            _energy_kernel[grid](*args, **common, **blocks)
    return out
