"""The token-state contract between adapters and methods, and the per-forward record behind `info()`.

An adapter builds a :class:`TokenState` at every reduction site, hands it to the method, and continues the
model with the (smaller) state the method returns. A method never sees the model; an adapter never sees the
method's internals. Everything that lives for exactly one forward pass is held by one :class:`ForwardState`,
created at the start of each forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

import torch


@dataclass
class TokenState:
    """Tokens at one reduction site.

    Attributes:
        x: ``[B, N, C]`` the hidden states.
        size: ``[B, N]`` how many input tokens each token stands for (float; ones before any merge).
        source: ``[B, N, N0]`` 0/1 membership of input tokens, or None when not traced.
        num_prefix: number of prefix tokens (CLS, dist, registers): always kept, always first.
        layer: index of the block this site belongs to.
        keys: ``[B, N, Ck]`` attention keys averaged over heads (when the method needs ``"keys"``).
        cls_attn: ``[B, N]`` head-averaged attention of the CLS query over all tokens (``"cls_attn"``).
        attn: ``[B, H, N, N]`` post-softmax attention probabilities (``"attn"``).
        extras: anything else an adapter provides by name (e.g. ``"keys_per_head"`` ``[B, H, N, d]``).
    """

    x: torch.Tensor
    size: torch.Tensor
    source: Optional[torch.Tensor] = None
    num_prefix: int = 0
    layer: int = 0
    keys: Optional[torch.Tensor] = None
    cls_attn: Optional[torch.Tensor] = None
    attn: Optional[torch.Tensor] = None
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def replace(self, **changes: Any) -> "TokenState":
        """A copy with some fields changed (the analysis fields are dropped: they describe the old tokens)."""
        changes.setdefault("keys", None)
        changes.setdefault("cls_attn", None)
        changes.setdefault("attn", None)
        return replace(self, **changes)


@dataclass
class ReductionInfo:
    """What the last forward of a patched model did (returned by :func:`tokenreduce.info`).

    Attributes:
        size: ``[B, N]`` float, input tokens each output token stands for.
        source: ``[B, N, N0]`` 0/1, or None unless the model was patched with ``trace_source=True``.
        tokens_per_layer: tokens entering each block.
        flops: analytic multiply-accumulates per image of the last forward (see ``tokenreduce.ops.flops``), a
            0-d float64 tensor (exact for any integer count below 2**53; ``int(info.flops)`` for a number).
        kept: per reduction site, the ``[B, N_out]`` indices (into that site's input) of the tokens that
            survived, for pruning methods that record them; empty for pure merging.
    """

    size: Optional[torch.Tensor]
    source: Optional[torch.Tensor]
    tokens_per_layer: List[int]
    flops: torch.Tensor
    kept: Dict[int, torch.Tensor] = field(default_factory=dict)


class ForwardState:
    """Mutable state of one forward pass. Created fresh at the start of every forward.

    ``blocks`` collects, per block, ``(tokens entering, tokens entering the MLP, tokens leaving)``, which is
    all the analytic FLOP model needs.
    """

    def __init__(self) -> None:
        self.size: Optional[torch.Tensor] = None
        self.source: Optional[torch.Tensor] = None
        self.blocks: List[tuple] = []
        self.kept: Dict[int, torch.Tensor] = {}
        self.extras: Dict[str, Any] = {}
        # Filled by the adapter while a block runs (attention taps), cleared after the block.
        self.taps: Dict[str, torch.Tensor] = {}

    def ensure_size(self, x: torch.Tensor) -> torch.Tensor:
        """``size [B, N]``, created as ones the first time it is asked for."""
        if self.size is None or self.size.shape[:2] != x.shape[:2]:
            self.size = x.new_ones(x.shape[:2])
        return self.size

    def ensure_source(self, x: torch.Tensor) -> torch.Tensor:
        """``source [B, N, N0]``, created as the identity the first time it is asked for."""
        if self.source is None:
            b, n = x.shape[:2]
            self.source = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
        return self.source
