"""Tiny random Qwen2.5-VL / Qwen3-VL models and prompts (images of any grid, videos) for the Qwen-VL tests (no
downloads). The prompts follow the processors' layout: ``<vision_start>`` + one placeholder per merged token +
``<vision_end>`` per image; a Qwen2.5-VL video is one such run, a Qwen3-VL video one run per frame with a timestamp
(text) in front of each."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

import transformers  # noqa: E402  (a dev dependency; missing, the Qwen-VL tests must fail, not vanish)

V_START, V_END, IMG, VID, PAD = 58, 59, 60, 61, 0
PATCH = 4            # pixels per patch side
CHANNELS = 3 * 2 * PATCH * PATCH  # in_channels · temporal_patch_size · patch²: one row of pixel_values


def _noise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # far from uniform attention and from ties
            p.add_(torch.randn_like(p) * 0.05)
    return model.double().eval()


def tiny_qwen(kind: str = "qwen2.5", seed: int = 0, depth: int = 4, fullatt: Sequence[int] = (1, 3),
              lm_layers: int = 4, attn: str = "sdpa", deepstack: Sequence[int] = (0, 1, 2)) -> torch.nn.Module:
    """A random ``Qwen2_5_VLForConditionalGeneration`` (``kind="qwen2.5"``: windowed tower, full attention in
    ``fullatt``, 2×2 merge windows) or ``Qwen3VLForConditionalGeneration`` (``"qwen3"``: deepstack mergers after the
    blocks ``deepstack``), float64, eval; M-RoPE sections that give every axis its own channels."""
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=lm_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2)
    vision = dict(depth=depth, hidden_size=32, intermediate_size=48, num_heads=4, in_channels=3, patch_size=PATCH,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=V_START, vision_end_token_id=V_END)
    if kind == "qwen2.5":
        text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])
        cfg = transformers.Qwen2_5_VLConfig(
            vision_config=dict(vision, window_size=4 * PATCH, fullatt_block_indexes=list(fullatt),
                               tokens_per_second=2),
            text_config=text, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif kind == "qwen3":
        text.update(head_dim=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                                     mrope_interleaved=True))
        cfg = transformers.Qwen3VLConfig(
            vision_config=dict(vision, num_position_embeddings=64, deepstack_visual_indexes=list(deepstack)),
            text_config=text, **ids)
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(kind)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return _noise(cls(cfg), seed)


@dataclass
class Visual:
    """One image (``t == 1``) or video of a prompt: its patch grid and pixel rows ``[t·h·w, CHANNELS]``."""

    kind: str
    grid: Tuple[int, int, int]
    pixels: torch.Tensor

    @property
    def merged(self) -> int:
        t, h, w = self.grid
        return t * h * w // 4


def visual(kind: str, grid: Tuple[int, int, int], seed: int) -> Visual:
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    return Visual(kind, grid, torch.randn(t * h * w, CHANNELS, generator=g, dtype=torch.float64))


def sample(model_kind: str, visuals: Sequence[Visual], before: int, after: int, seed: int) -> torch.Tensor:
    """The ids of one prompt: ``before`` text tokens, the visuals in order, ``after`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 50, (n,), generator=g)  # noqa: E731
    parts = [text(before)]
    for v in visuals:
        t, h, w = v.grid
        token = IMG if v.kind == "image" else VID
        if v.kind == "video" and model_kind == "qwen3":
            for _ in range(t):  # "<t seconds>" in front of every frame's run
                parts += [text(1), torch.tensor([V_START]), torch.full((h * w // 4,), token), torch.tensor([V_END])]
        else:
            parts += [torch.tensor([V_START]), torch.full((v.merged,), token), torch.tensor([V_END])]
    parts.append(text(after))
    return torch.cat(parts)


def batch(rows: Sequence[torch.Tensor], visuals: Sequence[Sequence[Visual]], side: str = "left"
          ) -> Dict[str, torch.Tensor]:
    """Processor-like inputs of several prompts, padded on ``side``: ids, mask, ``mm_token_type_ids``, pixels and
    grids of the images and of the videos (batch-major order)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    out: Dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask,
                                    "mm_token_type_ids": ((ids == IMG).int() + 2 * (ids == VID).int())}
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        chosen = [v for vs in visuals for v in vs if v.kind == kind]
        if chosen:
            out[pixels] = torch.cat([v.pixels for v in chosen])
            out[grid] = torch.tensor([list(v.grid) for v in chosen])
    return out


def greedy(model, inputs: Dict[str, torch.Tensor], max_new_tokens: int = 3):
    """``(new tokens [B, T], logits [B, T, V])`` of greedy generation."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(list(out.logits), 1)


def scenario(model_kind: str, with_video: bool = True, seed: int = 0, equal: bool = False
             ) -> Tuple[List[torch.Tensor], List[List[Visual]]]:
    """Three prompts of different lengths: one 4×6-patch image; a 8×4 and a 4×4 image; a 2-frame 4×4 video (or,
    without video, a 6×4 image). With ``equal``, every prompt holds 6 merged tokens of a different grid (4×6, 6×4,
    2×12), the video one 6 too (3 frames of 2×4)."""
    if equal:
        vis = [[visual("image", (1, 4, 6), seed + 1)], [visual("image", (1, 6, 4), seed + 2)],
               [visual("video", (3, 2, 4), seed + 4)] if with_video else [visual("image", (1, 2, 12), seed + 4)]]
    else:
        vis = [[visual("image", (1, 4, 6), seed + 1)],
               [visual("image", (1, 8, 4), seed + 2), visual("image", (1, 4, 4), seed + 3)],
               [visual("video", (2, 4, 4), seed + 4)] if with_video else [visual("image", (1, 6, 4), seed + 4)]]
    lengths = [(3, 4), (5, 2), (2, 6)]
    rows = [sample(model_kind, v, a, b, seed + 10 + i) for i, (v, (a, b)) in enumerate(zip(vis, lengths))]
    return rows, vis


def alone(rows: Sequence[torch.Tensor], visuals: Sequence[Sequence[Visual]], i: int) -> Dict[str, torch.Tensor]:
    return batch([rows[i]], [visuals[i]])


def placeholder_slots(ids: torch.Tensor, token: int) -> List[Tuple[int, int]]:
    """``[(row, column)]`` of every placeholder of ``token``, batch-major, left to right."""
    return [tuple(rc) for rc in (ids == token).nonzero().tolist()]


def cache_of(out):
    """The KV cache a forward returned: ``out.cache`` since transformers 5.24, ``out.past_key_values`` before."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def cache_kwarg(module) -> str:
    """The name ``module.forward`` takes the KV cache by (``cache`` since transformers 5.24, ``past_key_values``
    before)."""
    import inspect
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
