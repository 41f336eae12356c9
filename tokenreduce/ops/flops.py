"""Analytic multiply-accumulate counts of a ViT forward with a varying number of tokens.

Convention (per image, MACs, no norms / softmax / activation / reduction bookkeeping):
patch embedding on the patch tokens, ``4·N·C·A + 2·N²·A`` per attention (qkv, proj, ``QKᵀ`` and ``PV``; A the
attention width), ``2·N'·C·Hd`` per MLP (Hd the hidden width) where ``N'`` are the tokens that enter it, and
the classifier heads. ``2 x`` this equals ``torch.utils.flop_counter.FlopCounterMode`` on the same layers.
"""
from __future__ import annotations

from typing import Iterable, Tuple


def attention_macs(n: int, dim: int, attn_dim: int) -> int:
    """qkv + output projection + ``QKᵀ`` + ``PV`` for ``n`` tokens."""
    return 4 * n * dim * attn_dim + 2 * n * n * attn_dim


def mlp_macs(n: int, dim: int, hidden: int) -> int:
    """Two linear layers ``dim -> hidden -> dim`` for ``n`` tokens."""
    return 2 * n * dim * hidden


def vit_macs(
    blocks: Iterable[Tuple[int, int]],
    *,
    dim: int,
    attn_dim: int,
    mlp_hidden: int,
    embed_macs: int = 0,
    head_macs: int = 0,
) -> int:
    """Total MACs for ``blocks = [(tokens into attention, tokens into MLP), ...]``."""
    total = embed_macs + head_macs
    for n_attn, n_mlp in blocks:
        total += attention_macs(n_attn, dim, attn_dim) + mlp_macs(n_mlp, dim, mlp_hidden)
    return total
