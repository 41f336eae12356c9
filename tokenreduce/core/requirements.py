"""Where a method acts (:class:`Site`) and what it may read from the adapter (the needs vocabulary).

A method declares both next to its code; an adapter declares, per site, which needs it can provide. ``patch``
checks the pair before it touches the model, so an unsupported combination is refused with an error instead of
running with something missing.
"""
from __future__ import annotations

import enum
from typing import Dict, FrozenSet


class Site(str, enum.Enum):
    """Where in a model a method acts."""

    BLOCK_IN = "block_in"    # at the start of a block, before its attention (MCTF's one-step-ahead merge)
    BLOCK_MID = "block_mid"  # inside a block, after the attention residual, before the MLP (ToMe, DiffRate)
    BLOCK_OUT = "block_out"  # between two blocks (Zero-TPrune, EViT)
    TOWER_OUT = "tower_out"  # at a vision tower's output, before the projector (VisionZip, DivPrune)
    LLM_LAYER = "llm_layer"  # before a language-model decoder layer, during prefill (DART, FastV)


class Need(str, enum.Enum):
    """Everything a method can ask an adapter for. Each is a field of :class:`~tokenreduce.core.TokenState`
    (``state.<value>``), filled only when declared."""

    # -- from the attention of the layer the site belongs to (the block just run; the LLM layer before the site)
    KEYS = "keys"                        # [B, N, d] keys averaged over heads
    KEYS_PER_HEAD = "keys_per_head"      # [B, H, N, d] keys (post-RoPE inside an LLM)
    VALUES_PER_HEAD = "values_per_head"  # [B, H, N, d] values
    CLS_ATTN = "cls_attn"                # [B, N] head-mean attention row of token 0 (one extra q_cls·Kᵀ)
    CLS_ATTN_PER_HEAD = "cls_attn_per_head"  # [B, H, N] the same row per head
    ATTN = "attn"                        # [B, H, N, N] attention probabilities (only where a method needs it all)
    ATTN_ROWS = "attn_rows"              # callable: query indices [B, Q] -> probabilities [B, H, Q, N]
    NEXT_ATTN_ROWS = "next_attn_rows"    # the same, from the *next* layer's q/k on the current tokens (LLM)
    # -- changing how the model runs
    ATTENTION_PROBS = "attention_probs"  # the method replaces a layer's softmax (DiffRate search, MCTF)
    VALID = "valid"                      # [B, N] bool real tokens; the method may return a per-sample count
    SOURCE = "source"                    # [B, N, N0] sources traced from the input even without trace_source=True
                                         # (a method whose reference reports them, e.g. LTMP, EViT's fused token)
    # -- inside a vision-language model
    IMAGE_MASK = "image_mask"            # [B, N] bool: visual tokens (LLM sites)
    POSITIONS = "positions"              # [B, N] position of each token in its own unpadded prompt (LLM sites)
    NORMED = "normed"                    # [B, N, C] hidden states through the language model's final norm
    PROJECTED = "projected"              # [B, N - p, D] patch features through the VLM's projector (tower out)
    GRID = "grid"                        # (rows, cols) of the patch tokens of each image (tower out)
    INSTRUCTION = "instruction"          # [B] per-call instruction of each image (tokenreduce.instructions; tower out)


#: Every need by name, for validation and error messages.
NEEDS: FrozenSet[str] = frozenset(n.value for n in Need)

#: Needs read from the queries / keys / values of an attention layer.
ATTENTION_NEEDS: FrozenSet[str] = frozenset({Need.KEYS, Need.KEYS_PER_HEAD, Need.VALUES_PER_HEAD, Need.CLS_ATTN,
                                             Need.CLS_ATTN_PER_HEAD, Need.ATTN, Need.ATTN_ROWS})

#: What a site offers by default in a ViT-like layer host (adapters copy and extend this).
VISION_BLOCK_NEEDS: FrozenSet[str] = frozenset({Need.KEYS, Need.KEYS_PER_HEAD, Need.VALUES_PER_HEAD, Need.CLS_ATTN,
                                                Need.CLS_ATTN_PER_HEAD, Need.ATTN, Need.ATTN_ROWS, Need.SOURCE})


def need_names(needs) -> FrozenSet[str]:
    """Normalise a collection of :class:`Need` members or strings to plain strings."""
    return frozenset(n.value if isinstance(n, Need) else str(n) for n in needs)


def describe_provides(provides: Dict[Site, FrozenSet[str]]) -> str:
    """``"block_mid: keys, cls_attn; tower_out: ..."`` for error messages."""
    return "; ".join(f"{site.value}: {', '.join(sorted(needs)) or 'nothing'}" for site, needs in provides.items())
