"""The public surface: patch / unpatch / info / list_methods / method_params / build_method.

``patch`` validates everything before it touches the model — the model family, the method name, every parameter,
the site and every need the configured method declares against what the model's adapter provides, and what the
adapter itself must refuse — then installs the method through the adapter's Patcher, so ``unpatch`` restores
exactly what was there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import warnings
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import torch.nn as nn

from . import backbones  # noqa: F401  (registers the built-in adapters)
from . import methods  # noqa: F401  (registers the built-in methods)
from .backbones.base import Adapter, families_offering, find_adapter
from .core import (COMMON_PARAMS, Geometry, ReductionInfo, ReductionMethod, Site, all_needs, candidate_sites,
                   get_method, list_methods, method_params, resolve_params)
from .core.requirements import need_names

_ATTR = "_tokenreduce"

__all__ = ["build_method", "count_macs", "get_method", "info", "instructions", "is_patched", "list_methods", "method_params", "patch",
           "unpatch"]


def patch(model: nn.Module, method: Optional[str] = None, *, config: Optional[str] = None,
          **params: Any) -> nn.Module:
    """Make ``model`` reduce tokens with ``method``, in place; returns the model.

    Everything is validated before the model is touched: the model family (ValueError naming the supported
    ones; wrappers such as ``torch.compile`` or DDP get an error that says how to patch them), the method name
    (ValueError listing the registered methods), each parameter (TypeError for an unknown name, ValueError for a
    bad value; the papers' names are accepted as aliases, see ``tokenreduce.method_params``), and that the model's
    adapter offers the method's site and provides everything it reads. Patching a model that is already patched
    first restores it, then applies the new method. A configuration that reduces nothing warns.

    Args:
        model: a supported model, e.g. a timm ``VisionTransformer`` or a Hugging Face ``LlavaForConditionalGeneration``.
        method: a registered method name (``tokenreduce.list_methods()``).
        config: a YAML config (path, or name under ``configs/``, see ``tokenreduce.configs``) giving the method
            and its parameters; keyword ``params`` override the config's. A config written for another model
            architecture is refused.
        **params: the method's parameters (``tokenreduce.method_params(method)``) and the common options
            ``trace_source`` and ``size_weighted_pool``.
    """
    prepared = _prepare(model, method, config, params)
    if prepared.idle:
        warnings.warn(prepared.idle, stacklevel=2)
    adapter = prepared.adapter
    if is_patched(model):
        unpatch(model)
    try:
        adapter.install(prepared.method, prepared.options)
    except BaseException:
        adapter.uninstall()
        raise
    object.__setattr__(model, _ATTR, adapter)
    return model


def check(model: nn.Module, method: Optional[str] = None, *, config: Optional[str] = None, **params: Any) -> None:
    """Run every validation of :func:`patch` without touching the model: raises what ``patch`` would raise
    (evaluation tools use it to skip a method a model cannot run, with ``patch``'s reason)."""
    _prepare(model, method, config, params)


class _Prepared(NamedTuple):
    adapter: Adapter
    method: ReductionMethod
    options: Dict[str, Any]
    idle: Optional[str]  # why this configuration reduces nothing, when it does not


def _prepare(model: nn.Module, method: Optional[str], config: Optional[str], params: Dict[str, Any]) -> _Prepared:
    """Validate a patch request and build the adapter and the configured method (nothing is installed)."""
    if config is not None:
        from .configs import check_config_model, load_config  # lazy: yaml is not needed for plain patching
        cfg = load_config(config)
        if method is not None and method != cfg.method:
            raise ValueError(f"method {method!r} contradicts config {config!r}, which is for {cfg.method!r}")
        check_config_model(cfg, model)
        method, params = cfg.method, {**cfg.params, **params}
    if method is None:
        raise TypeError("patch() needs a method name or config=")
    adapter_cls = find_adapter(model)
    method_cls = get_method(method)
    resolved = resolve_params(method, params)
    wanted = candidate_sites(method_cls, resolved)
    offered_sites = [s for s in wanted if s in adapter_cls.provides]
    if not offered_sites:
        raise ValueError(f"{method} acts at {' or '.join(repr(s.value) for s in wanted)}, which "
                         f"{type(model).__name__} does not offer (it offers: "
                         f"{', '.join(sorted(s.value for s in adapter_cls.provides))}); models that offer it: "
                         f"{'; '.join(families_offering(s) for s in wanted)}")
    site = offered_sites[0]
    adapter = adapter_cls(model)
    geometry = dataclasses.replace(adapter.geometry(site), site=site)
    try:
        instance = build_method(method, geometry, **resolved)
    except ValueError as error:
        if geometry.blocks_note and "block" in str(error):
            raise ValueError(f"{error} (here the {geometry.num_blocks} blocks are {geometry.blocks_note})") from None
        raise
    offered = adapter_cls.provides[site]
    # An LLM site may also act after the last decoder layer (before the final norm).
    num_sites = instance.geometry.num_blocks + (1 if site == Site.LLM_LAYER else 0)
    missing = all_needs(instance, num_sites) - need_names(offered)
    if missing:
        hint = instance.missing_needs_hint(frozenset(missing))  # what to configure instead, if anything
        raise ValueError(f"{method} (as configured) reads {sorted(missing)}, which the adapter for "
                         f"{type(model).__name__} cannot provide at '{site.value}' (it provides: "
                         f"{', '.join(sorted(need_names(offered)))})" + (f". {hint}" if hint else ""))
    adapter.check_method(instance)
    idle = None
    if not any(instance.acts_at(layer) for layer in range(num_sites)):
        given = {k: v for k, v in params.items() if k not in COMMON_PARAMS}
        idle = (f"{method} with {given or 'its defaults'} reduces nothing in this {instance.geometry.num_blocks}-"
                f"block model: the patched model computes exactly what the unpatched one does. See "
                f"tokenreduce.method_params({method!r}) for what to set.")
    return _Prepared(adapter, instance, {k: resolved[k] for k in COMMON_PARAMS}, idle)


def build_method(name: str, geometry: Geometry, **params: Any) -> ReductionMethod:
    """A configured method for a model of ``geometry``, outside any adapter (for integrations that run the method
    themselves, such as the vLLM plugin). ``params`` are validated as by ``patch``; common options are ignored."""
    resolved = resolve_params(name, params)
    return get_method(name)(geometry, **{k: v for k, v in resolved.items() if k not in COMMON_PARAMS})


def unpatch(model: nn.Module) -> nn.Module:
    """Restore everything ``patch`` changed; afterwards the model computes exactly what it did before."""
    adapter = _adapter_of(model)
    adapter.uninstall()
    del model.__dict__[_ATTR]
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by tokenreduce."""
    return isinstance(model.__dict__.get(_ATTR), Adapter)


def info(model: nn.Module) -> ReductionInfo:
    """What the last forward of a patched model did: sizes, sources, tokens per layer, analytic MACs, kept tokens."""
    return _adapter_of(model).info()


#: One instruction: text, or token ids of the method's own tokenizer (e.g. CDPruner's CLIP ids).
Instruction = Union[str, Sequence[int]]


def _one_instruction(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value):
        return tuple(int(t) for t in value)
    raise TypeError(f"tokenreduce.instructions: {where} must be a string or a non-empty list of token ids, got "
                    f"{value!r}")


@contextlib.contextmanager
def instructions(model: nn.Module, texts: Union[str, Sequence[Instruction]]) -> Iterator[nn.Module]:
    """Give the prompts' instructions to a method that reads them (``Need.INSTRUCTION``: CDPruner conditions its
    selection on the instruction) for every call of ``model`` inside the block — ``forward``, ``generate``,
    ``get_image_features``::

        tokenreduce.patch(model, "cdpruner", keep=64, text_encoder="openai/clip-vit-large-patch14-336")
        with tokenreduce.instructions(model, ["What is the man holding?", "How many dogs are there?"]):
            out = model.generate(**processor(images=images, text=prompts, return_tensors="pt", padding=True))

    Args:
        model: a patched model.
        texts: one string for every image of every call; or a list with one entry per image, in the order of
            ``pixel_values`` (one per sample for one image per prompt; a prompt with several images repeats its
            instruction once per image). An entry is a string, or the token ids of the method's own tokenizer.
            The instruction is the question itself, not the chat prompt around it.

    Methods that read no instruction ignore it. Blocks nest; leaving one restores the instructions around it.
    """
    adapter = _adapter_of(model)
    if isinstance(texts, str):
        given: Any = texts
    elif isinstance(texts, (list, tuple)) and texts and all(isinstance(t, numbers.Integral) for t in texts):
        raise TypeError("tokenreduce.instructions takes one instruction per image: wrap a single list of token ids "
                        "in a list ([ids]), or give one string for all")
    elif isinstance(texts, (list, tuple)) and texts:
        given = [_one_instruction(t, f"instruction {i}") for i, t in enumerate(texts)]
    else:
        raise TypeError(f"tokenreduce.instructions takes a string or a non-empty list (one per image), got {texts!r}")
    previous = adapter.instructions
    adapter.instructions = given
    try:
        yield model
    finally:
        adapter.instructions = previous


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Analytic MACs per image of ``model`` on ``inputs``: a patched model's last forward on them (``info``), an
    unpatched model's from its adapter's MAC model (the same convention, so the two compare)."""
    if is_patched(model):
        import torch
        with torch.inference_mode():
            model(inputs[:1])
        return info(model).macs
    return find_adapter(model)(model).dense_macs(inputs)


def method_of(model: nn.Module) -> ReductionMethod:
    """The configured method a model is patched with."""
    return _adapter_of(model).method


def describe_params(name: str) -> List[Dict[str, Any]]:
    """``[{name, aliases, default, doc}]`` of every parameter ``patch(model, name, ...)`` accepts."""
    return [{"name": key, "aliases": list(p.aliases), "default": p.default, "doc": p.doc}
            for key, p in method_params(name).items()]


def _adapter_of(model: nn.Module) -> Adapter:
    if not is_patched(model):
        raise ValueError(f"this {type(model).__name__} is not patched by tokenreduce; call tokenreduce.patch first")
    return model.__dict__[_ATTR]

