"""Prompt bookkeeping for vision methods in a VLM, as pure functions: find each image's run of image tokens and shrink
it to the number of features the (reduced) vision tower returned, so users pass processor outputs unchanged."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch


def image_runs(row: torch.Tensor, image_token_id: int) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` of the maximal runs of ``image_token_id`` in a 1-D id tensor, in order."""
    is_img = (row == image_token_id).to(torch.int8)
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts = (edges == 1).nonzero()[:, 0].tolist()
    ends = (edges == -1).nonzero()[:, 0].tolist()
    return list(zip(starts, ends))


def _split_runs(runs: List[List[Tuple[int, int]]], num_images: int) -> List[List[Tuple[int, int]]]:
    """Split runs holding several adjacent images (``<image><image>``) into one run per image, when every run is a
    whole number of equally long images; ValueError otherwise."""
    total = sum(e - s for row in runs for s, e in row)
    if num_images <= 0 or total % num_images:
        raise ValueError(f"the prompt holds {sum(len(r) for r in runs)} runs of image tokens ({total} tokens) but "
                         f"{num_images} images came back from the vision tower")
    per = total // num_images
    out = []
    for row in runs:
        split = []
        for s, e in row:
            if (e - s) % per:
                raise ValueError(f"an image-token run of {e - s} tokens is not a whole number of {per}-token images")
            split += [(t, t + per) for t in range(s, e, per)]
        out.append(split)
    return out


def shrink_image_runs(input_ids: torch.Tensor, image_token_id: int, counts: Sequence[int],
                      attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None, pad_token_id: int = 0,
                      grow: bool = False) -> Dict[str, torch.Tensor]:
    """Shrink each image's run of image tokens to the number of features the (reduced) vision tower returned.

    Args:
        input_ids: ``[B, S]`` prompt ids with one run of ``image_token_id`` per image (as the processor makes them).
        image_token_id: the model's ``config.image_token_id``.
        counts: features per image, in batch-major, left-to-right order (``len(get_image_features(...).pooler_output)``
            entries).
        attention_mask: ``[B, P + S]`` (P cached tokens before this chunk) or None.
        labels: ``[B, S]`` or None; position_ids: ``[B or 1, S]`` or None.
        pad_token_id: used only when rows end up with different lengths and must be re-padded.
        grow: also lengthen a run that is shorter than its count (a model whose reduced layout can exceed the
            processor's count for some images, e.g. anyres crops kept whole where the processor unpads); the added
            slots copy the run's last token (its mask; label -100) and continue its positions. Without it such a run
            is an error.

    Returns:
        ``{"input_ids", "attention_mask", "labels", "position_ids"}`` (the given ones), each run keeping its first
        ``count`` positions. Later positions shift so they stay contiguous. Rows that end up shorter than the
        longest are re-padded on the side the mask shows (left when the last column is all ones).
    """
    b, s = input_ids.shape
    device = input_ids.device
    runs = [image_runs(input_ids[i], image_token_id) for i in range(b)]
    if sum(len(r) for r in runs) != len(counts):
        runs = _split_runs(runs, len(counts))
    # per row: the source column of every output slot, its position shift, and whether it is an added slot
    sources, shifts, added = [], [], []
    it = iter(counts)
    for i, row in enumerate(runs):
        src: List[int] = []
        adj: List[int] = []
        new: List[bool] = []
        cursor = shift = 0
        for start, end in row:
            c, n = int(next(it)), end - start
            if c > n and not grow:
                raise ValueError(f"an image has {c} features but only {n} image tokens in the prompt")
            src += range(cursor, start + min(c, n))
            adj += [shift] * (start + min(c, n) - cursor)
            new += [False] * (start + min(c, n) - cursor)
            if c > n:
                src += [end - 1] * (c - n)
                adj += [shift + k for k in range(1, c - n + 1)]
                new += [True] * (c - n)
            shift += c - n
            cursor = end
        src += range(cursor, s)
        adj += [shift] * (s - cursor)
        new += [False] * (s - cursor)
        sources.append(torch.tensor(src, dtype=torch.long, device=device))
        shifts.append(torch.tensor(adj, dtype=torch.long, device=device))
        added.append(torch.tensor(new, dtype=torch.bool, device=device))
    out: Dict[str, torch.Tensor] = {}
    chunk_mask = attention_mask[:, -s:] if attention_mask is not None else None
    pad_left = chunk_mask is None or bool((chunk_mask[:, -1] != 0).all())
    width = max(int(t.shape[0]) for t in sources)

    def pack(t: torch.Tensor, fill, per_row=None) -> torch.Tensor:
        t = t.expand(b, -1) if t.shape[0] != b else t
        rows = []
        for i in range(b):
            kept = t[i][sources[i]]
            if per_row is not None:
                kept = per_row(i, kept)
            pad = t.new_full((width - kept.shape[0],), fill)
            rows.append(torch.cat([pad, kept]) if pad_left else torch.cat([kept, pad]))
        return torch.stack(rows)

    out["input_ids"] = pack(input_ids, pad_token_id)
    if attention_mask is not None:
        out["attention_mask"] = torch.cat([attention_mask[:, :-s], pack(chunk_mask, 0)], dim=1)
    if labels is not None:
        out["labels"] = pack(labels, -100, lambda i, t: t.masked_fill(added[i], -100))
    if position_ids is not None:
        out["position_ids"] = pack(position_ids, 0, lambda i, t: t + shifts[i])
    return out


