"""Published settings as data: one YAML file per method × model (``configs/<method>/<setting>.yaml``).

A config names the method and its parameters, the timm model (with its pinned pretrained tag), the
preprocessing it was evaluated with, and what the paper reported. Files are read with ``yaml.safe_load`` and
validated strictly: an unknown key anywhere is an error (a typo must not silently change an evaluation), and
the method parameters are checked against the method's registered schema.

Schema (only ``method`` is required)::

    method: tome                      # a registered method
    params: {r: 13}                   # its parameters (validated by the registry)
    model: vit_small_patch16_224.augreg_in21k_ft_in1k   # timm name, pretrained tag pinned
    model_kwargs: {}                  # extra timm.create_model arguments (e.g. {global_pool: avg})
    checkpoint: null                  # weights outside timm's hub (path or URL), when the tag is not enough
    preprocessing: {img_size: 224, crop_pct: 0.9, interpolation: bicubic, mean: [...], std: [...]}
    paper:                            # what was published; all optional
      title: ..., source: "Table 3", url: ...,
      top1: 79.30, baseline_top1: 81.41, gflops: ..., baseline_gflops: ...,
      throughput: 1564, baseline_throughput: 953, hardware: V100, batch_size: 256, trained: false
    notes: free text
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from . import methods  # noqa: F401  (a config names a registered method: register the built-in ones)
from .core import get_method, list_methods, resolve_params
from .resources import data_dir

CONFIG_DIR = data_dir("configs")

_TOP_KEYS = {"name", "method", "params", "model", "model_kwargs", "checkpoint", "preprocessing", "paper", "notes"}
_PREPROCESSING_KEYS = {"img_size", "crop_pct", "interpolation", "mean", "std", "crop_mode"}
_PAPER_KEYS = {"title", "source", "url", "top1", "baseline_top1", "top5", "gflops", "baseline_gflops",
               "throughput", "baseline_throughput", "hardware", "batch_size", "trained", "notes"}
_NUMBER_KEYS = {"top1", "baseline_top1", "top5", "gflops", "baseline_gflops", "throughput", "baseline_throughput"}
_INTERPOLATIONS = {"nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "random"}


class ConfigError(ValueError):
    """A config file that cannot be used as written (the message names the file and the key)."""


@dataclass
class MethodConfig:
    """A validated config. ``params`` are the user-given ones (defaults are filled in by ``patch``)."""

    method: str
    params: Dict[str, Any] = field(default_factory=dict)
    name: str = ""
    model: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    preprocessing: Dict[str, Any] = field(default_factory=dict)
    paper: Dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    path: Optional[Path] = None

    @property
    def paper_top1(self) -> Optional[float]:
        return self.paper.get("top1")


def resolve_config_path(ref: Union[str, os.PathLike]) -> Path:
    """A config file from a path, or from a short name under ``configs/`` (``tome/vit_s16_augreg_r13``)."""
    path = Path(ref)
    if path.is_file():
        return path
    # a name may hold dots ("atc/deit_small_keep0.7"): add ".yaml" rather than replace a "suffix"
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config {str(ref)!r} not found (neither a file nor a name under {CONFIG_DIR}); "
                            f"see `tokenreduce methods` and {CONFIG_DIR}")


def load_config(ref: Union[str, os.PathLike], *, check_params: bool = True) -> MethodConfig:
    """Read and validate a config file (see the module docstring for the schema).

    Args:
        ref: a path, or a name relative to the repository's ``configs/`` folder.
        check_params: also validate ``params`` against the registered method (needs the method registered).
    """
    path = resolve_config_path(ref)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return validate_config(data, source=str(path), check_params=check_params, path=path)


def validate_config(data: Any, *, source: str = "<config>", check_params: bool = True,
                    path: Optional[Path] = None) -> MethodConfig:
    """Validate an already-parsed config mapping; ConfigError names the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping with at least 'method', got {type(data).__name__}")
    _no_unknown(data, _TOP_KEYS, source)
    if "method" not in data:
        raise ConfigError(f"{source}: missing 'method' (one of: {', '.join(list_methods())})")
    method = data["method"]
    if not isinstance(method, str):
        raise ConfigError(f"{source}: 'method' must be a string, got {method!r}")
    params = _mapping(data, "params", source)
    preprocessing = _mapping(data, "preprocessing", source)
    paper = _mapping(data, "paper", source)
    model_kwargs = _mapping(data, "model_kwargs", source)
    _no_unknown(preprocessing, _PREPROCESSING_KEYS, f"{source}: preprocessing")
    _no_unknown(paper, _PAPER_KEYS, f"{source}: paper")
    _check_preprocessing(preprocessing, source)
    for key in _NUMBER_KEYS & set(paper):
        if paper[key] is not None and (isinstance(paper[key], bool) or not isinstance(paper[key], (int, float))):
            raise ConfigError(f"{source}: paper.{key} must be a number, got {paper[key]!r}")
    for key in ("model", "checkpoint", "notes", "name"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {data[key]!r}")
    if check_params:
        try:
            get_method(method)
            resolve_params(method, params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None
    name = data.get("name") or (path.stem if path is not None else method)
    return MethodConfig(method=method, params=dict(params), name=name, model=data.get("model"),
                        model_kwargs=dict(model_kwargs), checkpoint=data.get("checkpoint"),
                        preprocessing=dict(preprocessing), paper=dict(paper), notes=data.get("notes") or "",
                        path=path)


def _mapping(data: Dict[str, Any], key: str, source: str) -> Dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
    return value


def _no_unknown(data: Dict[str, Any], allowed: set, where: str) -> None:
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")


def _check_preprocessing(pre: Dict[str, Any], source: str) -> None:
    if "img_size" in pre and (isinstance(pre["img_size"], bool) or not isinstance(pre["img_size"], int)
                              or pre["img_size"] <= 0):
        raise ConfigError(f"{source}: preprocessing.img_size must be a positive int, got {pre['img_size']!r}")
    if "crop_pct" in pre and (isinstance(pre["crop_pct"], bool) or not isinstance(pre["crop_pct"], (int, float))
                              or not 0 < pre["crop_pct"] <= 1.0):
        raise ConfigError(f"{source}: preprocessing.crop_pct must be in (0, 1], got {pre['crop_pct']!r}")
    if "interpolation" in pre and pre["interpolation"] not in _INTERPOLATIONS:
        raise ConfigError(f"{source}: preprocessing.interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                          f"got {pre['interpolation']!r}")
    for key in ("mean", "std"):
        if key in pre and not (isinstance(pre[key], list) and all(isinstance(v, (int, float)) for v in pre[key])):
            raise ConfigError(f"{source}: preprocessing.{key} must be a list of numbers, got {pre[key]!r}")


def _timm_shape(model: Any) -> Optional[Dict[str, Any]]:
    """Depth, width, prefix and patch count of a timm ViT (None for other models)."""
    if not all(hasattr(model, a) for a in ("blocks", "embed_dim", "num_prefix_tokens", "patch_embed")):
        return None
    return {"blocks": len(model.blocks), "width": int(model.embed_dim), "prefix tokens": int(model.num_prefix_tokens),
            "patches": getattr(model.patch_embed, "num_patches", None)}


def check_config_model(cfg: MethodConfig, model: Any) -> None:
    """Refuse a config written for another timm architecture (its counts and layer indices would not mean what
    the paper meant). Compares the architecture name when the model has timm's ``pretrained_cfg``, else the shape
    of the config's architecture (built on the meta device, no weights) with the model's."""
    if not cfg.model or _timm_shape(model) is None:
        return
    arch = cfg.model.split(".")[0]
    actual = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if actual is not None:
        if actual != arch:
            raise ValueError(f"config {cfg.name!r} was written for {arch}; this model is {actual}. Pass the method "
                             f"and its parameters directly instead: tokenreduce.patch(model, {cfg.method!r}, ...)")
        return
    reference = _reference_model(arch, cfg.model_kwargs)
    if reference is None:  # an architecture this timm does not know: nothing to compare against
        return
    want, have = _timm_shape(reference), _timm_shape(model)
    if want != have:
        diff = ", ".join(f"{k} {want[k]} vs {have[k]}" for k in want if want[k] != have[k])
        raise ValueError(f"config {cfg.name!r} was written for {arch} ({diff} in this model). Pass the method and "
                         f"its parameters directly instead: tokenreduce.patch(model, {cfg.method!r}, ...)")


def _reference_model(arch: str, kwargs: Dict[str, Any]) -> Optional[Any]:
    """``timm.create_model(arch)`` without weights, or None for an architecture this timm does not know. Built on
    the meta device (no memory); timm < 1.0.21 calls ``.item()`` while building a ViT, which meta tensors refuse,
    so those build it on the CPU instead."""
    import timm
    import torch
    if not timm.is_model(arch):
        return None
    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError:
        pass
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except Exception:  # arguments this timm does not take: nothing to compare against
        return None


def list_configs(method: Optional[str] = None) -> List[Path]:
    """Config files under ``configs/`` (optionally one method's folder), excluding the default-eval file."""
    root = CONFIG_DIR / method if method else CONFIG_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*.yaml") if p.parent != CONFIG_DIR)


__all__ = ["CONFIG_DIR", "ConfigError", "MethodConfig", "check_config_model", "list_configs", "load_config", "resolve_config_path",
           "validate_config"]
