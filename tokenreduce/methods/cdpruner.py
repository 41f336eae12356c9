"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", NeurIPS 2025): keep the ``keep`` visual tokens of each image that a determinantal point process conditioned
on the instruction selects — similarity of the projected visual tokens, weighted by each token's relevance to the
instruction in CLIP's joint space, greedy MAP inference — in spatial order.

Reproduces Theia-4869/CDPruner at 9541616 (see ``../shared/fixtures/cdpruner``). The method loads its own CLIP
(``text_encoder``: the text tower, its projection, and the image side's ``post_layernorm`` + ``visual_projection``);
the instruction of each image comes per call (``tokenreduce.instructions``, ``Need.INSTRUCTION``) or, for every
call, from ``instruction_ids``. See ``docs/methods/cdpruner.md``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import int_list
from ..ops.cdpruner import conditional_kernel, dpp_greedy, instruction_relevance, segment_ids
from .tower_select import Budget, keep_params, select_patches


def _path(v: Any) -> Optional[str]:
    if v is None or (isinstance(v, (str, os.PathLike)) and str(v)):
        return None
    return f"must be a CLIPModel directory or hub id (a non-empty string), got {v!r}"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Upstream computes the relevance, the kernel and the DPP in float32 (float16 models included); a float64 model
    keeps float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ClipSide(nn.Module):
    """The parts of a CLIP checkpoint CDPruner uses: the text tower with its projection (``text_embeds``), and the
    image side's final norm and projection applied to the feature layer's patch states (``image_embeds``)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.text_model, self.text_projection = clip.text_model, clip.text_projection
        self.post_layernorm, self.visual_projection = clip.vision_model.post_layernorm, clip.visual_projection
        self.positions = int(clip.config.text_config.max_position_embeddings)
        self.vision_width = int(clip.config.vision_config.hidden_size)
        self.vocab_size = int(clip.config.text_config.vocab_size)

    def text_embeds(self, ids: Sequence[int]) -> torch.Tensor:
        """``[M, C]``: the instruction in rows of ``positions`` tokens (zero-padded, masked), one embedding per row
        (CLIP's pooling: the EOS position, or the largest id with the legacy ``eos_token_id == 2`` configs)."""
        rows, mask = segment_ids(ids, self.positions)
        device = self.text_projection.weight.device
        out = self.text_model(input_ids=rows.to(device), attention_mask=mask.to(device))
        return self.text_projection(out.pooler_output)

    def image_embeds(self, patches: torch.Tensor) -> torch.Tensor:
        """``patches [B, P, W]`` (feature-layer states, CLS excluded) -> ``[B, P, C]``."""
        return self.visual_projection(self.post_layernorm(patches))


def load_clip(path: str) -> ClipSide:
    try:
        from transformers import CLIPModel
    except ImportError as e:  # pragma: no cover
        raise ImportError("cdpruner needs transformers (the 'vlm' extra) to load its text encoder") from e
    try:
        clip = CLIPModel.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"cdpruner: could not load text_encoder={path!r} as a transformers CLIPModel ({e}); give the "
                         "CLIP checkpoint the vision tower came from (LLaVA-1.5: openai/clip-vit-large-patch14-336), "
                         "with its text tower and visual_projection") from None
    side = ClipSide(clip).float().eval()
    side.requires_grad_(False)
    return side


@register_method
class CDPruner(ReductionMethod):
    name = "cdpruner"
    site = Site.TOWER_OUT
    needs = frozenset({Need.PROJECTED, Need.INSTRUCTION})
    summary = ("CDPruner: instruction-conditioned DPP over the projected visual tokens (CLIP relevance, greedy MAP) "
               "at the tower output")
    params = {
        **keep_params(keep_aliases=("visual_token_num",)),
        "text_encoder": Param(None, "a transformers CLIPModel (directory or hub id): the CLIP the vision tower came "
                                    "from (LLaVA-1.5: openai/clip-vit-large-patch14-336)", _path),
        "instruction_ids": Param(None, "CLIP token ids of the instruction (BOS and EOS included, unpadded) for every "
                                       "call without tokenreduce.instructions", int_list(0, optional=True)),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.budget = Budget(self.name, params.get("keep"), params.get("keep_ratio"))
        self.budget.check(geometry)
        path = params.get("text_encoder")
        if path is None:
            raise ValueError("cdpruner needs text_encoder=<CLIPModel directory or hub id>: the CLIP the vision tower "
                             "came from (LLaVA-1.5: openai/clip-vit-large-patch14-336)")
        self.text_encoder = str(path)
        ids = params.get("instruction_ids")
        self.instruction_ids: Optional[Tuple[int, ...]] = tuple(int(t) for t in ids) if ids else None
        self.clip = load_clip(self.text_encoder)
        if self.clip.vision_width != geometry.dim:
            raise ValueError(f"cdpruner: text_encoder={self.text_encoder!r} has a {self.clip.vision_width}-wide vision "
                             f"side, but this vision tower is {geometry.dim} wide; give the CLIP the tower came from")
        self._tokenizer: Any = None
        if self.instruction_ids is not None and max(self.instruction_ids) >= self.clip.vocab_size:
            raise ValueError(f"cdpruner: instruction_ids holds ids >= {self.clip.vocab_size}, the vocabulary of "
                             f"text_encoder={self.text_encoder!r}")

    def missing_needs_hint(self, missing: FrozenSet[str]) -> str:
        if Need.INSTRUCTION in missing:
            return "cdpruner conditions on each prompt's instruction, which this model's adapter cannot hand it"
        return ""

    def num_output(self, num_tokens: int) -> Optional[int]:
        """``keep`` visual tokens per image (the prefix is dropped)."""
        return self.budget.count(num_tokens - self.geometry.num_prefix)

    # -- the instruction ---------------------------------------------------------------------------------------
    def token_ids(self, instruction: Any) -> Tuple[int, ...]:
        """CLIP ids of one instruction: given ids as they are; a string through the text encoder's tokenizer (no
        truncation, BOS/EOS added), loaded from ``text_encoder`` on first use."""
        if not isinstance(instruction, str):
            return tuple(int(t) for t in instruction)
        if self._tokenizer is None:
            problem = None
            try:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(self.text_encoder)
                # transformers builds an empty tokenizer from a folder without tokenizer files: refuse it
                if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
                    problem = "it has no tokenizer files"
            except Exception as e:
                problem = str(e)
            if problem:
                raise ValueError(f"cdpruner: a string instruction needs the CLIP tokenizer of text_encoder="
                                 f"{self.text_encoder!r}, which could not be loaded ({problem}); give CLIP token "
                                 "ids instead") from None
            self._tokenizer = tokenizer
        return tuple(self._tokenizer(text=instruction)["input_ids"])

    def instructions(self, state: TokenState) -> List[Tuple[int, ...]]:
        given = state.instruction
        if given is None:
            if self.instruction_ids is None:
                raise ValueError("cdpruner conditions on the instruction of each prompt: wrap the call in `with "
                                 "tokenreduce.instructions(model, [question, ...]):` (one per image), or patch with "
                                 "instruction_ids=[...] for every call")
            return [self.instruction_ids] * state.batch_size
        out = [self.token_ids(t) for t in given]
        vocab = self.clip.vocab_size
        bad = [i for i, ids in enumerate(out) if max(ids) >= vocab]
        if bad:
            raise ValueError(f"cdpruner: instruction {bad[0]} holds token ids >= {vocab}, the vocabulary of "
                             f"text_encoder={self.text_encoder!r}; give ids of that CLIP's tokenizer")
        return out

    def relevance(self, state: TokenState, dtype: torch.dtype) -> torch.Tensor:
        """``[B, P]`` each patch's normalised relevance to its image's instruction."""
        clip = self.clip.to(device=state.x.device, dtype=dtype)  # a no-op once there; float32 master weights
        image = clip.image_embeds(state.x[:, state.num_prefix:].to(dtype))
        texts: Dict[Tuple[int, ...], torch.Tensor] = {}
        rows = []
        for i, ids in enumerate(self.instructions(state)):
            if ids not in texts:
                texts[ids] = clip.text_embeds(ids)
            rows.append(instruction_relevance(image[i], texts[ids]))
        return torch.stack(rows)

    # -- one forward -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce(self, state: TokenState) -> TokenState:
        """``x [B, p + P, C]`` -> ``[B, keep, C]``: the DPP's patches, ascending patch order."""
        if state.projected is None:
            raise ValueError("cdpruner: the tower site gave no projected features (Need.PROJECTED)")
        k = self.budget.count(state.num_tokens - state.num_prefix)
        dtype = compute_dtype(state.x.dtype)
        kernel = conditional_kernel(state.projected, self.relevance(state, dtype), dtype)
        return select_patches(state, dpp_greedy(kernel, k))
