"""The language-model site of a vision-language model: a method acting before decoder layers of a Hugging Face
causal decoder (Llama, Mistral, Qwen2, Qwen3, and the Qwen2.5-VL / Qwen3-VL text models), during prefill.

One site serves every in-LLM method from its declarations; nothing here names a method. Before decoder layer ``j``
(``0 <= j <= L``; ``j = L`` is the last layer's output, before the final norm) the method gets the hidden states of
the prompt with what it declared:

- ``image_mask`` / ``valid`` / ``positions`` — visual tokens, real (non-padding) tokens, each token's index in its
  own unpadded prompt;
- ``keys_per_head`` — layer ``j-1``'s keys after RoPE (``[B, H_kv, S, d]``);
- ``attn_rows(rows)`` — layer ``j-1``'s causal attention probabilities of chosen query rows (one extra ``q·Kᵀ`` over
  those rows only; every layer keeps its fused attention);
- ``next_attn_rows(rows)`` — the same for layer ``j``'s own q/k on the current tokens, at their current positions;
- ``normed`` — the hidden states through the decoder's final norm.

It returns fewer (or new) tokens with ``kept`` (index of each output token in the input, -1 for a token it
synthesised) and, where it changed them, ``image_mask`` / ``valid``. Layers from the first site on then run on the
shorter sequence with masks and rotary embeddings of their own:

- positions ``"keep"`` (FastV, DART): kept tokens keep their original RoPE positions; decode steps continue at the
  positions the model computes (layer 0's);
- positions ``"renumber"`` (PyramidDrop, SparseVLM): after every site the tokens are renumbered 0..S'-1 among the
  real ones, and in a decode step every layer places the new token at its own cache length.

The KV cache of the layers after a site holds only the kept tokens. Which tokens each group of layers (a *stage*)
holds is remembered per cache object (in a ``WeakKeyDictionary``, nothing is set on the user's cache), so decode
steps, batched left/right padding and a second text-only prefill on a warm cache get the right masks. Masks are
built by :func:`tokenreduce.ops.masks.causal_padding_mask` (additive, so SDPA and eager attention both take them).
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...core import ForwardRecord, Need, ReductionMethod, Status, TokenState, run_reduce
from ...ops.masks import causal_padding_mask, positions_from_valid
from ...ops.merge import gather_tokens
from ...ops.rope import apply_rope
from ..patcher import Original, Replacement, Patcher

try:
    from transformers.cache_utils import Cache
except ImportError:  # pragma: no cover - transformers is an optional dependency
    Cache = ()  # type: ignore

#: What the decoder site can hand a method.
DECODER_NEEDS = frozenset({Need.IMAGE_MASK, Need.VALID, Need.POSITIONS, Need.KEYS_PER_HEAD, Need.ATTN_ROWS,
                           Need.NEXT_ATTN_ROWS, Need.NORMED})
#: Needs read from the layer before the site (so a site before layer 0 cannot have them).
PREVIOUS_LAYER_NEEDS = frozenset({Need.KEYS_PER_HEAD, Need.ATTN_ROWS})


# ---------------------------------------------------------------------------------------------------------------
# Per-cache layout and per-pass state
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """Decoder layers ``start..`` (up to the next stage) whose caches hold the same tokens: ``valid [B, L]`` marks
    the real ones among them."""

    start: int
    valid: torch.Tensor


@dataclass
class DecoderPass:
    """One forward of the decoder (kept in ``ForwardRecord.decoder``): the prompt chunk and the current tokens."""

    query_len: int
    prefill: bool                                 # a chunk with image tokens: the sites run
    chunk_valid: torch.Tensor                     # [B, Q] real tokens of this chunk
    past_valid: Optional[torch.Tensor]            # [B, P] real tokens cached before it (layer 0's view)
    cache: Any
    stages: List[Stage]                           # the cache layout after this forward (what layers >= start hold)
    # the current tokens, as they change at the sites of a prefill
    valid: Optional[torch.Tensor] = None          # [B, S]
    image_mask: Optional[torch.Tensor] = None     # [B, S]
    positions: Optional[torch.Tensor] = None      # [B, S] index in the unpadded prompt
    kept: Optional[torch.Tensor] = None           # [B, S] index into the chunk (-1: synthesised)
    position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # current (cos, sin)
    position_ids: Optional[torch.Tensor] = None
    pruned: bool = False                          # a site changed the tokens
    layer_args: Dict[str, Any] = field(default_factory=dict)  # what layers of the current stage get instead
    previous: Dict[str, Any] = field(default_factory=dict)    # what the layer before the site ran on
    tokens: List[Tuple[int, int]] = field(default_factory=list)  # (layer, tokens) for info


# ---------------------------------------------------------------------------------------------------------------
# Model knowledge: where a decoder layer's q / k come from
# ---------------------------------------------------------------------------------------------------------------
class AttentionTaps:
    """The query / key sources of one HF attention module (``q_norm`` / ``k_norm`` where the model has them,
    Qwen3; else ``q_proj`` / ``k_proj``) and how to turn their outputs into ``[B, H, S, d]``."""

    def __init__(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        self.attn = attn
        self.head_dim = int(attn.head_dim)
        self.num_heads, self.num_kv_heads = int(num_heads), int(num_kv_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))

    def source(self, name: str) -> nn.Module:
        norm = getattr(self.attn, f"{name}_norm", None)
        return norm if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else \
            getattr(self.attn, f"{name}_proj")

    def heads(self, name: str, output: torch.Tensor) -> torch.Tensor:
        """A tapped output (``[B, S, H·d]`` from a projection or ``[B, S, H, d]`` from a per-head norm) ->
        ``[B, H, S, d]``."""
        if output.dim() == 3:
            output = output.view(*output.shape[:2], -1, self.head_dim)
        return output.transpose(1, 2)

    def project(self, layer: nn.Module, hidden: torch.Tensor, name: str) -> torch.Tensor:
        """``[B, H, S, d]`` queries / keys layer ``layer`` would compute from ``hidden`` (before RoPE)."""
        out = getattr(self.attn, f"{name}_proj")(layer.input_layernorm(hidden))
        out = out.view(*out.shape[:2], -1, self.head_dim)
        norm = getattr(self.attn, f"{name}_norm", None)
        if isinstance(norm, nn.Module):
            out = norm(out)
        return out.transpose(1, 2)


def attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scaling: float,
                   key_valid: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities of chosen query rows.

    Args:
        q: ``[B, H, Q, d]`` the queries of those rows, after RoPE; k: ``[B, H_kv, S, d]`` keys after RoPE (GQA heads
            are repeated).
        rows: ``[B, Q]`` the rows' indices among the S tokens (for the causal mask).
        scaling: the attention's logit scale.
        key_valid: ``[B, S]`` bool real tokens.

    Returns:
        ``[B, H, Q, S]``, softmax in at least float32 (as HF's eager attention), cast back to q's dtype.
    """
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = (q @ k.transpose(-2, -1)) * scaling
    work = torch.promote_types(logits.dtype, torch.float32)
    allowed = (torch.arange(k.shape[2], device=q.device)[None, None, :] <= rows[:, :, None]) & key_valid[:, None, :]
    logits = logits.to(work).masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(dim=-1).to(q.dtype)


