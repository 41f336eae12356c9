"""``tokenreduce eval-vlm``: a VLM unpatched and with methods × budgets, through lmms-eval, as one table.

    tokenreduce eval-vlm                      # offline smoke job: tiny random LLaVA, five local samples
    tokenreduce eval-vlm --model llava-hf/llava-1.5-7b-hf --suite llava15 \\
        --tasks gqa,mmbench_en_dev,mme,pope,scienceqa_img,textvqa_val --batch-size 8

A suite is a folder of configs, ``configs/vlm/<suite>/<method>_<visual tokens>.yaml`` (one file per method ×
budget, the format of ``tokenreduce.configs``), so ``--methods`` and ``--budgets`` pick from it by file name. The
model is loaded once; each run patches it in place (or unpatches it) and evaluates it with lmms-eval's Python
API through the ``tokenreduce`` lmms-eval model. Written to ``--out``: ``results.md`` (also printed),
``results.csv``, ``results.json`` (everything, with lmms-eval's raw results), ``records.jsonl`` (visual tokens and
prefill time per sample) and ``score_vs_tokens.png``.

Columns: per task lmms-eval's score (its first metric unless ``--metric TASK=NAME``); ``rel %``, the mean over
tasks of score / unpatched score; ``same %``, the share of answers identical to the unpatched run's (for
multiple choice, the same option); visual tokens kept to the last layer and averaged over the LLM's layers,
measured at prefill; prefill time per sample.

Exit status: 0; 1 when a run failed (the others still run, the table says which); 2 for bad arguments (one
``error:`` line). A run that ``tokenreduce.patch`` refuses on this model is listed as refused, with the reason,
and is not a failure.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

PROG = "tokenreduce eval-vlm"
_BUDGET = re.compile(r"^(?P<method>.+)_(?P<budget>\d+)$")


class UsageError(Exception):
    """Bad arguments: reported as one ``error:`` line, exit status 2."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless the help already says what the default is, or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clean line instead of usage + message
        raise UsageError(message)


@dataclass
class Run:
    """One evaluation: ``config`` None is the unpatched model."""

    name: str
    method: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)
    budget: Optional[int] = None
    config: Optional[Path] = None


@dataclass
class Row:
    """A run's results (``error`` set when it could not run or was refused)."""

    run: Run
    scores: Dict[str, Optional[float]] = field(default_factory=dict)
    relative: Optional[float] = None
    same: Optional[float] = None
    visual_in: Optional[float] = None
    visual_kept: Optional[float] = None
    visual_mean: Optional[float] = None
    prefill_ms: Optional[float] = None
    answers: Dict[str, Dict[Any, Any]] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    refused: bool = False  # tokenreduce.patch refused the method on this model (not a failure)


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, formatter_class=_Formatter,
                description="Evaluate a VLM unpatched and with token-reduction methods at the papers' budgets "
                            "through lmms-eval; writes one table and a score-vs-visual-tokens plot. With no "
                            "--model: the offline smoke job (a tiny random LLaVA built on the spot and five "
                            "local samples).")
    p.add_argument("--model", default=None,
                   help="checkpoint folder or hub id (in the local cache); default: the tiny smoke model")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lmms-eval tasks; default with --model unset: tr_smoke_gen,tr_smoke_mc")
    p.add_argument("--suite", default=None,
                   help="budget suite under configs/vlm/ (llava15, llava_next, smoke); default: smoke for the "
                        "smoke job, none otherwise (then give --config)")
    p.add_argument("--methods", default=None, help="comma-separated methods of the suite to run (default: all of them)")
    p.add_argument("--budgets", default=None, help="comma-separated visual-token budgets of the suite (default: all of them)")
    p.add_argument("--config", action="append", default=[], metavar="CONFIG",
                   help="an extra run from a config file or name (repeatable; none by default)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unpatched run (no rel %% / same %%)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="folder of extra lmms-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=_limit, default=None, help="samples per task (default: all)")
    p.add_argument("--batch-size", type=_positive, default=None, help="requests per batch (default: 8; smoke job: 1)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu; auto: cuda when available")
    p.add_argument("--dtype", default=None,
                   help="auto (the checkpoint's), bfloat16, float16, float32, float64 (default: auto; smoke float32)")
    p.add_argument("--attn", default=None, help="attn_implementation: sdpa (transformers' default), eager, ...")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (default: torch's; smoke job: 1, steadier on a small shared CPU)")
    p.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC",
                   help="the metric to report for a task, repeatable (default: the task's first metric)")
    p.add_argument("--out", default="results/eval_vlm", help="output folder")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--verbosity", default="WARNING", help="lmms-eval's log level")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _limit(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _csv(text: Optional[str]) -> List[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _metric_overrides(items: Sequence[str]) -> Dict[str, str]:
    out = {}
    for item in items:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise UsageError(f"--metric expects TASK=METRIC, got {item!r}")
        out[task.strip()] = metric.strip()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Planning runs
