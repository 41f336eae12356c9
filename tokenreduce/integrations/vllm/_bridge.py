"""Every call the vLLM plugin makes into tokenreduce, in one place (so a change of the core API is one edit here).

The plugin's vLLM-facing code (:mod:`.llava`) knows nothing of methods: it asks this module for a :class:`Plan`
(what a ``{"method": ..., **params}`` spec does to a vision tower of a given shape, and how many tokens per image the
language model will receive), then, per encoder forward, a :class:`Run` that it hands each layer's hidden states
and queries/keys. Everything that selects or merges tokens is tokenreduce's own method code, driven through the same
host functions the Hugging Face adapters use.

Nothing here imports vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import torch

from tokenreduce.backbones import host
from tokenreduce.methods import COMMON_PARAMS, Geometry, Site, get_method, list_methods, resolve_params
from tokenreduce.state import ForwardState

#: The sites a vision tower offers. ``LLM_LAYER`` methods act inside the language model and are refused.
TOWER_SITES = frozenset({Site.BLOCK_MID, Site.BLOCK_OUT, Site.TOWER_OUT})


class Unsupported(ValueError):
    """A method (or option) that vLLM cannot serve, with the reason and what to do instead."""


@dataclass(frozen=True)
class Tower:
    """The vision tower as the plugin sees it (vLLM truncates it at the feature layer, so every layer is used).

    Attributes:
        num_layers: encoder layers that run (the feature layer is the last).
        num_patches: patch tokens per image; the tower adds one CLS token in front.
        dim: hidden width. num_heads: attention heads (all ranks together). head_dim: per head.
        drops_cls: whether LLaVA's feature selection drops the CLS token (``vision_feature_select_strategy``
            ``"default"``) after the tower.
    """

    num_layers: int
    num_patches: int
    dim: int
    num_heads: int
    drops_cls: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    def geometry(self) -> Geometry:
        return Geometry(num_blocks=self.num_layers, num_prefix=1, num_patches=self.num_patches, dim=self.dim,
                        num_heads=self.num_heads, has_class_token=True)


@dataclass
class Plan:
    """What one method does to one tower, resolved once per engine.

    Attributes:
        method: the registered name. params: the method's keyword arguments (validated, defaults filled in).
        tower: the tower it was resolved for.
        at_output: True for a ``TOWER_OUT`` method (its tokens replace LLaVA's feature selection, CLS included),
            False for one acting inside the encoder layers (LLaVA's selection then runs on the fewer tokens).
        tokens_per_image: embeddings the language model receives per image: the placeholder count.
        needs: per layer, the analysis inputs the method reads there (empty where it does not act).
        acts: per layer, whether the method may change the tokens there.
    """

    method: str
    params: Dict[str, Any]
    tower: Tower
    at_output: bool
    tokens_per_image: int
    needs: List[FrozenSet[str]] = field(default_factory=list)
    acts: List[bool] = field(default_factory=list)
    site_mid: bool = False

    def begin(self) -> "Run":
        """Per-forward state with a fresh method instance (a seeded method draws from its seed for every encoder
        batch, so a request's tokens do not depend on what was served before it)."""
        return Run(self, _instantiate(self.method, self.tower, self.params), ForwardState())

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return (f"{self.method}({args}): {self.tower.num_patches} patches -> {self.tokens_per_image} image tokens "
                f"per image")


@dataclass
class Run:
    """One encoder forward: the method instance and tokenreduce's per-forward record (token sizes)."""

    plan: Plan
    method: Any
    fs: ForwardState

    def wants_qk(self, layer: int) -> bool:
        """Whether the layer must hand over its queries/keys (the method reads analysis inputs there)."""
        return bool(self.plan.needs[layer] & host.ANALYSIS)

    def attention_bias(self, num_tokens: int) -> Optional[torch.Tensor]:
        """The additive attention mask ``[B, 1, 1, N]`` the layer's attention must add (proportional attention,
        once tokens were merged), or None (then vLLM's own fused attention runs)."""
        return host.attention_bias(self.method, self.fs.size, None, num_tokens)

    def reduce(self, x: torch.Tensor, layer: int, q: Optional[torch.Tensor], k: Optional[torch.Tensor],
               bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Run the method at ``layer``'s site.

        Args:
            x: ``[B, N, C]`` hidden states at the site (CLS first).
            q, k: ``[B, N, H·d]`` the layer's attention queries and keys over all H heads (None when the method
                reads nothing there).
            bias: the additive mask the layer's attention used (or None).

        Returns:
            ``[B, N', C]`` the method's tokens.
        """
        needs = self.plan.needs[layer]
        analysis: Dict[str, torch.Tensor] = {}
        if needs & host.ANALYSIS:
            heads = self.plan.tower.num_heads
            analysis = host.analysis_inputs(_split_heads(q, heads) if q is not None else None,
                                            _split_heads(k, heads), needs, self.plan.tower.head_dim ** -0.5, bias)
        state = host.token_state(self.fs, x, layer, 1, False, analysis)
        return host.reduce_tokens(self.fs, self.method, state)


def _split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H·d]`` -> ``[B, H, N, d]``."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _instantiate(name: str, tower: Tower, params: Dict[str, Any]) -> Any:
    return get_method(name)(tower.geometry(), **params)


# ---------------------------------------------------------------------------------------------------------------
# Resolving a spec
# ---------------------------------------------------------------------------------------------------------------
def parse_spec(spec: Any) -> Tuple[str, Dict[str, Any]]:
    """``{"method": name, **params}`` (a dict, or its JSON text) -> ``(name, params)``; ValueError otherwise."""
    if isinstance(spec, str):
        import json

        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"hf_overrides['tokenreduce'] is not valid JSON ({e}): {spec!r}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
        raise ValueError("hf_overrides['tokenreduce'] must be a mapping with a 'method' name and the method's "
                         "parameters, e.g. {\"method\": \"visionzip\", \"dominant\": 54, \"contextual\": 10}; got "
                         f"{spec!r}")
    params = {k: v for k, v in spec.items() if k != "method"}
    return spec["method"], params


def make_plan(spec: Any, tower: Tower) -> Plan:
    """Validate a spec against tokenreduce and the tower, and work out how many tokens per image it leaves.

    Raises:
        ValueError: unknown method (the message lists the registered ones), invalid parameter value, or a budget
            the tower cannot give. TypeError: unknown parameter.
        Unsupported: a method vLLM cannot serve (it acts inside the language model, or the number of tokens it
            keeps depends on the image), or an option without meaning here.
    """
    name, given = parse_spec(spec)
    cls = get_method(name)
    if cls.site not in TOWER_SITES:
        raise Unsupported(
            f"{name} acts inside the language model ({cls.site.value}); vLLM fixes each image's placeholder count "
            "before the encoder runs and keeps every prompt token in its paged KV cache, so there is no site for "
            f"it. Serve a method that acts in the vision tower instead ({', '.join(servable_methods())}), or run "
            f"{name} with tokenreduce.patch on a Hugging Face model")
    resolved = resolve_params(name, given)
    if resolved.get("trace_source"):
        raise Unsupported("trace_source records merges for tokenreduce.info(), which a vLLM engine does not offer; "
                          "drop it from hf_overrides['tokenreduce']")
    params = {k: v for k, v in resolved.items() if k not in COMMON_PARAMS}
    method = _instantiate(name, tower, params)  # raises for an impossible budget
    needs = [frozenset(method.needs_at(i)) for i in range(tower.num_layers)]
    acts = [bool(method.acts_at(i)) for i in range(tower.num_layers)]
    at_output = cls.site == Site.TOWER_OUT
    plan = Plan(name, params, tower, at_output, 0, needs, acts, site_mid=cls.site == Site.BLOCK_MID)
    if at_output:  # only the feature layer's output is a site
        plan.needs = [frozenset()] * (tower.num_layers - 1) + [frozenset(method.needs_at(tower.num_layers - 1))]
        plan.acts = [False] * (tower.num_layers - 1) + [True]
    out = output_tokens(plan, method)
    plan.tokens_per_image = out - (1 if tower.drops_cls and not at_output else 0)
    return plan


def output_tokens(plan: Plan, method: Any) -> int:
    """Tokens leaving the tower (CLS included) for one image, known before any image is seen.

    A method that declares its count (``num_output``: an int, or a function of the input token count) is taken at
    its word. Otherwise the count is measured by running the method's own ``reduce`` through the tower's sites on
    two random token states; if the two disagree, the count depends on the image and the method is refused. The
    encoder checks the real count at every forward as well.
    """
    n = plan.tower.num_tokens
    declared = getattr(method, "num_output", None)
    if callable(declared):
        declared = declared(n)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    counts = {_probe(plan, seed) for seed in (0, 1)}
    if len(counts) != 1:
        raise Unsupported(
            f"{plan.method} keeps a number of tokens that depends on the image ({sorted(counts)} on two random "
            "inputs), and vLLM must know each image's placeholder count before the encoder runs; give it a fixed "
            "budget, or use a method with one")
    return counts.pop()


def _probe(plan: Plan, seed: int) -> int:
    """Tokens after the tower when every site sees random hidden states and queries/keys (no model weights)."""
    g = torch.Generator().manual_seed(seed)
    t = plan.tower
    run = plan.begin()
    n = t.num_tokens
    x = torch.randn(1, n, t.dim, generator=g)
    for layer in range(t.num_layers):
        if not plan.acts[layer]:
            continue
        n = x.shape[1]
        q = torch.randn(1, n, t.dim, generator=g) if run.wants_qk(layer) else None
        k = torch.randn(1, n, t.dim, generator=g) if run.wants_qk(layer) else None
        bias = run.attention_bias(n)
        x = run.reduce(x, layer, q, k, bias)
    return int(x.shape[1])


def servable_methods() -> List[str]:
    """Registered methods that act in a vision tower (whether a given budget is servable is decided by
    :func:`make_plan`)."""
    return [m for m in list_methods() if get_method(m).site in TOWER_SITES]
