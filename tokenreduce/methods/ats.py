"""ATS: Adaptive Token Sampling (Fayyaz et al., "Adaptive Token Sampler For Efficient Vision Transformers",
ECCV 2022; adaptivetokensampling/ATS).

In each of ``layers``, between the attention residual and the MLP, every image keeps the tokens that a
deterministic inverse-transform sampling of its significance scores picks (``ops.ats``): the significance of a
token is its CLS attention (summed over heads) times the norm of its value vector; a fixed grid of points on the
min-max normalised CDF of the sorted scores picks the nearest token each, and the distinct picks survive, CLS
first, then in ascending significance. How many survive depends on the image.

Per-image counts travel as padding (``Need.VALID``): the batch is as long as its longest image, shorter images
carry padding tokens with ``valid=False`` and size 0, the host masks them as keys (``-inf``) in every later
attention and size-weighted pooling ignores them, and every step here treats each image on its own valid tokens.
So an image's result never depends on its batch (upstream's does with ``drop_tokens``, see the docs), and
``tokenreduce.info(model).valid`` / ``tokens_per_sample`` report the counts.

Defaults reproduce the official code at 9271257 with its ``configs/ImageNet/DeiT_S.yaml`` evaluation (ATS in
blocks 3..11, no cap, ``DROP_TOKENS: True``) except its ``softmax_eps`` (1e-6 upstream), a numerical guard that
forces an eager attention in every block; it is 0 here (fused attention) and ``softmax_eps=1e-6`` reproduces
upstream to float64 precision.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean, either, integer, layer_list, real
from ..ops.ats import inverse_transform_sampling, sampled_index, significance, smoothed_softmax
from ..ops.merge import gather_tokens
from ..ops.pruning import with_prefix


def _empty(v: Any) -> Optional[str]:
    return None if isinstance(v, (list, tuple)) and len(v) == 0 else "must be [] (no ATS block)"


def default_ats_layers(num_blocks: int) -> List[int]:
    """``floor(d/4) .. d-1``: blocks 3..11 of a 12-block ViT, upstream's DeiT-S setting."""
    return list(range(num_blocks // 4, num_blocks))


@dataclass
class ATSRun:
    """One forward (the method's carry; ``tokenreduce.info(model).method_state`` after it).

    Attributes:
        num_input: non-prefix tokens at the model's input (upstream fixes the sampling grid by it).
        cls_attn: ``[B, H, N]`` the CLS row of the current block's smoothed softmax (``softmax_eps > 0``).
        tokens: per ATS block, ``[B]`` the tokens each image keeps (prefix included).
    """

    num_input: Optional[int] = None
    cls_attn: Optional[torch.Tensor] = None
    tokens: Dict[int, torch.Tensor] = field(default_factory=dict)


@register_method
class ATS(ReductionMethod):
    name = "ats"
    site = Site.BLOCK_MID
    needs = frozenset({Need.CLS_ATTN_PER_HEAD, Need.VALUES_PER_HEAD, Need.VALID, Need.ATTENTION_PROBS})
    # The default (drop) mode's batch length after an ATS block is data-dependent (its longest image), so its
    # reduce runs outside a compiled graph; an instance in the full-length mode traces whole (see __init__).
    compilable = False
    summary = ("ATS: adaptive token sampling, inverse-transform sampling of CLS-attention x value-norm "
               "significance; a different token count per image (padding + valid mask)")
    params = {
        "keep": Param(None, "at most this many non-prefix tokens per ATS block (the paper's K: grid points of the "
                            "sampling); None, or more than the patches (upstream's NUM_TOKENS 197): no cap",
                      integer(1, optional=True), aliases=("num_tokens",)),
        "layers": Param(None, "ATS blocks (0-based); None: floor(d/4) .. d-1 (3..11 for 12 blocks, upstream's "
                              "DeiT-S setting); [] for none", either(layer_list(), _empty), aliases=("ats_blocks",)),
        "drop_tokens": Param(True, "True: compact each image to its kept tokens (the batch to its longest image); "
                                   "False: upstream's full-length mode, dropped tokens stay as masked zero slots",
                             boolean),
        "softmax_eps": Param(0.0, "smoothing term of upstream's softmax in every block, (e + eps/N) / (sum e + "
                                  "eps); 1e-6 upstream. > 0 evaluates every block's attention eagerly", real(0.0)),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        if not geometry.has_class_token:
            raise ValueError("ats samples tokens by the CLS token's attention, and this model has no class token "
                             "(class_token=False); use zero_tprune or random")
        super().__init__(geometry, **params)
        layers = params.get("layers")
        self.layers: List[int] = list(layers) if layers is not None else default_ats_layers(geometry.num_blocks)
        bad = [layer for layer in self.layers if layer >= geometry.num_blocks]
        if bad:
            raise ValueError(f"ats: layers {bad} are out of range: the model has {geometry.num_blocks} blocks "
                             f"(indices 0..{geometry.num_blocks - 1})")
        self.keep: Optional[int] = params.get("keep")
        self.drop_tokens: bool = bool(params.get("drop_tokens", True))
        self.eps: float = float(params.get("softmax_eps", 0.0))
        # Dropped slots of the full-length mode take part in the smoothed softmax as upstream's zeroed slots do.
        self.padding = "absent" if self.drop_tokens else "zero"
        # The full-length mode keeps every shape static: it traces with fullgraph=True.
        self.compilable = not self.drop_tokens

    # -- the schedule ------------------------------------------------------------------------------------------
    def acts_at(self, layer: int) -> bool:
        # With softmax_eps every block's softmax is replaced (upstream smooths all of them), not only ATS blocks.
        return self.eps > 0 or layer in self.layers

    def needs_at(self, layer: int, training: bool = False) -> FrozenSet[str]:
        needs = set()
        if self.eps > 0:
            needs.add(Need.ATTENTION_PROBS)
        if layer in self.layers:
            needs |= {Need.VALUES_PER_HEAD, Need.VALID}
            if self.eps == 0:
                needs.add(Need.CLS_ATTN_PER_HEAD)  # with eps the CLS row comes from the method's own softmax
        return frozenset(needs)

    def missing_needs_hint(self, missing: FrozenSet[str]) -> str:
        if Need.ATTENTION_PROBS in missing:
            return ("softmax_eps > 0 replaces the softmax of every block, which this model's adapter cannot do; "
                    "use softmax_eps=0 (a plain softmax, the default)")
        return ""

    def begin(self, training: bool) -> Any:
        return ATSRun()

    # -- one forward -------------------------------------------------------------------------------------------
    def attention_probs(self, state: TokenState):
        if self.eps == 0:
            return None
        run: ATSRun = state.carry
        valid, eps, padding = state.valid, self.eps, self.padding
        record = state.layer in self.layers

        def probs(logits: torch.Tensor) -> torch.Tensor:
            out = smoothed_softmax(logits, valid, eps, padding)
            if record:
                run.cls_attn = out[:, :, 0]
            return out

        return probs

    def reduce(self, state: TokenState) -> TokenState:
        if state.layer not in self.layers:
            return state
        run: ATSRun = state.carry
        p, n = state.num_prefix, state.num_tokens
        if run.num_input is None:
            run.num_input = n - p  # the first ATS block sees the input's tokens
        points = run.num_input if self.keep is None else min(self.keep, run.num_input)
        if self.eps > 0:
            if run.cls_attn is None:
                raise RuntimeError("ats with softmax_eps needs the adapter to run attention_probs() before the "
                                   "reduction site")
            cls_row, run.cls_attn = run.cls_attn, None
        else:
            cls_row = state.cls_attn_per_head
        valid = state.valid
        sig = significance(cls_row, state.values_per_head, p, valid)
        body_valid = valid[:, p:] if valid is not None else None
        # Upstream's full-length mode: zeroed slots sort first with cdf 0, so the CDF's minimum is 0 there.
        floor = (~body_valid).any(dim=1) if (not self.drop_tokens and body_valid is not None) else None
        order, picked = inverse_transform_sampling(sig, body_valid, points, floor)
        count = picked.sum(dim=1)
        num_out = n - p if not self.drop_tokens else int(count.max())
        index, out_valid = sampled_index(order, picked, num_out)
        index = with_prefix(index, p)
        out_valid = torch.cat([out_valid.new_ones(out_valid.shape[0], p), out_valid], dim=1)
        keep = out_valid.to(state.x.dtype)
        x = gather_tokens(state.x, index) * keep.unsqueeze(-1)
        size = gather_tokens(state.size, index) * keep.to(state.size.dtype)
        source = None
        if state.source is not None:
            source = gather_tokens(state.source, index) * keep.to(state.source.dtype).unsqueeze(-1)
        run.tokens[state.layer] = count + p
        return state.replace(x=x, size=size, source=source, valid=out_valid,
                             kept=torch.where(out_valid, index, torch.full_like(index, -1)), carry=run)
