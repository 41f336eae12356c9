"""What a method is: a small object that turns the token state at a reduction site into a smaller one.

A method class declares, next to its code, what it needs from the adapter (``needs``), where it acts
(``site``), and its parameters with defaults and validation (``params``). ``tokenreduce.patch`` validates a
method against the model's adapter from these declarations before it touches the model.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Optional, Sequence, Tuple

import torch

from ..state import TokenState


class Site(str, enum.Enum):
    """Where in a model a method acts."""

    BLOCK_MID = "block_mid"  # inside a block, after the attention residual, before the MLP (ToMe, DiffRate)
    BLOCK_OUT = "block_out"  # between two blocks (Zero-TPrune)
    TOWER_OUT = "tower_out"  # at a vision tower's output (VisionZip)
    LLM_LAYER = "llm_layer"  # inside a language-model layer during prefill (DART)


# What an adapter can hand a method, by name (see TokenState).
NEEDS = frozenset({"keys", "cls_attn", "attn", "keys_per_head"})


@dataclass(frozen=True)
class Param:
    """One method parameter: its default, a one-line description, and an optional validator.

    ``check(value)`` returns None when the value is acceptable, else a message saying what is allowed.
    """

    default: Any
    doc: str
    check: Optional[Callable[[Any], Optional[str]]] = None


@dataclass(frozen=True)
class Geometry:
    """What a method may know about the model it runs in, resolved at patch time.

    Attributes:
        num_blocks: reduction hosts (transformer blocks) in order.
        num_prefix: protected leading tokens (CLS, dist, registers).
        num_patches: patch tokens at the model's default input size (None when unknown).
        dim: hidden width.
        num_heads: attention heads.
        has_class_token: whether token 0 is a CLS token (some methods treat it specially).
        macs: the adapter's analytic MACs per image at the default input size for ``[(tokens into attention,
            tokens into MLP)]`` per block (None when the adapter has no FLOP model); lets a method resolve a
            FLOPs budget at patch time.
    """

    num_blocks: int
    num_prefix: int
    num_patches: Optional[int]
    dim: int
    num_heads: int
    has_class_token: bool = True
    macs: Optional[Callable[[Sequence[Tuple[int, int]]], int]] = field(default=None, compare=False, repr=False)


class ReductionMethod:
    """Base class of every method.

    Subclasses set ``name``, ``site``, ``needs``, ``params`` and ``summary`` and implement :meth:`reduce`.
    The constructor receives the geometry and the validated parameters (defaults filled in); it resolves any
    schedule once, so the forward pass only reads static per-layer values.
    """

    name: ClassVar[str] = ""
    site: ClassVar[Site] = Site.BLOCK_MID
    needs: ClassVar[FrozenSet[str]] = frozenset()
    params: ClassVar[Dict[str, Param]] = {}
    summary: ClassVar[str] = ""
    #: True when the method keeps only a subset of tokens (adapters then record kept indices).
    prunes: ClassVar[bool] = False

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        self.geometry = geometry
        self.config = dict(params)
        self.prop_attn: bool = bool(params.get("prop_attn", False))

    def acts_at(self, layer: int) -> bool:
        """Whether the method may change the tokens at this layer's site (static, resolved at patch time)."""
        return True

    def needs_at(self, layer: int) -> FrozenSet[str]:
        """What the method needs from the adapter at this layer (nothing where it does not act)."""
        return self.needs if self.acts_at(layer) else frozenset()

    def attention_bias(self, size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Additive attention bias from the token sizes: ``log(size)`` as ``[B, 1, 1, N]`` with proportional
        attention, None otherwise (and while no token was merged, so the fastest SDPA kernel can run)."""
        if not self.prop_attn or size is None:
            return None
        return size.log()[:, None, None, :]

    def attention_probs(self, layer: int, training: bool) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """A replacement for the softmax of this layer's attention, or None (the default: fused attention).

        The function maps the logits ``[B, H, N, N]`` (scaled ``q·kᵀ`` plus the attention bias) to probabilities
        of the same shape; the adapter then runs that layer's attention eagerly with it. Only a method whose
        gradient must flow through the probabilities needs this (DiffRate's rate search: softmax with a token
        policy). Adapters call it once per block and forward, before the block's reduction site, with the
        block's ``training`` flag.
        """
        return None

    def reduce(self, state: TokenState) -> TokenState:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"