class RowScorer:
    """``attn_rows`` / ``next_attn_rows``: rows of one layer's attention, computed when the method asks.

    Only the asked rows' queries are formed: ``queries(rows [B, Q]) -> [B, H, Q, d]`` after RoPE (a gather of the
    tapped projection for the layer that ran, a projection of those rows only for the next layer), so a method that
    ranks by one row pays one ``q·Kᵀ`` row per sample."""

    def __init__(self, queries: Callable[[torch.Tensor], torch.Tensor], k: torch.Tensor, scaling: float,
                 key_valid: torch.Tensor) -> None:
        self.queries, self.k, self.scaling, self.key_valid = queries, k, scaling, key_valid

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return attention_rows(self.queries(rows), self.k, rows, self.scaling, self.key_valid)


class TappedQueries:
    """Rows of the queries a layer computed (``[B, H, S, d]`` before RoPE), rotated at their positions."""

    def __init__(self, q: torch.Tensor, cos_sin: Tuple[torch.Tensor, torch.Tensor]) -> None:
        self.q, self.cos_sin = q, cos_sin

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        b, h, _, d = self.q.shape
        q = self.q.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))
        return apply_rope(q, *(_gather_seq(t, rows, -2) for t in self.cos_sin))


class ProjectedQueries:
    """The queries decoder layer ``layer`` would compute for chosen rows of ``hidden`` (only those rows are
    projected), rotated at their positions."""

    def __init__(self, taps: "AttentionTaps", layer: nn.Module, hidden: torch.Tensor,
                 cos_sin: Tuple[torch.Tensor, torch.Tensor]) -> None:
        self.taps, self.layer, self.hidden, self.cos_sin = taps, layer, hidden, cos_sin

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        hidden = gather_tokens(self.hidden, rows)
        q = self.taps.project(self.layer, hidden, "q")
        return apply_rope(q, *(_gather_seq(t, rows, -2) for t in self.cos_sin))


