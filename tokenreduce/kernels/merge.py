"""Fused size-weighted merge: ``x' = Σ size·x / Σ size`` per output slot and ``size' = Σ size``, in one pass.

Reference: :func:`tokenreduce.ops.merge.merge_weighted` (``x * size`` -> ``scatter_add_`` into ``[B, M, C]`` ->
``scatter_add_`` of sizes -> division). The reference materialises ``x * size`` (``N·C`` elements), scatters it with
atomics into a zeroed ``M·C`` buffer and re-reads that buffer for the division: about 3 reads and 3 writes of a
token-sized tensor. This kernel reads every input token once and writes every output token once.

Sorted segment reduction, not atomics. The wrapper sorts ``assign`` per sample (stable) and finds each slot's
segment ``[start_m, end_m)`` of the sorted order with ``searchsorted`` (a few ``B·N`` int64 passes, negligible
next to ``x``). Each program then owns ``BLOCK_M`` output slots x ``BLOCK_C`` channels: it walks the members of its
slots (member k of every slot at once, up to the largest segment in the tile), gathers their rows of ``x``,
accumulates ``size·x`` and ``size`` in fp32 registers, divides, and stores ``x'`` and ``size'`` directly.

* Deterministic: every output is summed in a fixed order (increasing input-token index, the stable sort's order),
  so repeated runs are bitwise identical and independent of the launch configuration, unlike fp32 ``atomic_add``
  (what the reference's CUDA ``scatter_add_`` does), whose result depends on arrival order. No zero-initialised
  scratch buffer, no second pass for the division, and autotuning can rerun the kernel safely.
* Accumulation is fp32 for every input dtype (the reference accumulates in the input dtype), so fp16/bf16 results
  are at least as accurate as the reference's; outputs are rounded once, to nearest-even, to ``x``'s dtype.
* Load balance: a tile runs as many member steps as its largest segment. ToMe's segments have 1 to ~r+1 members;
  a pathological assignment (all tokens into one slot) serialises that slot's program but stays correct.
* ``assign`` must lie in ``[0, M)``, like the reference; values outside are ignored (not checked). An empty slot
  gives ``0/0 = NaN`` and size 0, as in the reference.

Cost, per sample (s = bytes per element of x, C channels): reads ``N·C·s`` (x) + ``N·(s_size + 8)``
(size, sorted permutation) + ``2·M·8`` (segment bounds); writes ``M·C·s + M·s_size``. FLOPs: ``2·N·C``
multiply-adds plus ``M·C`` divisions: the kernel is bound by memory bandwidth.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import batch_key, device_guard, interpreting, next_pow2
from ._helpers import round_to


@triton.jit
def _merge_weighted_kernel(
    x_ptr, size_ptr, perm_ptr, bounds_ptr, out_ptr, out_size_ptr,
    N, M, C,
    stride_xb, stride_xn, stride_xc,
    stride_sb, stride_sn,
    stride_pb, stride_qb,
    stride_ob, stride_om, stride_oc,
    stride_zb,
    M_KEY, B_KEY,  # autotuning buckets only
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ok = slots < M
    chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < C

    bounds = bounds_ptr + pid_b * stride_qb + slots
    start = tl.load(bounds, mask=slot_ok, other=0).to(tl.int32)
    count = tl.load(bounds + 1, mask=slot_ok, other=0).to(tl.int32) - start
    steps = tl.max(count, axis=0)

    # 64-bit per-sample base pointers, 32-bit offsets inside a sample (the wrapper checks they fit): halves the
    # registers the [BLOCK_M, BLOCK_C] address arithmetic needs
    x_sample = x_ptr + pid_b * stride_xb
    size_sample = size_ptr + pid_b * stride_sb
    perm_sample = perm_ptr + pid_b * stride_pb
    chan_off = chans * stride_xc
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in range(0, steps):
        live = k < count
        token = tl.load(perm_sample + start + k, mask=live, other=0).to(tl.int32)
        w = tl.load(size_sample + token * stride_sn, mask=live, other=0.0).to(tl.float32)
        xv = tl.load(x_sample + (token[:, None] * stride_xn + chan_off[None, :]),
                     mask=live[:, None] & chan_ok[None, :], other=0.0)
        acc += w[:, None] * xv.to(tl.float32)
        total += w

    out = round_to(acc / tl.where(slot_ok, total, 1.0)[:, None], out_ptr.dtype.element_ty)
    tl.store(out_ptr + pid_b * stride_ob + slots[:, None] * stride_om + chans[None, :] * stride_oc,
             out.to(out_ptr.dtype.element_ty), mask=slot_ok[:, None] & chan_ok[None, :])
    if pid_c == 0:
        new_size = round_to(total, out_size_ptr.dtype.element_ty)
        tl.store(out_size_ptr + pid_b * stride_zb + slots, new_size.to(out_size_ptr.dtype.element_ty), mask=slot_ok)


_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w)
    # at most 8 elements of the tile per thread: more pushes the address arithmetic past ~150 registers (sm_90)
    for bm, bc, w in [(4, 256, 4), (8, 128, 4), (4, 512, 8), (8, 256, 8), (16, 128, 8), (32, 64, 8), (2, 512, 4)]
]
_tuned = triton.autotune(configs=_CONFIGS, key=["M_KEY", "B_KEY", "C"])(_merge_weighted_kernel)

#: block sizes under the interpreter (no autotuning there).
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_C": 128}


def segments(assign: torch.Tensor, num_out: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(perm [B, N], bounds [B, M + 1])``: the stable per-sample sort of ``assign`` and, for each slot m, the
    range ``perm[b, bounds[b, m]:bounds[b, m + 1]]`` of the input tokens assigned to it (increasing index order)."""
    sorted_assign, perm = torch.sort(assign, dim=1, stable=True)
    targets = torch.arange(num_out + 1, device=assign.device, dtype=sorted_assign.dtype)
    bounds = torch.searchsorted(sorted_assign, targets.expand(assign.shape[0], -1).contiguous())
    return perm, bounds


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor, assign: torch.Tensor, num_out: int, config: Optional[dict] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused ``merge_weighted``: size-weighted mean of the tokens that share an output slot.

    Args:
        x: ``[B, N, C]`` tokens, fp32/fp16/bf16, any strides.
        size: ``[B, N]`` tokens each one stands for (float; any dtype Triton loads), any strides.
        assign: ``[B, N]`` integer output slot of every token, in ``[0, num_out)``.
        num_out: M.
        config: explicit ``{"BLOCK_M", "BLOCK_C"}``; default: autotuned on a GPU, :data:`INTERPRETER_CONFIG`
            under the interpreter.

    Returns:
        ``(x' [B, M, C] in x's dtype, size' [B, M] in size's dtype)``, equal to
        ``tokenreduce.ops.merge.merge_weighted(x, size, assign, num_out)`` within the reference's own rounding
        (the kernel accumulates in fp32 and rounds once).
    """
    if x.dim() != 3 or size.shape != x.shape[:2] or assign.shape != x.shape[:2]:
        raise ValueError(f"merge_weighted: expected x [B, N, C], size and assign [B, N], got {tuple(x.shape)}, "
                         f"{tuple(size.shape)}, {tuple(assign.shape)}")
    bsz, n, c = x.shape
    out = torch.empty(bsz, num_out, c, dtype=x.dtype, device=x.device)
    out_size = torch.empty(bsz, num_out, dtype=size.dtype, device=x.device)
    if bsz == 0 or num_out == 0:
        return out, out_size
    if (n - 1) * abs(x.stride(1)) + (c - 1) * abs(x.stride(2)) >= 2 ** 31 or num_out * c >= 2 ** 31:
        raise ValueError("merge_weighted kernel: one sample of x must span fewer than 2**31 elements")
    perm, bounds = segments(assign, num_out)
    args = (
        x, size, perm, bounds, out, out_size, n, num_out, c,
        x.stride(0), x.stride(1), x.stride(2), size.stride(0), size.stride(1), perm.stride(0), bounds.stride(0),
        out.stride(0), out.stride(1), out.stride(2), out_size.stride(0), batch_key(num_out), batch_key(bsz),
    )
    with device_guard(x):
        if config is None and not interpreting():
            grid = lambda meta: (triton.cdiv(num_out, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]), bsz)  # noqa
            _tuned[grid](*args)
        else:
            blocks = dict(INTERPRETER_CONFIG, **(config or {}))
            blocks["BLOCK_C"] = min(blocks["BLOCK_C"], max(16, next_pow2(c)))
            grid = (triton.cdiv(num_out, blocks["BLOCK_M"]), triton.cdiv(c, blocks["BLOCK_C"]), bsz)
            _merge_weighted_kernel[grid](*args, **blocks)
    return out, out_size
