"""What a method may know about the model it runs in, resolved at patch time."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple


@dataclass(frozen=True)
class CostModel:
    """An adapter's analytic MAC model (per image) of its host layers, in coefficient form:

    ``MACs = constant + sum_l (attn_linear[l]·N_l + attn_quadratic[l]·N_l² + mlp[l]·M_l
                               + preview_linear[l]·P_l + attn_quadratic[l]/2·P_l²)``

    with ``N_l`` the tokens entering layer l's attention, ``M_l`` those entering its MLP and ``P_l`` those of a
    look-ahead pass (q/k/v projections and ``QKᵀ``, no ``PV``) a ``BLOCK_IN`` method read before reducing. A layer
    whose attention took probabilities a method gave runs no ``QKᵀ``: its quadratic term is the ``PV`` product
    alone, ``attn_quadratic[l]/2·V_l²`` over its ``V_l`` keys, instead of ``attn_quadratic[l]·N_l²``; projections
    no pass read (a look-ahead pass's v, such a layer's q and k) are not computed and come off. Methods that meet a
    FLOPs budget (``target_flops``) or learn one (DiffRate, LTMP) use it; ``tokenreduce.info`` reports the same.

    Attributes:
        constant: what does not depend on the token counts (patch embedding on the patch tokens, heads).
        embed_per_token: patch-embedding MACs per token (DiffRate's counter also charges the prefix tokens).
    """

    constant: float
    attn_linear: Tuple[float, ...]
    attn_quadratic: Tuple[float, ...]
    mlp: Tuple[float, ...]
    embed_per_token: float = 0.0
    preview_linear: Tuple[float, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.mlp)

    def macs(self, blocks: Sequence[Tuple[int, ...]]) -> int:
        """MACs for ``[(tokens into attention, tokens into MLP[, tokens of a look-ahead pass[, keys of a given
        P·V[, MACs of projections skipped]]])]`` per layer (layers not listed did not run)."""
        total = self.constant
        for l, (n, m, *rest) in enumerate(blocks):
            pv = rest[1] if len(rest) > 1 else 0
            quadratic = 0.5 * pv * pv if pv else n * n
            total += self.attn_linear[l] * n + self.attn_quadratic[l] * quadratic + self.mlp[l] * m
            total -= rest[2] if len(rest) > 2 else 0
            p = rest[0] if rest else 0
            if p:
                total += self.preview_linear[l] * p + 0.5 * self.attn_quadratic[l] * p * p
        return int(round(total))


@dataclass(frozen=True)
class Geometry:
    """The model as a method sees it.

    Attributes:
        num_blocks: reduction hosts (transformer blocks or decoder layers) in order.
        num_prefix: protected leading tokens (CLS, dist, registers): always kept, always first.
        num_patches: patch tokens at the model's default input size (None when it varies, e.g. Qwen2-VL).
        dim: hidden width.
        num_heads: attention heads.
        has_class_token: whether token 0 is a CLS token (some methods rank by its attention).
        grid: ``(rows, cols)`` of the patch tokens at the default input size, when known.
        cost: the adapter's MAC model at the default input size (None when it has none); lets a method resolve
            a FLOPs budget at patch time.
        site: the site the method is bound to (for a method that can act at several).
        blocks_note: what ``num_blocks`` counts when it is not plain (e.g. "the 2 vision-tower layers that feed
            LLaVA's features"); ``patch`` adds it to a method's error about block counts.
    """

    num_blocks: int
    num_prefix: int
    num_patches: Optional[int]
    dim: int
    num_heads: int
    has_class_token: bool = True
    grid: Optional[Tuple[int, int]] = None
    cost: Optional[CostModel] = None
    site: Optional[Any] = None
    blocks_note: str = ""

    @property
    def num_tokens(self) -> Optional[int]:
        """Tokens entering the first block at the default input size (prefix included), or None."""
        return None if self.num_patches is None else self.num_patches + self.num_prefix
