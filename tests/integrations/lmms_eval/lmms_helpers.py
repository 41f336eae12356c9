"""Running lmms-eval the way the tests need it: offline, on the smoke tasks, every error an exception."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

SMOKE = ("tr_smoke_gen", "tr_smoke_mc")

#: (method, params, visual tokens the method promises on the tiny model's 64); unregistered ones are left out
METHODS = [
    ("visionzip", dict(dominant=10, contextual=4), 14),
    ("dart", dict(layer=1, image_pivots=2, text_pivots=2, per_pivot=4), 2 + 4 * 4),
    ("tome", dict(r=20), 24),  # 65 -> 45 -> 25 tokens in the 2 feature layers, CLS dropped
    ("fastv", dict(layer=1, keep=16), 16),
    ("vispruner", dict(keep=16, important=8), 16),
    ("divprune", dict(keep=16), 16),
    ("fastervlm", dict(keep=16), 16),
    ("pool", dict(keep=16), 16),
]


def model_args(checkpoint: str, method: Optional[str] = None, params: Optional[Dict[str, Any]] = None,
               **extra: Any) -> str:
    """``--model_args`` text, as a user would type it."""
    args = {"pretrained": checkpoint, "device": "cpu", "dtype": "float64", **extra}
    if method:
        args["method"] = method
    args.update(params or {})
    return ",".join(f"{k}={v}" for k, v in args.items())


def evaluate(model: Any, task_manager: Any, *, args: str = "", tasks: Sequence[str] = SMOKE,
             batch_size: int = 1) -> Dict[str, Any]:
    """lmms-eval's Python API on ``tasks``; raises if lmms-eval returns without a result for every task."""
    from lmms_eval.evaluator import simple_evaluate

    out = simple_evaluate(model=model, model_args=args, tasks=list(tasks), task_manager=task_manager,
                          batch_size=batch_size, device="cpu", log_samples=True, bootstrap_iters=0,
                          verbosity="WARNING", force_simple=True)
    assert out is not None, "lmms-eval returned no results"
    missing = [t for t in tasks if t not in out["results"] or t not in out.get("samples", {})]
    assert not missing, f"no results for {missing}: {sorted(out['results'])}"
    return out


def responses(out: Dict[str, Any], task: str) -> Dict[int, Any]:
    """``doc_id -> filtered response`` (the generated text, or the list of (nll, greedy) per choice)."""
    rows = {}
    for s in out["samples"][task]:
        resp = s["filtered_resps"]
        rows[s["doc_id"]] = resp[0] if task == "tr_smoke_gen" else [tuple(r) for r in resp]
    return rows


def read_records(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_cli(args: Sequence[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m lmms_eval ARGS`` with ``--verbosity DEBUG``, which makes lmms-eval 0.7.3 re-raise errors it
    otherwise logs before exiting 0; the caller still checks that the results file exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lmms_eval", *args, "--verbosity", "DEBUG"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli_results(out_dir: Path) -> Dict[str, Any]:
    """The results JSON lmms-eval wrote under ``out_dir`` (AssertionError if there is none)."""
    found = sorted(out_dir.rglob("*results*.json"))
    assert found, f"lmms-eval wrote no results file under {out_dir}: the run failed"
    return json.loads(found[-1].read_text())