# ---------------------------------------------------------------------------------------------------------------
def suite_dir(name: str) -> Path:
    from tokenreduce.configs import CONFIG_DIR
    return Path(CONFIG_DIR) / "vlm" / name


def list_suites() -> List[str]:
    root = suite_dir("")
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def suite_runs(name: str, methods: Sequence[str] = (), budgets: Sequence[int] = ()) -> Tuple[List[Run], List[str]]:
    """The runs of a suite, by method then budget, and notes on the configs skipped (method not registered).

    Raises UsageError for an unknown suite, or for a ``methods`` / ``budgets`` entry the suite does not have.
    """
    import tokenreduce

    folder = suite_dir(name)
    if not folder.is_dir():
        raise UsageError(f"unknown suite {name!r}; suites: {', '.join(list_suites()) or 'none'}")
    found: List[Run] = []
    for path in sorted(folder.glob("*.yaml")):
        m = _BUDGET.match(path.stem)
        if m is None:
            raise UsageError(f"{path}: suite configs are named <method>_<visual tokens>.yaml")
        found.append(Run(name=path.stem, method=m["method"], budget=int(m["budget"]), config=path))
    _check_subset("method", methods, {r.method for r in found}, name)
    _check_subset("budget", budgets, {r.budget for r in found}, name)
    runs = [r for r in found if (not methods or r.method in methods) and (not budgets or r.budget in budgets)]
    registered = set(tokenreduce.list_methods())
    notes = sorted({f"{r.method}: not registered in this tokenreduce, its configs are skipped"
                    for r in runs if r.method not in registered})
    runs = [r for r in runs if r.method in registered]
    for r in runs:
        r.params = _config_params(r.config)
    return sorted(runs, key=lambda r: (r.method, r.budget)), notes


def _check_subset(what: str, asked: Sequence[Any], have: set, suite: str) -> None:
    missing = [a for a in asked if a not in have]
    if missing:
        raise UsageError(f"suite {suite!r} has no {what} {', '.join(map(str, missing))}; it has: "
                         f"{', '.join(map(str, sorted(have)))}")


def _config_params(path: Path) -> Dict[str, Any]:
    from tokenreduce.configs import load_config
    return dict(load_config(path).params)


