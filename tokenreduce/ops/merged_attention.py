"""Attention of a vision tower's feature layer, seen from the tokens of a patch merger after it (Qwen2.5-VL, Qwen3-VL:
each run of ``group`` consecutive patches, a 2×2 block, becomes one visual token), as pure functions.

A tower-output method reads the attention and keys of the layer before the merger, but acts on the merged tokens.
The mapping used everywhere (``docs/backbones/qwen_vl.md``):

- **keys / values**: the mean over the ``group`` patches of a merged token (VisionZip's official Qwen2.5-VL code
  averages the keys the same way);
- **attention**: ``P_m[r, c] = mean over the patches i of r of (sum over the patches j of c of P[i, j])`` — the
  probability that a patch of ``r`` attends to any patch of ``c``, averaged over ``r``'s patches. Every row still
  sums to 1, and the attention a merged token *receives* (the mean over rows) is proportional to the mean over its
  patches of the attention each receives, the score of VisionZip's official Qwen2.5-VL code.

Packed towers attend only within segments (an image, a video frame, a window of Qwen2.5-VL's windowed layers):
``segments`` gives each patch its segment id, and a patch attends only patches of its own segment.
"""
from __future__ import annotations

import torch


def group_mean(t: torch.Tensor, group: int) -> torch.Tensor:
    """``[..., M·group, d] -> [..., M, d]``: the mean of every run of ``group`` consecutive rows."""
    *lead, n, d = t.shape
    if n % group:
        raise ValueError(f"{n} patches do not form whole groups of {group}")
    return t.reshape(*lead, n // group, group, d).mean(dim=-2)


def merged_attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float,
                          segments: torch.Tensor, group: int) -> torch.Tensor:
    """Attention probabilities of chosen merged tokens over all merged tokens.

    Args:
        q, k: ``[B, H, N, d]`` the layer's queries and keys after its rotary embedding, ``N = M·group`` patches with
            the ``group`` patches of merged token ``m`` at ``m·group .. m·group + group - 1``.
        rows: ``[B, Q]`` indices of the merged tokens whose rows are wanted.
        scale: the attention's logit scale.
        segments: ``[B, N]`` segment id of every patch; a patch attends only patches with its own id.
        group: patches per merged token.

    Returns:
        ``[B, H, Q, M]``: ``P_m[r, c] = (1/group) Σ_{i ∈ r} Σ_{j ∈ c} P[i, j]`` with ``P`` the softmax over keys of
        ``scale·q·kᵀ`` restricted to the segment (in at least float32, as HF's eager attention), cast back to q's dtype.
    """
    b, h, n, d = q.shape
    m, nq = n // group, rows.shape[1]
    patch_rows = (rows[:, :, None] * group + torch.arange(group, device=rows.device)).reshape(b, nq * group)
    qr = q.gather(2, patch_rows[:, None, :, None].expand(b, h, nq * group, d))
    logits = (qr @ k.transpose(-2, -1)) * scale                                  # [B, H, Q·g, N]
    work = torch.promote_types(logits.dtype, torch.float32)
    allowed = segments.gather(1, patch_rows)[:, :, None] == segments[:, None, :]  # [B, Q·g, N]
    probs = logits.to(work).masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
    return probs.view(b, h, nq, group, m, group).sum(dim=-1).mean(dim=3).to(q.dtype)
