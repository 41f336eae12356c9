"""CDPruner's selection as pure tensor functions: instruction relevance, the conditional similarity kernel and the
greedy MAP inference of its determinantal point process (Zhang et al., "Beyond Attention or Similarity: Maximizing
Conditional Diversity for Token Pruning in MLLMs", NeurIPS 2025; the fast greedy MAP of Chen et al., NeurIPS 2018)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def segment_ids(ids: Sequence[int], width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """An instruction's token ids cut into rows of ``width`` (the text tower's positions, 77 for CLIP), zero-padded.

    Returns:
        ``(ids [M, width], attention_mask [M, width])`` with ``M = ceil(len(ids) / width)``; the mask is 0 on the
        padding of the last row. No truncation: a long instruction gives several rows (upstream's rule).
    """
    n = len(ids)
    rows = (n - 1) // width + 1
    flat = torch.zeros(rows * width, dtype=torch.long)
    flat[:n] = torch.as_tensor(list(ids), dtype=torch.long)
    mask = torch.zeros(rows * width, dtype=torch.long)
    mask[:n] = 1
    return flat.view(rows, width), mask.view(rows, width)


def instruction_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Relevance of each visual token to the instruction, ``[P]``.

    ``rel_i`` = the mean over the M instruction rows of **minus** the cosine of ``image_embeds [P, C]`` and
    ``text_embeds [M, C]`` (the sign of the official code), then min–max normalised over the image's tokens:
    ``(rel - min + 1e-6) / (max - min)``.
    """
    img = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    txt = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    rel = (-(img @ txt.t())).mean(dim=-1)
    return (rel - rel.min() + 1e-6) / (rel.max() - rel.min())


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``L = diag(rel) · S · diag(rel)``, ``[B, P, P]``, with S the cosine similarity of ``features [B, P, D]``
    (rows divided by their L2 norm, no epsilon, in the features' dtype, then cast to ``dtype``) and
    ``relevance [B, P]``."""
    unit = (features / features.norm(dim=-1, keepdim=True)).to(dtype)
    similarity = unit @ unit.transpose(1, 2)
    rel = relevance.to(dtype)
    return rel[:, :, None] * similarity * rel[:, None, :]


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of the DPP with kernel ``L [B, P, P]`` by incremental Cholesky updates, ``k`` steps.

    ``d = diag(L)``; each step picks ``j = argmax d`` (first index on ties), ``e = (L[j] - Σ_t c_t[j] c_t) / √d[j]``
    becomes the next ``c``, ``d -= e²`` and ``d[j] = -inf``. Where ``d[j] <= 0`` (every remaining token lies in the span
    of the chosen ones: a kernel of rank below ``k``), ``e`` is taken as 0 instead of upstream's NaN, so the remaining
    picks continue by ``d`` and stay distinct.

    Returns:
        ``[B, k]`` indices, in the order chosen. O(k²·P) per image.
    """
    b, p, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    cis = kernel.new_zeros(k, b, p)
    d = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    chosen = torch.empty(b, k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        j = d.argmax(dim=1)
        chosen[:, i] = j
        dj = d[rows, j]
        proj = torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])
        safe = torch.where(dj > 0, dj, torch.ones_like(dj)).sqrt()
        e = torch.where((dj > 0)[:, None], (kernel[rows, j] - proj) / safe[:, None], torch.zeros_like(proj))
        cis[i] = e
        d = d - e.square()
        d[rows, j] = float("-inf")
    return chosen
