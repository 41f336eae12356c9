"""What a method is: a small object that turns the token state at a reduction site into a smaller one.

A method class declares next to its code where it acts (``site``), what it reads (``needs``, per layer with
:meth:`ReductionMethod.needs_at`), and its parameters (``params``: defaults, validation, the papers' names as
aliases). Its constructor receives the model's :class:`Geometry` and the validated parameters and resolves any
schedule once, so a forward only reads static per-layer values. Between forwards a method holds no state: what
one forward needs to pass from site to site is its ``carry`` (:meth:`begin`), which the adapter threads through
:class:`TokenState` and drops afterwards.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, FrozenSet, Optional, Tuple, Union

import torch

from .attention_map import AttentionMap
from .geometry import Geometry
from .params import Param
from .requirements import Need, Site
from .state import TokenState

ProbsFn = Callable[[torch.Tensor], torch.Tensor]
#: What :meth:`ReductionMethod.attention_probs` returns: a replacement softmax, or the probabilities themselves.
Probs = Union[ProbsFn, torch.Tensor, AttentionMap]


class ReductionMethod:
    """Base class of every method.

    Class attributes a subclass sets:
        name: the registry name (``patch(model, name)``).
        summary: one line for ``tokenreduce methods``.
        site: where it acts. A method whose site depends on its configuration (MCTF's ``one_step_ahead``) also
            overrides :meth:`site_for`; the instance's ``site`` is the configured one.
        sites: for a method that can act at more than one kind of site depending on the *model*, the sites in
            order of preference (``random``: a VLM's tower output, else between ViT blocks); ``patch`` binds the
            first the model offers, and ``geometry.site`` / the instance's ``site`` say which.
        needs: what it may read (:class:`Need` values); :meth:`needs_at` narrows it per layer.
        params: ``{name: Param}``.
        compilable: whether ``reduce`` traces under ``torch.compile(fullgraph=True)``. A method that cannot
            (data-dependent loops, a random generator) sets False: adapters then run its ``reduce`` outside the
            graph (``torch.compiler.disable``), so ``torch.compile`` still works with graph breaks and
            ``fullgraph=True`` is refused by dynamo at that call.
        positions: at ``Site.LLM_LAYER``: ``"keep"`` (kept tokens keep their RoPE positions; FastV, DART) or
            ``"renumber"`` (positions are renumbered 0..S'-1 after every site and each layer's decode position is
            its own cache length; PyramidDrop, SparseVLM).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    site: Site = Site.BLOCK_MID  # a class default; the instance holds the configured site (site_for)
    sites: ClassVar[Tuple[Site, ...]] = ()
    needs: ClassVar[FrozenSet[str]] = frozenset()
    params: ClassVar[Dict[str, Param]] = {}
    positions: ClassVar[str] = "keep"
    compilable: ClassVar[bool] = True

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        self.geometry = geometry
        self.config = dict(params)
        self.prop_attn: bool = bool(params.get("prop_attn", False))
        self.site: Site = geometry.site if geometry.site is not None else type(self).site_for(params)

    @classmethod
    def site_for(cls, params: Dict[str, Any]) -> Site:
        """Where a method configured with ``params`` (validated, defaults filled) acts: ``cls.site`` unless a
        subclass makes it depend on its configuration. ``patch`` checks this site against the model's adapter
        before the method is built; the host reads the instance's ``site``."""
        return cls.site

    # -- the schedule ------------------------------------------------------------------------------------------
    def acts_at(self, layer: int) -> bool:
        """Whether the method may change the tokens at this layer's site (static, resolved at patch time)."""
        return True

    def needs_at(self, layer: int, training: bool = False) -> FrozenSet[str]:
        """What the method reads at this layer (nothing where it does not act)."""
        return frozenset(self.needs) if self.acts_at(layer) else frozenset()

    def missing_needs_hint(self, missing: FrozenSet[str]) -> str:
        """What to configure instead when a model cannot provide ``missing`` (needs this configuration reads), as
        a sentence that ``patch`` appends to its refusal; empty when there is no alternative."""
        return ""

    def num_output(self, num_tokens: int) -> Optional[int]:
        """Tokens a ``TOWER_OUT`` method returns per image for ``num_tokens`` input tokens (prefix included), or
        None when the count depends on the content. Serving (vLLM) needs it before the encoder runs."""
        return None

    # -- one forward -------------------------------------------------------------------------------------------
    def begin(self, training: bool) -> Any:
        """The method's per-forward value (``TokenState.carry`` at the first site); None by default."""
        return None

    def attention_bias(self, size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Additive attention bias from the token sizes: ``log(size)`` as ``[B, 1, 1, N]`` with proportional
        attention, None otherwise (and while no token was merged, so the fastest SDPA kernel can run)."""
        if not self.prop_attn or size is None:
            return None
        return size.log()[:, None, None, :]

    def attention_probs(self, state: TokenState) -> Optional[Probs]:
        """With ``Need.ATTENTION_PROBS``: a replacement for the softmax of this layer's attention, or None.

        Called before the layer's attention with the state entering the layer (``carry`` included). A function
        maps the logits ``[B, H, N, N]`` (scaled ``q·kᵀ`` plus the attention bias) to probabilities of the same
        shape; the adapter then evaluates that layer's attention eagerly with them. A tensor ``[B, H, N, N]`` or an
        :class:`~tokenreduce.core.AttentionMap` *is* the probabilities (MCTF's merged map): where the layer calls
        SDPA the adapter then computes ``map.apply(v)`` and no ``q·kᵀ``, and the layer's MACs count just that
        product. Only a method whose gradient must flow through the probabilities (DiffRate's rate search, LTMP's
        training) or that merges the attention map itself (MCTF) needs this; every other layer keeps fused
        attention.
        """
        return None

    def reduce(self, state: TokenState) -> TokenState:  # pragma: no cover - abstract
        """The smaller state. Return ``state`` itself to change nothing."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


def all_needs(method: ReductionMethod, num_layers: int) -> FrozenSet[str]:
    """Everything ``method`` reads at any layer, in inference and in training."""
    out = set()
    for layer in range(num_layers):
        for training in (False, True):
            out |= method.needs_at(layer, training)
    return frozenset(n.value if isinstance(n, Need) else n for n in out)


def candidate_sites(method_cls: type, params: Dict[str, Any]) -> Tuple[Site, ...]:
    """The sites a method configured with ``params`` can act at, in order of preference."""
    return tuple(method_cls.sites) or (method_cls.site_for(params),)


@torch.compiler.disable
def _eagerly(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def run_reduce(method: ReductionMethod, state: TokenState) -> TokenState:
    """``method.reduce(state)``, outside any compiled graph for a method that is not ``compilable``."""
    return method.reduce(state) if method.compilable else _eagerly(method.reduce, state)


def run_begin(method: ReductionMethod, training: bool) -> Any:
    """``method.begin(training)``, outside any compiled graph for a method that is not ``compilable``."""
    return method.begin(training) if method.compilable else _eagerly(method.begin, training)
