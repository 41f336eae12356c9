"""The prompt of a Qwen2.5-VL / Qwen3-VL whose vision tower returned fewer tokens: which placeholder slots survive and
the 3-D M-RoPE positions they keep.

The processor puts one placeholder per merged token (``<|image_pad|>`` / ``<|video_pad|>``), an image's in raster
order (a Qwen3-VL video's in one run per frame, timestamps between them). The model's own ``get_rope_index`` gives
every slot of the *full* prompt its (t, h, w) position (text: the same value on the three axes). After a reduction,
the slot of merged token ``i`` of an image survives exactly when the image kept token ``i``, and keeps its position;
text keeps its positions; the rows are re-padded. Decoding then continues from each row's largest position + 1,
which is what ``generate`` does with explicit 3-D ``position_ids`` and what the model's ``rope_deltas`` give a
decode step on the shrunk mask (:func:`rope_deltas`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..vlm.prompt import keep_columns


def token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """``[B, S]`` int: 0 text, 1 image placeholder, 2 video placeholder (the processor's ``mm_token_type_ids``)."""
    return (input_ids == image_token_id).to(torch.int32) + 2 * (input_ids == video_token_id).to(torch.int32)


def surviving_slots(input_ids: torch.Tensor, token_id: int, sizes: Sequence[int],
                    kept: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, S]`` bool: the placeholder slots of ``token_id`` that survive.

    Args:
        input_ids: ``[B, S]`` the full prompt.
        token_id: the modality's placeholder.
        sizes: merged tokens of each image (or video), in the order the encoder got them (batch-major, left to
            right); image ``i`` owns the next ``sizes[i]`` placeholders of that order.
        kept: per image, the indices (among its merged tokens) it kept.

    Raises:
        ValueError: the prompt does not hold one placeholder per merged token.
    """
    rows, cols = (input_ids == token_id).nonzero(as_tuple=True)  # row-major: batch-major, left to right
    if rows.numel() != sum(sizes):
        raise ValueError(f"the prompt holds {rows.numel()} placeholder tokens ({token_id}) but the vision tower's "
                         f"grids give {sum(sizes)} merged tokens; pass the processor's prompt unchanged (tokenreduce "
                         "shrinks it to the kept tokens itself)")
    out = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    start = 0
    for size, index in zip(sizes, kept):
        slot = start + index.to(rows.device)
        out[rows[slot], cols[slot]] = True
        start += size
    return out


def rope_deltas(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` what a decode step adds to the count of real tokens so far to get the next position: each row's
    largest real position + 1 minus its real token count (the model's ``rope_deltas`` for the shrunk prompt)."""
    valid = attention_mask.bool()
    largest = position_ids.masked_fill(~valid[None], -1).amax(dim=(0, 2))
    return (largest + 1 - valid.sum(dim=1))[:, None]


def shrink_prompt(input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  survive: torch.Tensor, placeholders: torch.Tensor, pad_token_id: int,
                  labels: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None
                  ) -> Dict[str, torch.Tensor]:
    """The prompt with only the surviving placeholders, every tensor re-padded alike.

    Args:
        input_ids: ``[B, S]``; positions: ``[A, B, S]`` the full prompt's position ids (``A = 3``, or 4 with a text
            row first).
        attention_mask: ``[B, S]`` or None (all real).
        survive: ``[B, S]`` surviving placeholder slots; placeholders: ``[B, S]`` every placeholder slot.
        labels, token_type_ids: ``[B, S]`` when given.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` and the given ``labels`` / ``mm_token_type_ids``, padded on
        the side the mask shows (left when every row's last column is real).
    """
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    keep = (mask != 0) & (~placeholders | survive)  # padding is made anew
    pad_left = bool((mask[:, -1] != 0).all())
    tensors: Dict[str, Any] = {"input_ids": (input_ids, pad_token_id), "attention_mask": (mask, 0),
                               "position_ids": (positions, 0)}
    if labels is not None:
        tensors["labels"] = (labels, -100)
    if token_type_ids is not None:
        tensors["mm_token_type_ids"] = (token_type_ids, 0)
    return keep_columns(keep, tensors, pad_left)


def kept_indices(rows: List[Dict[str, Any]]) -> List[torch.Tensor]:
    """The ``index`` of every row description of a features call, in order."""
    return [r["index"] for r in rows]