def keep_columns(keep: torch.Tensor, tensors: Dict[str, Tuple[torch.Tensor, int]], pad_left: bool
                 ) -> Dict[str, torch.Tensor]:
    """Keep chosen columns of a prompt, re-padded (the general form of :func:`shrink_image_runs`, for an adapter that
    chooses which image-token slots survive, e.g. to keep the M-RoPE positions of the kept visual tokens).

    Args:
        keep: ``[B, S]`` bool, the columns each row keeps.
        tensors: ``{name: (tensor, fill)}`` with tensors ``[B, S]`` or ``[A, B, S]`` (multi-axis position ids), and the
            value padding columns get.
        pad_left: rows shorter than the longest are padded in front (else behind).

    Returns:
        ``{name: [B, S']}`` (or ``[A, B, S']``), ``S'`` the longest row's kept count; kept columns keep their order.
    """
    b, s = keep.shape
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if b else 0
    # the destination column of every kept entry: kept ones in order, shifted right by the row's padding
    dest = keep.long().cumsum(dim=1) - 1 + ((width - lengths)[:, None] if pad_left else 0)
    rows, cols = keep.nonzero(as_tuple=True)
    out: Dict[str, torch.Tensor] = {}
    for name, (t, fill) in tensors.items():
        lead = t.shape[:-2]
        t = t.expand(*lead, b, s) if t.shape[-2] != b else t
        new = t.new_full((*lead, b, width), fill)
        new[..., rows, dest[rows, cols]] = t[..., rows, cols]
        out[name] = new
    return out


def restore_prompt(sequences: torch.Tensor, prompt: torch.Tensor, shrunk_len: int) -> torch.Tensor:
    """``generate`` output ``[B·k, shrunk_len + T]`` -> the caller's prompt ``[B, S]`` (repeated k times) + the T new
    tokens, so slicing with the caller's prompt length gives the answer."""
    k = sequences.shape[0] // prompt.shape[0]
    return torch.cat([prompt.to(sequences.device).repeat_interleave(k, dim=0), sequences[:, shrunk_len:]], dim=1)


def left_align(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
               ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Move every row's padding in front of its tokens (``[B, S]`` each), or None when it already is there.

    ``generate`` of a decoder-only model continues every row after its last column, so a right-padded row would
    continue after its padding; transformers warns and gives that row a different answer. Stable per row: the
    tokens keep their order.
    """
    if attention_mask is None or attention_mask.shape != input_ids.shape:
        return None
    valid = attention_mask != 0
    if bool(valid[:, -1].all()) or not bool((~valid).any()):
        return None
    order = valid.to(torch.int8).argsort(dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order)
