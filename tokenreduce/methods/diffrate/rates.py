"""DiffRate's rate tables: per-block kept counts as YAML files, and the released tables in ``configs/diffrate/``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ...resources import data_dir

#: Where the released rate tables live (override with TOKENREDUCE_DIFFRATE_CONFIGS).
CONFIG_DIR = Path(os.environ.get("TOKENREDUCE_DIFFRATE_CONFIGS", data_dir("configs") / "diffrate"))


@dataclass
class RateTable:
    """One set of per-block kept counts (incl. prefix tokens) and what it was made for."""

    prune_kept: List[int]
    merge_kept: List[int]
    model: Optional[str] = None
    target_gflops: Optional[float] = None
    origin: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)


def _int_list(value: Any, what: str) -> List[int]:
    if isinstance(value, str):  # upstream's compression_rate.json stores lists as strings
        import yaml
        value = yaml.safe_load(value)
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{what} must be a non-empty list of ints, got {value!r}")
    return [int(v) for v in value]


def _table_from(entry: Dict[str, Any], origin: str, model: Optional[str], meta: Dict[str, Any]) -> RateTable:
    missing = [k for k in ("prune_kept", "merge_kept") if k not in entry]
    if missing:
        raise ValueError(f"{origin}: missing {missing}")
    target = entry.get("target_gflops")
    return RateTable(_int_list(entry["prune_kept"], f"{origin}: prune_kept"),
                     _int_list(entry["merge_kept"], f"{origin}: merge_kept"),
                     model=entry.get("model", model), target_gflops=None if target is None else float(target),
                     origin=origin, meta=meta)


def list_rate_configs(config_dir: Union[str, Path, None] = None) -> Dict[str, List[str]]:
    """Released tables by config name: ``{"deit_small": ["2.3", "2.5", ...], ...}``."""
    import yaml
    out = {}
    for path in sorted(Path(config_dir or CONFIG_DIR).glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data.get("rates"), dict):
            out[path.stem] = [str(k) for k in data["rates"]]
    return out


def load_rates(spec: Union[str, Path], config_dir: Union[str, Path, None] = None) -> RateTable:
    """A rate table from a YAML file or a named config.

    Args:
        spec: ``"deit_small@2.9"`` (a file of ``configs/diffrate`` by stem, timm model name or upstream name, then
            the FLOPs target), a YAML path holding ``prune_kept`` / ``merge_kept`` (what ``tools/train_rates.py``
            exports), or ``"path.yaml@2.9"`` for a file with several tables under ``rates:``.
        config_dir: where the named configs live (default ``configs/diffrate``).

    Raises:
        ValueError naming what exists when the file, the name or the target is unknown.
    """
    import yaml
    text = str(spec)
    name, _, target = text.rpartition("@") if "@" in text else (text, "", "")
    path = Path(name).expanduser()
    if not path.is_file():
        path = _find_config(name, Path(config_dir or CONFIG_DIR))
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with prune_kept/merge_kept or rates, got {type(data).__name__}")
    meta = {k: v for k, v in data.items() if k not in ("rates", "prune_kept", "merge_kept")}
    if "prune_kept" in data or "merge_kept" in data:
        if target:
            raise ValueError(f"{path} holds a single table; drop '@{target}'")
        return _table_from(data, str(path), data.get("model"), meta)
    tables = data.get("rates")
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{path}: neither prune_kept/merge_kept nor a 'rates:' mapping")
    if not target:
        raise ValueError(f"{path} holds several tables; pick one with '@<GFLOPs>', one of {list(map(str, tables))}")
    for key, entry in tables.items():
        if _same_number(key, target):
            entry = dict(entry)
            entry.setdefault("target_gflops", float(key))
            return _table_from(entry, f"{path}@{key}", data.get("model"), meta)
    raise ValueError(f"{path} has no table for {target} GFLOPs; it has {', '.join(map(str, tables))}")


def _same_number(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-9
    except (TypeError, ValueError):
        return False


def _find_config(name: str, config_dir: Path) -> Path:
    import yaml
    tables = {}  # only rate-table files (a "rates:" mapping); method configs may share the folder
    for path in sorted(config_dir.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and isinstance(data.get("rates"), dict):
            tables[path] = data
    for path, data in tables.items():
        if name in (path.stem, data.get("model"), data.get("upstream_name")):
            return path
    candidates = list(tables)
    known = ", ".join(p.stem for p in candidates) or f"none found in {config_dir}"
    raise ValueError(f"no rate file or named config {name!r}; named configs: {known} (use e.g. 'deit_small@2.9')")
