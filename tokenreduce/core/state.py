"""The token state at a reduction site (:class:`TokenState`) and what ``tokenreduce.info`` reports
(:class:`ReductionInfo`).

An adapter builds a :class:`TokenState` at every reduction site, hands it to the method, and continues the model
with the (smaller) state the method returns. The state is frozen: a method returns ``state.replace(...)``, which
drops the analysis fields (they describe the old tokens), so nothing is aliased between sites.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

#: Query indices ``[B, Q]`` -> attention probabilities ``[B, H, Q, N]`` of those queries over all tokens.
AttentionRows = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TokenState:
    """Tokens at one reduction site. Analysis fields are filled only where the method declared the need
    (:class:`~tokenreduce.core.Need`), and are None otherwise.

    Attributes:
        x: ``[B, N, C]`` hidden states.
        size: ``[B, N]`` how many input tokens each token stands for (float; ones before any merge; 0 for an
            invalid token).
        source: ``[B, N, N0]`` 0/1 membership of input tokens, or None when not traced.
        num_prefix: prefix tokens (CLS, dist, registers): always kept, always first.
        layer: the block (or decoder layer) this site belongs to.
        valid: ``[B, N]`` bool, real tokens (None: all are). Set when tokens are padded, e.g. a per-sample count
            after ATS or prompt padding inside an LLM.
        training: whether the host runs in training mode.
        kept: set by a method that selects: ``[B, N_out]`` index of the input token each output token is (-1
            for a token the method synthesised, e.g. a fused or recycled one).
        carry: the method's own per-forward value (see :meth:`ReductionMethod.begin`), threaded from site to
            site of one forward by the adapter and dropped after it.
        keys, keys_per_head, values_per_head, cls_attn, cls_attn_per_head, attn, attn_rows, next_attn_rows,
        image_mask, positions, normed, projected, grid, instruction: the declared needs; see ``Need``.
    """

    x: torch.Tensor
    size: torch.Tensor
    source: Optional[torch.Tensor] = None
    num_prefix: int = 0
    layer: int = 0
    valid: Optional[torch.Tensor] = None
    training: bool = False
    kept: Optional[torch.Tensor] = None
    carry: Any = None
    # analysis: describes these tokens only (dropped by replace)
    keys: Optional[torch.Tensor] = None
    keys_per_head: Optional[torch.Tensor] = None
    values_per_head: Optional[torch.Tensor] = None
    cls_attn: Optional[torch.Tensor] = None
    cls_attn_per_head: Optional[torch.Tensor] = None
    attn: Optional[torch.Tensor] = None
    attn_rows: Optional[AttentionRows] = None
    next_attn_rows: Optional[AttentionRows] = None
    image_mask: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    normed: Optional[torch.Tensor] = None
    projected: Optional[torch.Tensor] = None
    grid: Optional[Any] = None
    instruction: Optional[Any] = None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    def replace(self, **changes: Any) -> "TokenState":
        """A new state with some fields changed. Analysis fields and ``kept`` are dropped unless given: they
        describe the old tokens. ``image_mask`` and ``valid`` are kept only when the token count is unchanged."""
        reset = {name: None for name in ANALYSIS_FIELDS if name not in changes}
        reset.setdefault("kept", None) if "kept" not in changes else None
        new_n = changes["x"].shape[1] if "x" in changes else self.num_tokens
        for name in ("image_mask", "valid"):
            if name not in changes and new_n != self.num_tokens:
                reset[name] = None
        return dataclasses.replace(self, **{**reset, **changes})


#: Fields of :class:`TokenState` that describe one set of tokens and are dropped by ``replace``.
ANALYSIS_FIELDS: Tuple[str, ...] = ("keys", "keys_per_head", "values_per_head", "cls_attn", "cls_attn_per_head",
                                    "attn", "attn_rows", "next_attn_rows", "positions", "normed", "projected",
                                    "grid", "instruction")


@dataclass
class ReductionInfo:
    """What the last forward of a patched model did (returned by :func:`tokenreduce.info`).

    Attributes:
        size: ``[B, N]`` float, input tokens each output token stands for (0 for padding).
        source: ``[B, N, N0]`` 0/1, or None unless the model was patched with ``trace_source=True`` or the
            method declares ``Need.SOURCE``.
        tokens_per_layer: tokens entering each block (the largest count in the batch where counts differ).
        macs: analytic multiply-accumulates per image of the last forward, a plain Python int (the convention
            of timm and fvcore, which call this number "FLOPs"; see ``tokenreduce.ops.macs``).
        kept: per reduction site, the ``[B, N_out]`` indices (into that site's input) of the tokens that
            survived, for methods that select; empty for pure merging.
        valid: ``[B, N]`` bool real output tokens, when counts differ per sample (ATS); None otherwise.
        tokens_per_sample: ``[B]`` tokens each sample left the last block with (== N unless counts differ).
        method_state: what the method carried through the last forward (its ``carry``; e.g. DiffRate's rate
            search records the kept-count tensors of every block there), or None.
    """

    size: Optional[torch.Tensor]
    source: Optional[torch.Tensor]
    tokens_per_layer: List[int]
    macs: int
    kept: Dict[int, torch.Tensor] = field(default_factory=dict)
    valid: Optional[torch.Tensor] = None
    tokens_per_sample: Optional[torch.Tensor] = None
    method_state: Any = None

    @property
    def flops(self) -> torch.Tensor:
        """The same count as :attr:`macs`, as a 0-d float64 tensor (the form the upstream fixtures record and
        compare; exact for any count below 2**53). Prefer ``macs`` for a plain number."""
        return torch.tensor(float(self.macs), dtype=torch.float64)

    @property
    def gmacs(self) -> float:
        """``macs / 1e9``."""
        return self.macs / 1e9
