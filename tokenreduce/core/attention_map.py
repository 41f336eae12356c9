"""Attention probabilities a method hands a layer in place of its softmax (``Need.ATTENTION_PROBS``)."""
from __future__ import annotations

import torch


class AttentionMap:
    """Probabilities ``[B, H, M, M]`` a layer uses instead of computing ``softmax(q·kᵀ)``, possibly kept factored.

    ``map.apply(v)`` is the attention output for values ``v [B, H, M, d]``; ``dense()`` is the matrix itself, for a
    layer whose eager path computes its own logits and calls softmax, or for attention dropout. A factored map
    (MCTF's merged attention) never builds the matrix on the fused path: that is what makes it cheap.

    Attributes:
        pv_tokens: the keys ``map.apply(v)`` multiplies over (its MACs are those of ``P·V`` on that many tokens).
    """

    pv_tokens: int

    def apply(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class DenseMap(AttentionMap):
    """A map given as its matrix ``probs [B, H, M, M]``."""

    def __init__(self, probs: torch.Tensor) -> None:
        self.probs = probs
        self.pv_tokens = int(probs.shape[-1])

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.probs.to(v.dtype) @ v

    def dense(self) -> torch.Tensor:
        return self.probs
