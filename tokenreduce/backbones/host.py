"""What every reduction host does the same way, whatever the model family.

A host is a transformer layer that an adapter has given a reduction site (a timm ``Block``, a HF
``CLIPEncoderLayer``). Each adapter knows how to run its layer; these functions are the model-independent
rest: combining masks, handing the method the analysis it asked for, applying its result to the per-forward
state, and reporting it.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Optional

import torch

from ..methods.base import ReductionMethod
from ..state import ForwardState, ReductionInfo, TokenState

#: Analysis inputs computed from the attention's queries / keys.
ANALYSIS: FrozenSet[str] = frozenset({"keys", "keys_per_head", "cls_attn", "attn"})


def attention_bias(method: ReductionMethod, size: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
                   n: int) -> Optional[torch.Tensor]:
    """The additive mask a layer's attention gets: the method's size bias plus the caller's mask, if any.

    Args:
        size: ``[B, N']`` current token sizes, or None before any merge (then no bias: fastest SDPA kernel).
        attn_mask: the mask the caller passed to the layer (bool: True = attend, or additive float), or None.
        n: tokens entering the layer.
    """
    bias = method.attention_bias(size if size is not None and size.shape[1] == n else None)
    if attn_mask is None:
        return bias
    if attn_mask.shape[-1] != n:
        raise ValueError(f"the attention mask covers {attn_mask.shape[-1]} tokens but {n} remain after token "
                         "reduction; a mask cannot follow merged tokens (reduce only after the masked layers)")
    if bias is None:
        return attn_mask
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(
            ~attn_mask, float("-inf"))
    return attn_mask + bias.to(attn_mask.dtype)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Post-softmax attention ``[B, H, Nq, N]`` of queries ``q [B, H, Nq, d]`` over keys ``k [B, H, N, d]``.

    ``bias`` is the additive mask the layer's attention saw (broadcastable to the logits). O(Nq·N·d).
    """
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def analysis_inputs(q: Optional[torch.Tensor], k: torch.Tensor, needs: FrozenSet[str], scale: float,
                    bias: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """What a method asked for, from one attention layer's queries and keys ``[B, H, N, d]``.

    Returns any of ``keys [B, N, d]`` (mean over heads), ``keys_per_head [B, H, N, d]``, ``cls_attn [B, N]``
    (head-mean attention row of token 0: one query, not the whole matrix) and ``attn [B, H, N, N]``.
    """
    out: Dict[str, torch.Tensor] = {}
    if "keys" in needs:
        out["keys"] = k.mean(dim=1)
    if "keys_per_head" in needs:
        out["keys_per_head"] = k
    if "attn" in needs:
        out["attn"] = attention_probs(q, k, scale, bias)
        if "cls_attn" in needs:
            out["cls_attn"] = out["attn"][:, :, 0].mean(dim=1)
    elif "cls_attn" in needs:
        cls_bias = bias[..., :1, :] if bias is not None and bias.dim() == 4 and bias.shape[-2] > 1 else bias
        out["cls_attn"] = attention_probs(q[:, :, :1], k, scale, cls_bias)[:, :, 0].mean(dim=1)
    return out


def token_state(fs: ForwardState, x: torch.Tensor, layer: int, num_prefix: int, trace_source: bool,
                analysis: Dict[str, torch.Tensor]) -> TokenState:
    """The state handed to a method at a reduction site."""
    state = TokenState(x=x, size=fs.ensure_size(x), source=fs.ensure_source(x) if trace_source else None,
                       num_prefix=num_prefix, layer=layer)
    for name, value in analysis.items():
        if name == "keys_per_head":
            state.extras[name] = value
        else:
            setattr(state, name, value)
    return state


def reduce_tokens(fs: ForwardState, method: ReductionMethod, state: TokenState) -> torch.Tensor:
    """Run the method and record its result in the per-forward state; returns the new hidden states."""
    out = method.reduce(state)
    if out is state:
        return state.x
    n = out.x.shape[1]
    if out.size.shape[1] != n or (out.source is not None and out.source.shape[1] != n):
        raise RuntimeError(f"{method.name} returned an inconsistent token state at layer {state.layer}")
    fs.size, fs.source = out.size, out.source
    kept = out.extras.get("kept")
    if kept is not None:
        fs.kept[state.layer] = kept
    return out.x


def reduction_info(fs: Optional[ForwardState], trace_source: bool, flops: int) -> ReductionInfo:
    """``info(model)`` from the per-forward state of the last forward."""
    if fs is None or not fs.blocks:
        raise RuntimeError("no forward has run since the model was patched: call the model first")
    batch, dtype, device = fs.extras["out"]
    n_out = fs.blocks[-1][2]
    size = fs.size if fs.size is not None else torch.ones(batch, n_out, dtype=dtype, device=device)
    source = fs.source
    if trace_source and source is None:
        source = torch.eye(n_out, dtype=dtype, device=device).expand(batch, n_out, n_out)
    return ReductionInfo(
        size=size.detach(),
        source=source.detach() if source is not None else None,
        tokens_per_layer=[b[0] for b in fs.blocks],
        flops=torch.tensor(float(flops), dtype=torch.float64),  # 0-d: the fixture checker compares tensors
        kept=dict(fs.kept),
    )
