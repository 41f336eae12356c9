"""Results as people read them: parameters in one line, markdown tables, and rows as JSON + CSV files."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


def format_params(params: Dict[str, Any]) -> str:
    """``r=8, prop_attn=false``: the full parameters (results files)."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())


def short_params(params: Dict[str, Any]) -> str:
    """A compact form for table rows: long lists are shortened to their ends (``[197,197,...,55]``)."""
    def short(v: Any) -> str:
        if isinstance(v, (list, tuple)) and len(v) > 4:
            return f"[{json.dumps(v[0])},{json.dumps(v[1])},...,{json.dumps(v[-1])}]"
        return json.dumps(v, separators=(",", ":"))
    return " ".join(f"{k}={short(v)}" for k, v in params.items())


def number(v: Optional[float], fmt: str) -> str:
    """``format(v, fmt)``, or ``-`` for a missing value."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table of already formatted cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_rows(path: Path, rows: Sequence[Any], meta: Dict[str, Any]) -> Tuple[Path, Path]:
    """``path`` as JSON (``{meta..., rows: [...]}``) and the same rows as CSV beside it. Rows are dataclasses or
    mappings."""
    records: List[Dict[str, Any]] = [asdict(r) if is_dataclass(r) else dict(r) for r in rows]
    path = Path(path)
    json_path = path if path.suffix == ".json" else path.with_suffix(".json")
    csv_path = json_path.with_suffix(".csv")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**meta, "rows": records}, indent=1) + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else [])
        writer.writeheader()
        writer.writerows(records)
    return json_path, csv_path