def config_run(ref: str) -> Run:
    """A run from ``--config`` (a path or a name under configs/)."""
    from tokenreduce.configs import load_config, resolve_config_path
    try:
        path = resolve_config_path(ref)
        cfg = load_config(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    m = _BUDGET.match(path.stem)
    return Run(name=path.stem, method=cfg.method, params=dict(cfg.params),
               budget=int(m["budget"]) if m else None, config=path)


def plan(args: argparse.Namespace) -> Tuple[List[Run], List[str]]:
    """Unpatched first (unless ``--no-baseline``), then the suite's runs, then ``--config`` runs."""
    suite = args.suite if args.suite is not None else ("smoke" if args.model is None else None)
    runs: List[Run] = [] if args.no_baseline else [Run(name="unpatched")]
    notes: List[str] = []
    if suite not in (None, "none"):
        budgets = []
        for b in _csv(args.budgets):
            if not b.isdigit():
                raise UsageError(f"--budgets expects numbers, got {b!r}")
            budgets.append(int(b))
        found, notes = suite_runs(suite, _csv(args.methods), budgets)
        runs += found
    elif args.methods or args.budgets:
        raise UsageError("--methods / --budgets select from a suite: give --suite too")
    runs += [config_run(ref) for ref in args.config]
    if not runs:
        raise UsageError("nothing to run: no suite, no --config and --no-baseline")
    return runs, notes


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
def _import_lmms() -> Any:
    try:
        import lmms_eval  # noqa: F401
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager
    except ImportError as e:
        raise UsageError(f"{PROG} needs lmms-eval ({e}); install it in its own venv: "
                         "bash tools/ci/lmms_job.sh builds one, or pip install 'tokenreduce[lmms]'") from None
    return simple_evaluate, TaskManager


def evaluate_run(run: Run, loaded: Any, tasks: List[str], task_manager: Any, args: argparse.Namespace,
                 metrics: Dict[str, str], records_path: Path) -> Row:
    """Patch ``loaded.model`` as ``run`` says, evaluate it on ``tasks``, summarise. Exceptions propagate."""
    simple_evaluate, _ = _import_lmms()
    from .model import TokenReduceLMM

    lm = TokenReduceLMM(loaded=loaded, method=run.method, batch_size=args.batch_size, **run.params)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=args.limit, log_samples=True,
                          bootstrap_iters=0, verbosity=args.verbosity, batch_size=args.batch_size)
    if out is None or "results" not in out:
        raise RuntimeError("lmms-eval returned no results")
    row = Row(run=run, raw={t: _jsonable(out["results"].get(t)) for t in tasks})
    for task in tasks:
        row.scores[task] = primary_score(out["results"].get(task) or {}, metrics.get(task))
        row.answers[task] = answers(out.get("samples", {}).get(task, []))
    _add_records(row, lm.records)
    with open(records_path, "a") as f:
        f.writelines(json.dumps({"run": run.name, **r}) + "\n" for r in lm.records)
    return row


def primary_score(task_results: Dict[str, Any], metric: Optional[str] = None) -> Optional[float]:
    """The task's ``metric`` (or its first metric), from lmms-eval's ``{"acc,none": 0.4, ...}``."""
    for key, value in task_results.items():
        name = key.split(",", 1)[0]
        if key == "alias" or "_stderr" in name or (metric is not None and name != metric):
            continue
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    if metric is not None:
        raise UsageError(f"--metric {metric}: the task reports only {sorted(k.split(',')[0] for k in task_results)}")
    return None


def answers(samples: Sequence[Dict[str, Any]]) -> Dict[Any, Any]:
    """``doc_id -> answer``: the filtered text, or for multiple choice the chosen option (lowest NLL)."""
    out = {}
    for s in samples:
        resp = s.get("filtered_resps")
        if isinstance(resp, list) and resp and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resp):
            resp = min(range(len(resp)), key=lambda i: float(resp[i][0]))  # multiple choice: argmin NLL
        elif isinstance(resp, list) and len(resp) == 1:
            resp = resp[0]
        out[s.get("doc_id")] = resp if isinstance(resp, (int, float, str)) else json.dumps(resp, default=str)
    return out


def _add_records(row: Row, records: Sequence[Dict[str, Any]]) -> None:
    if not records:
        return
    n = len(records)
    row.visual_in = sum(r["visual_in"] for r in records) / n
    row.visual_kept = sum(r["visual_kept"] for r in records) / n
    row.visual_mean = sum(r["visual_mean"] for r in records) / n
    row.prefill_ms = 1000 * sum(r["prefill_s"] / r["batch_size"] for r in records) / n