def _gather_seq(t: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather ``t`` along its sequence dimension ``seq_dim`` (negative) by ``index [B, S']``. The dimension before it
    is the batch (size B or 1): ``[B, S]`` or ``[3, B, S]`` (M-RoPE) position ids, ``[B, S, d]`` cos / sin."""
    seq = t.dim() + seq_dim
    t = t.expand(*[index.shape[0] if i == seq - 1 else -1 for i in range(t.dim())])
    shape = [1] * t.dim()
    shape[seq - 1], shape[seq] = index.shape
    index = index.view(shape).expand(*[index.shape[0] if i == seq - 1 else index.shape[1] if i == seq else t.shape[i]
                                       for i in range(t.dim())])
    return t.gather(seq, index)


def _find_cache(arguments: Dict[str, Any]) -> Any:
    """The KV cache among a call's arguments, whatever its parameter name (``past_key_values`` before
    transformers 5.24, ``cache`` since)."""
    for value in arguments.values():
        if Cache and isinstance(value, Cache):
            return value
    return None


# ---------------------------------------------------------------------------------------------------------------
# The site
# ---------------------------------------------------------------------------------------------------------------
class LayerCall(Replacement):
    """Instance forward of decoder layer ``index`` (picklable)."""

    def __init__(self, site: "DecoderSite", index: int, original: Original) -> None:
        self.site, self.index, self.original = site, index, original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.site.run_layer(self.index, self.original, args, kwargs)


class FinalNormCall(Replacement):
    """Instance forward of the decoder's final norm when a method acts after the last layer."""

    def __init__(self, site: "DecoderSite", original: Original) -> None:
        self.site, self.original = site, original

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.original(self.site.run_final(hidden))


class DecoderBegin:
    """Forward pre-hook (with kwargs) on the decoder: the pass of this forward."""

    def __init__(self, site: "DecoderSite") -> None:
        self.site = site

    def __call__(self, module: nn.Module, args: Tuple, kwargs: Dict[str, Any]) -> None:
        self.site.begin_pass(args, kwargs)


class PrevTap:
    """Forward hook storing layer ``j-1``'s q / k source output in the current pass."""

    def __init__(self, site: "DecoderSite", name: str) -> None:
        self.site, self.name = site, name

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        rec = self.site.owner.record
        if rec is not None and rec.decoder is not None and rec.decoder.prefill:
            rec.decoder.previous[self.name] = output


class DecoderSite:
    """Runs an ``LLM_LAYER`` method in a HF causal decoder.

    Args:
        owner: the adapter: its ``record`` (a :class:`ForwardRecord` the adapter starts for every model forward and
            fills with ``image_mask``) and ``method`` are read at run time.
        decoder: the decoder model (``.layers``, ``.norm``, ``.rotary_emb``, ``.config``).
        position_axes: axes of the model's rotary positions: 1 for a plain causal LM; 3 for M-RoPE (Qwen2.5-VL,
            Qwen3-VL: temporal, height, width), whose visual tokens have no 1-D position to renumber.
    """

    def __init__(self, owner: Any, decoder: nn.Module, position_axes: int = 1) -> None:
        self.owner, self.decoder = owner, decoder
        self.position_axes = int(position_axes)
        self.layers = list(decoder.layers)
        cfg = decoder.config
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.layouts: "weakref.WeakKeyDictionary[Any, List[Stage]]" = weakref.WeakKeyDictionary()

    # -- checks ------------------------------------------------------------------------------------------------
    def check(self, method: ReductionMethod) -> None:
        """Refuse what this decoder cannot run, before anything is changed."""
        num = len(self.layers)
        sites = [j for j in range(num + 1) if method.acts_at(j)]
        if not sites:
            return
        if method.positions == "renumber" and self.position_axes > 1:
            raise ValueError(f"{method.name} renumbers the kept tokens' positions 0..S'-1 after its sites (positions="
                             f"'renumber'), but this language model uses {self.position_axes}-axis rotary positions "
                             "(M-RoPE: a visual token's position is its (t, h, w) on its image's grid, text tokens "
                             "continue after the largest one); a 1-D renumbering has no faithful M-RoPE equivalent. "
                             "Use a method whose kept tokens keep their positions (positions='keep') or one at the vision tower's "
                             "output")
        for j in sites:
            needs = method.needs_at(j, False) | method.needs_at(j, True)
            if j == 0 and needs & PREVIOUS_LAYER_NEEDS:
                raise ValueError(f"{method.name} reads layer j-1's attention at a site before layer 0, which has no "
                                 "previous layer; act at layer >= 1")
            if j == num and Need.NEXT_ATTN_ROWS in needs:
                raise ValueError(f"{method.name} reads the next layer's attention after the last layer")
        for name in ("norm", "rotary_emb"):
            if not isinstance(getattr(self.decoder, name, None), nn.Module):
                raise ValueError(f"{method.name} needs a Llama-style decoder (final norm, rotary embeddings); "
                                 f"{type(self.decoder).__name__} has no {name}")
        for layer in self.layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or not hasattr(attn, "k_proj") or not hasattr(attn, "head_dim") or \
                    not hasattr(layer, "input_layernorm"):
                raise ValueError(f"{method.name} needs Llama-style decoder layers (input_layernorm, self_attn with "
                                 f"q_proj/k_proj/head_dim); {type(layer).__name__} is not one")
        impl = getattr(self.decoder.config, "_attn_implementation", "sdpa") or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"{method.name} gives the layers after its site masks of their own, which need the "
                             f"'sdpa' or 'eager' attention implementation; this model uses '{impl}'. Load it with "
                             "attn_implementation='sdpa'")
        types = list(getattr(self.decoder.config, "layer_types", None) or [])
        unknown = sorted({t for t in types[sites[0]:] if t not in ("full_attention", "sliding_attention")})
        if unknown:
            raise ValueError(f"{method.name} builds causal masks for the layers after its site; this model has "
                             f"{unknown} layers there")

    # -- install -----------------------------------------------------------------------------------------------
    def install(self, patcher: Patcher, method: ReductionMethod) -> None:
        num = len(self.layers)
        self.method = method
        self.sites = [j for j in range(num + 1) if method.acts_at(j)]
        self.renumber = method.positions == "renumber"
        first = self.sites[0]
        cfg = self.decoder.config
        types = list(getattr(cfg, "layer_types", None) or [])
        window = getattr(cfg, "sliding_window", None)
        self.windows = [window if (types[i] == "sliding_attention" if types else window is not None) else None
                        for i in range(num)]
        self.taps = [AttentionTaps(l.self_attn, self.num_heads, self.num_kv_heads) for l in self.layers]
        self.norm = patcher.original(self.decoder.norm, "forward")
        patcher.hook(self.decoder.register_forward_pre_hook(DecoderBegin(self), with_kwargs=True))
        for j in range(max(first - 1, 0), num):
            layer = self.layers[j]
            patcher.set_forward(layer, LayerCall(self, j, patcher.original(layer, "forward")))
        # Arguments are bound by the class's signature (an instance forward, e.g. accelerate's, takes *args).
        self.signature = inspect.signature(type(self.layers[0]).forward)
        for j in self.sites:
            needs = method.needs_at(j, False) | method.needs_at(j, True)
            if j >= 1 and needs & PREVIOUS_LAYER_NEEDS:
                names = {"k"} | ({"q"} if Need.ATTN_ROWS in needs else set())
                for name in names:
                    patcher.hook(self.taps[j - 1].source(name).register_forward_hook(PrevTap(self, name)))
        if num in self.sites:
            patcher.set_forward(self.decoder.norm, FinalNormCall(self, self.norm))

    # -- one forward -------------------------------------------------------------------------------------------
    def begin_pass(self, args: Tuple, kwargs: Dict[str, Any]) -> None:
        """Decoder pre-hook: what this forward is (prefill with images or not) and its cache layout."""
        rec = self.owner.record
        if rec is None or rec.status != Status.RUNNING:
            rec = self.owner.begin_forward()
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = embeds if embeds is not None else ids
        b, q = ref.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            mask = mask.get("full_attention")
        cache = _find_cache(kwargs)
        layout = self.layouts.get(cache) if cache is not None else None
        image = rec.image_mask
        prefill = image is not None and q > 1 and image.shape == (b, q) and bool(image.any())
        if torch.is_tensor(mask) and mask.dim() == 4:
            if prefill or layout is not None:
                raise ValueError(f"{self.method.name} builds its own masks for the layers after its site and cannot "
                                 "follow a custom 4-D attention_mask; pass the 2-D padding mask")
            mask = None
        device = ref.device
        mask = mask.bool() if torch.is_tensor(mask) else None
        chunk_valid = mask[:, -q:] if mask is not None else torch.ones(b, q, dtype=torch.bool, device=device)
        past = mask[:, :-q] if mask is not None and mask.shape[1] > q else None
        stages = [Stage(s.start, torch.cat([s.valid.to(device), chunk_valid], dim=1)) for s in layout] \
            if layout is not None and not prefill else []
        if prefill and cache is not None and any(getattr(l, "is_compileable", False)
                                                 for l in getattr(cache, "layers", ())):
            raise ValueError(f"{self.method.name} shortens the prompt inside the language model, so the layers after "
                             "its site cache fewer tokens than a static (fixed-size) KV cache writes; use the default "
                             "dynamic cache (drop cache_implementation='static')")
        if layout is not None and prefill:
            raise ValueError(f"this cache already holds a prompt that {self.method.name} pruned; a second prefill "
                             "with image tokens on it is not supported: start a new cache")
        past_len = cache.get_seq_length(0) if cache is not None else 0
        if past is None and past_len:
            past = torch.ones(b, past_len, dtype=torch.bool, device=device)
        rec.decoder = DecoderPass(query_len=q, prefill=prefill, chunk_valid=chunk_valid, past_valid=past,
                                  cache=cache, stages=stages, valid=chunk_valid,
                                  image_mask=image if prefill else None,
                                  positions=positions_from_valid(chunk_valid) if prefill else None,
                                  kept=torch.arange(q, device=device).expand(b, q) if prefill else None)
        if cache is not None and layout is not None:
            self.layouts[cache] = stages

    def run_layer(self, j: int, original: Original, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        rec = self.owner.record
        p = rec.decoder if rec is not None else None
        if p is None:  # a layer called outside the decoder's forward
            return original(*args, **kwargs)
        bound = self.signature.bind(self.layers[j], *args, **kwargs)
        a = dict(bound.arguments)
        params = list(self.signature.parameters.values())
        var_kw = next((prm.name for prm in params if prm.kind is prm.VAR_KEYWORD), None)
        extra = dict(a.pop(var_kw, {})) if var_kw else {}
        a.pop(params[0].name)  # self
        hidden = a.pop(params[1].name)
        if p.cache is None:  # a cache the decoder created inside its forward (after the pre-hook) is first seen here
            p.cache = _find_cache(a) or _find_cache(extra)
        try:
            if p.prefill and j in self.sites:
                hidden = self._site(rec, p, j, hidden, a)
            if p.prefill:
                p.previous["position_embeddings"] = p.position_embeddings or a.get("position_embeddings")
            if p.pruned or (p.stages and j >= p.stages[0].start):
                a.update(self._layer_args(p, j, hidden, a))
            p.tokens.append((j, hidden.shape[1]))
            return original(hidden, **a, **extra)
        except BaseException as error:
            rec.fail(error)
            raise

    def run_final(self, hidden: torch.Tensor) -> torch.Tensor:
        rec = self.owner.record
        p = rec.decoder if rec is not None else None
        if p is None or not p.prefill:
            return hidden
        return self._site(rec, p, len(self.layers), hidden, {})

    # -- a site ------------------------------------------------------------------------------------------------
    def _site(self, rec: ForwardRecord, p: DecoderPass, j: int, hidden: torch.Tensor, a: Dict[str, Any]
              ) -> torch.Tensor:
        method = self.method
        needs = method.needs_at(j, False)
        if p.position_embeddings is None:
            p.position_embeddings = a.get("position_embeddings")
            p.position_ids = a.get("position_ids")
        found: Dict[str, Any] = {}
        if Need.IMAGE_MASK in needs:
            found["image_mask"] = p.image_mask
        if Need.POSITIONS in needs:
            found["positions"] = p.positions
        if Need.NORMED in needs:
            found["normed"] = self.norm(hidden)
        prev_cos_sin = p.previous.get("position_embeddings")
        if needs & PREVIOUS_LAYER_NEEDS:
            taps = self.taps[j - 1]
            k = apply_rope(taps.heads("k", p.previous["k"]), *prev_cos_sin)
            if Need.KEYS_PER_HEAD in needs:
                found["keys_per_head"] = k
            if Need.ATTN_ROWS in needs:
                queries = TappedQueries(taps.heads("q", p.previous["q"]), prev_cos_sin)
                found["attn_rows"] = RowScorer(queries, k, taps.scaling, p.valid)
        if Need.NEXT_ATTN_ROWS in needs:
            taps, layer = self.taps[j], self.layers[j]
            cos_sin = p.position_embeddings
            k = apply_rope(taps.project(layer, hidden, "k"), *cos_sin)
            found["next_attn_rows"] = RowScorer(ProjectedQueries(taps, layer, hidden, cos_sin), k, taps.scaling,
                                                p.valid)
        state = TokenState(x=hidden, size=hidden.new_ones(hidden.shape[:2]), num_prefix=0, layer=j, valid=p.valid,
                           training=self.decoder.training, carry=rec.carry, **found)
        out = run_reduce(method, state)
        rec.carry = out.carry
        if out is state or out.x is hidden:
            return hidden
        self._apply(rec, p, j, hidden, out)
        return out.x

    def _apply(self, rec: ForwardRecord, p: DecoderPass, j: int, hidden: torch.Tensor, out: TokenState) -> None:
        """The new current tokens after a site: masks, positions, rotary embeddings, kept indices."""
        name = self.method.name
        kept = out.kept
        if kept is None or kept.shape[:2] != out.x.shape[:2]:
            raise RuntimeError(f"{name} must return kept [B, S'] at the LLM_LAYER site (index of each output token, "
                               "-1 for one it synthesised)")
        synthesised = kept < 0
        if bool(synthesised.any()) and not self.renumber:
            raise RuntimeError(f"{name} creates tokens (kept = -1), which have no original RoPE position: such a "
                               "method must declare positions = 'renumber'")
        gather = lambda t: gather_tokens(t, kept.clamp(min=0))  # noqa: E731
        valid = out.valid if out.valid is not None else gather(p.valid) | synthesised
        image = out.image_mask if out.image_mask is not None else gather(p.image_mask) & ~synthesised
        # -1 also where the method turned a real token into padding (re-padding samples of different lengths):
        # such a slot is no prompt token, so it carries no label.
        added_pad = ~valid & gather(p.valid)
        p.valid, p.image_mask = valid, image
        p.positions = gather(p.positions)
        p.kept = torch.where(synthesised | added_pad, torch.full_like(kept, -1), gather(p.kept))
        rec.kept[j] = kept
        if self.renumber:
            offset = p.past_valid.sum(dim=1) if p.past_valid is not None else None
            p.position_ids = positions_from_valid(valid, offset)
            p.position_embeddings = self.decoder.rotary_emb(out.x, p.position_ids)
        else:
            cos, sin = p.position_embeddings
            index = kept.clamp(min=0)
            p.position_embeddings = (_gather_seq(cos, index, -2), _gather_seq(sin, index, -2))
            if p.position_ids is not None:
                p.position_ids = _gather_seq(p.position_ids, index, -1)
        p.pruned = True
        if j < len(self.layers):
            past = self._stage_past(p, len(p.stages))
            p.stages.append(Stage(j, torch.cat([past, valid], dim=1) if past is not None else valid))
            if p.cache is not None:
                self.layouts[p.cache] = p.stages

    def _stage_past(self, p: DecoderPass, index: int) -> Optional[torch.Tensor]:
        """Real tokens cached before this forward in the layers of stage ``index`` (never pruned: layer 0's)."""
        return p.past_valid

    # -- the layers after a site -------------------------------------------------------------------------------
    def _layer_args(self, p: DecoderPass, j: int, hidden: torch.Tensor, a: Dict[str, Any]) -> Dict[str, Any]:
        """Mask, rotary embeddings and position ids of layer ``j`` for the tokens its cache holds."""
        stage = next((s for s in reversed(p.stages) if s.start <= j), None)
        if stage is None:
            return {}
        q = hidden.shape[1]
        window = self.windows[j]
        if window is not None and stage.valid.shape[1] > window:
            raise ValueError(f"{self.method.name} does not support sliding-window attention over the layers after "
                             f"its site (window {window}, sequence {stage.valid.shape[1]})")
        out: Dict[str, Any] = {"attention_mask": causal_padding_mask(stage.valid, q, hidden.dtype)}
        if p.prefill:
            out["position_embeddings"] = p.position_embeddings
            if "position_ids" in a and p.position_ids is not None:
                out["position_ids"] = p.position_ids
        elif self.renumber:
            offset = stage.valid[:, :-q].sum(dim=1)
            ids = positions_from_valid(p.chunk_valid, offset)
            out["position_embeddings"] = self.decoder.rotary_emb(hidden, ids)
            if "position_ids" in a and a["position_ids"] is not None:
                out["position_ids"] = ids
        return out

    # -- info --------------------------------------------------------------------------------------------------
    def final_kept(self, p: DecoderPass) -> Optional[torch.Tensor]:
        """``[B, S']`` index into the prompt of every token the last layer saw (-1: synthesised, or padding a method
        added), or None."""
        return p.kept if p is not None and p.pruned else None
