"""The per-forward record: everything that lives for exactly one forward pass of a patched model.

An adapter starts a fresh :class:`ForwardRecord` at the start of every forward (or when a hand-written loop
calls the first block again), writes what each layer did into it, and builds ``tokenreduce.info`` from it. No
other per-forward state exists: methods are stateless between forwards (their per-forward value is
``carry``), and adapters keep only the last record.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch


class Status(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class LayerRecord:
    """What one reduction host (block / layer) did: tokens entering its attention, its MLP, and leaving it, and
    the tokens of a look-ahead pass of its attention projections (``BLOCK_IN`` methods read the block's attention
    on its input before reducing; 0 when none ran), and, when its attention took probabilities a method gave so
    that no ``QKᵀ`` ran (MCTF's one-step-ahead blocks), the keys of its ``P·V`` product (0 otherwise), and the
    MACs of projections not computed because nothing read them (a look-ahead pass's v, a given-probabilities
    block's q and k)."""

    layer: int
    tokens_in: int
    tokens_mid: int
    tokens_out: int
    tokens_preview: int = 0
    pv_tokens: int = 0
    linear_skipped: int = 0  # MACs per image of q / k / v projections left out because nothing read them


@dataclass
class Taps:
    """Tensors captured from one layer while it runs: its attention's queries, keys, values (``[B, N, H·d]`` or
    ``[B, H, N, d]`` as the adapter records them) and the layer's output. Cleared after every layer."""

    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    out: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self.q = self.k = self.v = self.out = None


@dataclass
class ForwardRecord:
    """One forward pass.

    Attributes:
        layers: what each host did, in call order.
        size / source / valid: the current token sizes ``[B, N]``, sources ``[B, N, N0]`` and valid mask
            ``[B, N]`` (None until a method changed them).
        kept: per reduction site, ``[B, N_out]`` indices of the kept tokens into that site's input.
        carry: the method's per-forward value.
        batch, dtype, device: of the last host's output (for a default ``size``).
        input_hw: the image size of this forward, for FLOP models that depend on it.
        image_mask: ``[B, S]`` the visual tokens of a VLM prompt (set by a VLM adapter before its language model).
        decoder: the decoder pass of a VLM's language model (``backbones.vlm.decoder.DecoderPass``), or None.
        status / error: whether the forward finished, and what it raised if not.
        taps: attention tensors captured inside the current layer.
    """

    layers: List[LayerRecord] = field(default_factory=list)
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    kept: Dict[int, torch.Tensor] = field(default_factory=dict)
    carry: Any = None
    batch: int = 0
    dtype: Optional[torch.dtype] = None
    device: Optional[torch.device] = None
    input_hw: Optional[Tuple[int, int]] = None
    image_mask: Optional[torch.Tensor] = None
    decoder: Any = None
    status: Status = Status.RUNNING
    error: Optional[str] = None
    # A function, not the class itself: torch.compile (dynamo, torch 2.14) cannot trace a class as a dataclass
    # default_factory, and the record is created inside a compiled forward.
    taps: Taps = field(default_factory=lambda: Taps())

    @property
    def last_layer(self) -> int:
        """Index of the last host that ran (-1 before any)."""
        return self.layers[-1].layer if self.layers else -1

    def cost_blocks(self) -> List[Tuple[int, int, int, int, int]]:
        """``[(tokens into attention, tokens into MLP, tokens of a look-ahead pass, keys of a given P·V, MACs of
        projections skipped)]`` per host that ran, for a :class:`~tokenreduce.core.CostModel`."""
        return [(l.tokens_in, l.tokens_mid, l.tokens_preview, l.pv_tokens, l.linear_skipped) for l in self.layers]

    def ensure_size(self, x: torch.Tensor) -> torch.Tensor:
        """``size [B, N]``, created as ones the first time it is asked for (or when the tokens changed under it)."""
        if self.size is None or self.size.shape[:2] != x.shape[:2]:
            self.size = x.new_ones(x.shape[:2])
        return self.size

    def ensure_source(self, x: torch.Tensor) -> torch.Tensor:
        """``source [B, N, N0]``, created as the identity the first time it is asked for."""
        if self.source is None or self.source.shape[:2] != x.shape[:2]:
            b, n = x.shape[:2]
            self.source = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
        return self.source

    def finish_layer(self, layer: int, n_in: int, n_mid: int, out: torch.Tensor, n_preview: int = 0,
                     pv_tokens: int = 0, linear_skipped: int = 0) -> None:
        """Record a host's token counts and its output's batch, dtype and device."""
        self.layers.append(LayerRecord(layer, n_in, n_mid, out.shape[1], n_preview, pv_tokens, linear_skipped))
        self.batch, self.dtype, self.device = out.shape[0], out.dtype, out.device
        self.taps.clear()

    def fail(self, error: BaseException) -> None:
        self.status = Status.FAILED
        self.error = f"{type(error).__name__}: {error}"