def compare(rows: List[Row], tasks: Sequence[str]) -> None:
    """Fill ``relative`` and ``same`` of every row against the unpatched row (when there is one)."""
    base = next((r for r in rows if r.run.method is None and r.error is None), None)
    if base is None:
        return
    for row in rows:
        if row.error is not None:
            continue
        ratios = [row.scores[t] / base.scores[t] for t in tasks
                  if row.scores.get(t) is not None and base.scores.get(t)]
        row.relative = 100 * sum(ratios) / len(ratios) if ratios else None
        pairs = [(a, base.answers[t].get(d)) for t in tasks for d, a in row.answers.get(t, {}).items()]
        row.same = 100 * sum(a == b for a, b in pairs) / len(pairs) if pairs else None


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
COLUMNS = ("run", "method", "budget", "visual kept", "visual mean/layer")


def table_rows(rows: Sequence[Row], tasks: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    head = list(COLUMNS) + list(tasks) + ["rel %", "same %", "prefill ms/sample", "note"]
    body = []
    for r in rows:
        body.append([r.run.name, r.run.method or "-", _fmt(r.run.budget, "{}"), _fmt(r.visual_kept, "{:.1f}"),
                     _fmt(r.visual_mean, "{:.1f}")] + [_fmt(r.scores.get(t), "{:.4f}") for t in tasks]
                    + [_fmt(r.relative, "{:.1f}"), _fmt(r.same, "{:.1f}"), _fmt(r.prefill_ms, "{:.2f}"),
                       (r.error or "").replace("|", "/")])
    return head, body


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return spec.format(value)


def markdown(head: List[str], body: List[List[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def write_outputs(out: Path, rows: List[Row], tasks: Sequence[str], meta: Dict[str, Any], plot: bool) -> List[Path]:
    head, body = table_rows(rows, tasks)
    md = markdown(head, body)
    notes = "".join(f"\n- {n}" for n in meta.get("notes", []))
    (out / "results.md").write_text(f"# {PROG}: {meta['model']}\n\n{md}\n{notes}\n")
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([head] + body)
    dump = {"meta": meta, "rows": [{"run": r.run.name, "method": r.run.method, "params": r.run.params,
                                    "budget": r.run.budget, "config": str(r.run.config) if r.run.config else None,
                                    "scores": r.scores, "relative": r.relative, "same": r.same,
                                    "visual_in": r.visual_in, "visual_kept": r.visual_kept,
                                    "visual_mean": r.visual_mean, "prefill_ms": r.prefill_ms, "error": r.error,
                                    "lmms_eval": r.raw} for r in rows]}
    (out / "results.json").write_text(json.dumps(dump, indent=1, default=str))
    written = [out / "results.md", out / "results.csv", out / "results.json"]
    if plot:
        png = plot_score_vs_tokens(rows, out / "score_vs_tokens.png", str(meta["model"]))
        if png is not None:
            written.append(png)
    return written


def plot_score_vs_tokens(rows: Sequence[Row], path: Path, title: str) -> Optional[Path]:
    """Relative score and same-answer share vs visual tokens kept, one line per method; None if nothing to plot."""
    points = [r for r in rows if r.error is None and r.visual_kept is not None]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A panel only for what was measured (rel % is undefined when the unpatched model scores 0 everywhere).
    panels = [(attr, label) for attr, label in (("relative", "score vs unpatched (%)"),
                                                ("same", "answers same as unpatched (%)"))
              if any(getattr(r, attr) is not None for r in points if r.run.method)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True, squeeze=False)
    for ax, (attr, label) in zip(axes[0], panels):
        for method in sorted({r.run.method for r in points if r.run.method}):
            pts = sorted((r.visual_kept, getattr(r, attr)) for r in points
                         if r.run.method == method and getattr(r, attr) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        base = [r for r in points if r.run.method is None]
        if base:
            ax.axhline(100, color="grey", ls="--", lw=1)
            ax.plot([base[0].visual_kept], [100], marker="*", ms=12, color="black", ls="", label="unpatched")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens kept (measured)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{PROG}: {title}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; 0 on success, 1 when a run failed, 2 for bad arguments."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        return _main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    smoke = args.model is None
    if smoke and args.tasks is None and args.include_path:
        raise UsageError("--include-path without --tasks: name the tasks to run")
    if not smoke and args.tasks is None:
        raise UsageError("--tasks is required with --model (e.g. --tasks gqa,mme,pope)")
    runs, notes = plan(args)
    metrics = _metric_overrides(args.metric)
    simple_evaluate, TaskManager = _import_lmms()
    from tqdm import tqdm

    from .loading import load_vlm
    from .patching import PatchRefused
    from .smoke import SMOKE_TASKS, build_tiny_llava, smoke_task_dir

    threads = args.threads or (1 if smoke else None)
    if threads:
        import torch
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    include = list(args.include_path)
    tasks = _csv(args.tasks) if args.tasks is not None else list(SMOKE_TASKS)
    if smoke:
        try:
            include.append(str(smoke_task_dir()))
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    batch = args.batch_size or (1 if smoke else 8)
    args.batch_size = batch
    with tempfile.TemporaryDirectory(prefix="tokenreduce-smoke-") as tmp:
        pretrained = str(build_tiny_llava(Path(tmp) / "tiny_llava")) if smoke else args.model
        loaded = load_vlm(pretrained, device=args.device, dtype=args.dtype or ("float32" if smoke else "auto"),
                          attn_implementation=args.attn)
        # Only the smoke job skips indexing lmms-eval's ~1,900 built-in tasks (about 5 s).
        task_manager = TaskManager(args.verbosity, include_path=include or None, include_defaults=not smoke)
        _check_tasks(task_manager, tasks)
        records_path = out / "records.jsonl"
        records_path.write_text("")
        warm_up(loaded)
        rows = []
        for run in tqdm(runs, desc=PROG, unit="run"):
            try:
                rows.append(evaluate_run(run, loaded, tasks, task_manager, args, metrics, records_path))
            except UsageError:
                raise
            except PatchRefused as e:  # a limitation, not a failure: say it and go on
                rows.append(Row(run=run, error=f"refused: {e}", refused=True))
                print(f"{PROG}: run {run.name} refused: {e}", file=sys.stderr)
            except Exception as e:  # one failed run must not hide the others; exit status says it failed
                rows.append(Row(run=run, error=f"{type(e).__name__}: {e}"))
                print(f"{PROG}: run {run.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
    compare(rows, tasks)
    meta = {"model": "tiny random LLaVA (smoke job)" if smoke else args.model, "tasks": tasks,
            "limit": args.limit, "batch_size": batch, "device": str(loaded.device), "dtype": str(loaded.dtype),
            "family": loaded.family, "notes": notes}
    written = write_outputs(out, rows, tasks, meta, plot=not args.no_plot)
    print(markdown(*table_rows(rows, tasks)))
    for note in notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(str(p) for p in written + [records_path]))
    return 1 if any(r.error and not r.refused for r in rows) else 0


def warm_up(loaded: Any) -> None:
    """One small forward before the first run, so one-time costs (allocator, kernels, lazy imports) do not land
    in the first run's prefill time."""
    import torch
    from PIL import Image

    from .prompting import render

    text = render(loaded.processor, "warm up", 1)
    inputs = loaded.processor(text=[text], images=[Image.new("RGB", (64, 64), (128, 128, 128))],
                              return_tensors="pt", padding=True)
    with torch.inference_mode():
        loaded.model(**loaded.to_model(inputs), use_cache=False)


def _check_tasks(task_manager: Any, tasks: Sequence[str]) -> None:
    known = set(task_manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        raise UsageError(f"unknown lmms-eval task(s) {', '.join(missing)}; see `lmms-eval --tasks list` or pass "
                         "--include-path DIR for local task YAMLs")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
