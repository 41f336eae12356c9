"""PiToMe's energy score (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging",
NeurIPS 2024) as a pure tensor function.

A token's energy is the mean, over all tokens (itself included), of an ELU of its cosine similarity to them
shifted by a margin. Tokens in large groups of similar tokens have high energy and are merged first; isolated
tokens (low energy) are protected. This is the reference of the fused Triton energy kernel, which never writes
the ``N x N`` similarity matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import dispatch


def energy_score(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """PiToMe's energy of every token.

    Args:
        metric: ``[B, N, d]`` token features (PiToMe: attention keys averaged over heads, prefix tokens removed).
        margin: similarities above ``margin`` count linearly, those below saturate towards ``-alpha``.
        alpha: the ELU's negative saturation value.

    Returns:
        ``[B, N]``: ``E_i = mean_j ELU(cos(m_i, m_j) - margin, alpha)`` (j over all N tokens, i included).

    Rows are L2-normalised with ``F.normalize`` (a zero row has similarity 0 to everything, as upstream). On
    CUDA tensors the fused kernel runs instead (``tokenreduce.kernels.dispatch``), without the ``N x N`` matrix.
    """
    if dispatch.use_kernel(metric):
        return dispatch.kernels("energy").energy_score(metric, margin, alpha)
    unit = F.normalize(metric, dim=-1)
    sim = unit @ unit.transpose(-1, -2)
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1)
