"""``tokenreduce eval`` / ``tools/eval_imagenet.py``: evaluate a model unpatched and with token-reduction methods.

With no arguments it runs the offline default job: the reference ViT on the Fashion-MNIST test set, unpatched and
with every registered method at its default setting from ``configs/default_eval.yaml``; it prints one table,
writes ``results/default.json`` (+ CSV) and a Pareto plot (top-1 against GFLOPs).

With ``--data DIR`` (an ImageFolder such as the ImageNet val folder) and ``--model NAME`` it follows timm's
validate.py: preprocessing from the model's pretrained config (overridable), top-1/top-5, analytic GFLOPs and
a separate synchronised throughput pass. Runs under ``torchrun`` (gloo on CPU, nccl on GPUs) with every image
counted exactly once.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

from . import api
from .configs import CONFIG_DIR, ConfigError, load_config
from .data import FashionMNIST, describe_transform, fashion_mnist_dir, eval_data_config, image_folder
from .evaluate import AMP_DTYPES, evaluate, init_distributed, make_loader, rank_and_world
from .methods import get_method, list_methods, resolve_params

DEFAULT_EVAL_CONFIG = CONFIG_DIR / "default_eval.yaml"
DEFAULT_RESULTS = Path("results") / "default.json"
_DEFAULT_KEYS = {"limit", "batch_size", "threads", "timing", "methods", "notes"}


@dataclass
class Run:
    """One row of the table: a method with parameters (or the unpatched model when ``method`` is None)."""

    label: str
    method: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)
    paper: Dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class Row:
    label: str
    method: str
    params: str
    status: str  # "ok", "skipped" or "failed"
    top1: Optional[float] = None
    top5: Optional[float] = None
    gflops: Optional[float] = None
    img_per_s: Optional[float] = None
    speedup: Optional[float] = None
    delta_top1: Optional[float] = None
    paper_top1: Optional[float] = None
    images: Optional[int] = None
    seconds: Optional[float] = None
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------
def build_parser(prog: str = "tokenreduce eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Evaluate a model unpatched and with token-reduction methods: top-1 / top-5, GFLOPs per "
                    "image, img/s.\n\nWith no arguments: the offline default job (the reference ViT on the "
                    "Fashion-MNIST test set, unpatched and with every registered method at its setting in "
                    "configs/default_eval.yaml; writes results/default.json, .csv and a Pareto plot). With --data "
                    "(an ImageFolder such as ImageNet val) and --model or --config: timm validate.py style "
                    "evaluation; runs under torchrun too."),
        epilog="""examples:
  tokenreduce eval                                   # the offline default job (Fashion-MNIST, every method)
  tokenreduce eval --method tome --param r=12 --baseline --limit 0
  tokenreduce eval --data /data/imagenet/val --config configs/tome/vit_s16_augreg_r13.yaml --baseline
  tokenreduce eval --data /data/imagenet/val --model deit_small_patch16_224.fb_in1k --pretrained \\
      --method tome --param r=13 --amp bf16 --batch-size 256
  torchrun --nproc_per_node 8 tools/eval_imagenet.py --data /data/imagenet/val --config ... --device cuda

Fashion-MNIST needs `sudo apt-get install -y dataset-fashion-mnist` (offline, from Debian).
GFLOPs are analytic multiply-accumulates per image (the papers' convention); img/s comes from a separate
synchronised timing pass on one batch.""")
    data = p.add_argument_group("data and model")
    data.add_argument("--data", default=None,
                      help="ImageFolder root (e.g. ImageNet val), or a folder with the Fashion-MNIST IDX files; "
                           "default: Debian's Fashion-MNIST test set")
    data.add_argument("--model", default=None,
                      help="timm model name, pretrained tag pinned (e.g. vit_small_patch16_224.augreg_in21k_ft_in1k); "
                           "default: the reference Fashion-MNIST ViT (or the config's model)")
    data.add_argument("--pretrained", action="store_true", help="load the timm pretrained weights (downloads)")
    data.add_argument("--checkpoint", default=None,
                      help="weights to load: .safetensors, or a torch file (loaded with weights_only=True)")
    data.add_argument("--img-size", type=int, default=None, help="input size (default: the model's pretrained cfg)")
    data.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction (default: pretrained cfg)")
    data.add_argument("--interpolation", default=None, help="resize interpolation (default: pretrained cfg)")
    data.add_argument("--limit", type=int, default=None,
                      help="evaluate only the first N images (0 = all; the default job uses a subset)")
    meth = p.add_argument_group("method")
    meth.add_argument("--method", default=None, help=f"a registered method ({', '.join(list_methods())})")
    meth.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                      help="a method parameter, value parsed as YAML (repeatable), e.g. --param r=13 "
                           "--param 'r=[16,-1.0]'; see `tokenreduce methods`")
    meth.add_argument("--config", default=None,
                      help="a published setting: configs/<method>/<setting>.yaml (gives method, params, model, "
                           "preprocessing and the paper's accuracy); --param overrides its params")
    meth.add_argument("--baseline", action="store_true", help="also evaluate the unpatched model, with differences")
    run = p.add_argument_group("execution")
    run.add_argument("--batch-size", type=int, default=None, help="images per batch (default 256; 100 on CPU)")
    run.add_argument("--workers", type=int, default=None, help="data-loading workers (default 4; 0 for Fashion-MNIST)")
    run.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None, help="autocast dtype (default: fp32)")
    run.add_argument("--channels-last", action="store_true", help="NHWC input and patch embedding")
    run.add_argument("--compile", action="store_true", help="torch.compile the (patched) model")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's; the default job uses 1, see default_eval.yaml)")
    run.add_argument("--timing-repeats", type=int, default=5, help="timed runs in the throughput pass (median)")
    run.add_argument("--no-timing", action="store_true", help="skip the throughput pass")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    out = p.add_argument_group("output")
    out.add_argument("--results-file", default=None,
                     help="write the rows as JSON to this path and as CSV beside it (same name, .csv)")
    out.add_argument("--plot", default=None, help="write a Pareto plot (top-1 vs GFLOPs) PNG here")
    out.add_argument("--default-config", default=str(DEFAULT_EVAL_CONFIG),
                     help="method settings of the default job (default: %(default)s)")
    return p


def _wrap(text: str) -> str:
    import textwrap
    return "\n\n".join(textwrap.fill(par, 100) for par in text.split("\n\n"))


def parse_params(items: Sequence[str]) -> Dict[str, Any]:
    """``["r=13", "prop_attn=false"]`` -> ``{"r": 13, "prop_attn": False}`` (values are YAML)."""
    params: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --param expects KEY=VALUE, got {item!r}")
        params[key.strip()] = yaml.safe_load(value)
    return params


def is_default_job(args: argparse.Namespace) -> bool:
    """No data, model, method or config named: evaluate the reference model with every method."""
    return not any([args.data, args.model, args.method, args.config, args.param])


# ---------------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------------
def load_weights(model: nn.Module, path: str) -> None:
    """Load a safetensors or torch checkpoint (``weights_only=True``), unwrapping ``model`` / ``state_dict``
    containers and DDP's ``module.`` prefix; falls back to timm's checkpoint filter for foreign layouts (e.g.
    the MAE fine-tuned weights)."""
    if path.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError:
        from timm.models.vision_transformer import checkpoint_filter_fn
        model.load_state_dict(checkpoint_filter_fn(state, model))


def build_model(args: argparse.Namespace, model_kwargs: Dict[str, Any]) -> nn.Module:
    """The timm model named by ``--model`` (or the reference Fashion-MNIST ViT), weights loaded, eval mode."""
    from .reference import create_reference_model, load_reference_model
    if args.model is None:
        if args.checkpoint:
            return load_reference_model(args.checkpoint)
        return load_reference_model()
    import timm
    if args.model == "fmnist_reference":
        model = create_reference_model(**model_kwargs)
    else:
        model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    return model.eval()


def is_fmnist_dir(path: Optional[str]) -> bool:
    if path is None:
        return True
    return any(Path(path).glob("t10k-images-idx3-ubyte*"))


def build_dataset(args: argparse.Namespace, model: nn.Module):
    """``(dataset, description)``: Fashion-MNIST for the reference model, else an ImageFolder with timm's
    preprocessing from the model's pretrained config (with the command-line overrides)."""
    if is_fmnist_dir(args.data):
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        chans, size = (cfg.get("input_size") or (1, 28, 28))[0], args.img_size or (cfg.get("input_size") or
                                                                                   (1, 28, 28))[-1]
        limit = args.limit or None
        ds = FashionMNIST(args.data, train=False, img_size=size, channels=chans, limit=limit)
        full = 10000 if limit is None else f"first {len(ds)} of 10000"
        return ds, f"Fashion-MNIST test set ({full} images), {size}x{size}, {chans} channel(s)"
    pre = getattr(args, "preprocessing", None) or {}
    data_config = eval_data_config(model, img_size=args.img_size, crop_pct=args.crop_pct,
                                   interpolation=args.interpolation, mean=pre.get("mean"), std=pre.get("std"),
                                   crop_mode=pre.get("crop_mode"))
    ds = image_folder(args.data, data_config)
    if args.limit:
        ds = torch.utils.data.Subset(ds, range(min(len(ds), args.limit)))
    return ds, f"ImageFolder {args.data} ({len(ds)} images), {describe_transform(data_config)}"


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------
def fmt_params(params: Dict[str, Any]) -> str:
    """``r=8, prop_attn=false``: the full parameters (results files)."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())


def short_params(params: Dict[str, Any]) -> str:
    """A compact form for table rows: long lists are shortened to their ends (``[197,197,...,55]``)."""
    def short(v: Any) -> str:
        if isinstance(v, (list, tuple)) and len(v) > 4:
            return f"[{json.dumps(v[0])},{json.dumps(v[1])},...,{json.dumps(v[-1])}]"
        return json.dumps(v, separators=(",", ":"))
    return " ".join(f"{k}={short(v)}" for k, v in params.items())


def load_default_job(path: str) -> Tuple[List[Run], Dict[str, Any]]:
    """The default job's runs: the unpatched model, then every registered method at its setting(s) from the
    YAML file (a mapping of parameters, or a list of them for several points); a method without an entry runs
    at its own defaults, with a note."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(data) - _DEFAULT_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {', '.join(sorted(_DEFAULT_KEYS))}")
    settings = data.get("methods") or {}
    runs = [Run("unpatched")]
    for name in list_methods():
        entry = settings.get(name)
        if entry is None:
            runs.append(Run(name, name, {}, note="method defaults (no entry in default_eval.yaml)"))
            continue
        for params in entry if isinstance(entry, list) else [entry]:
            runs.append(Run(f"{name} {short_params(params)}", name, dict(params or {})))
    extra = sorted(set(settings) - set(list_methods()))
    options = {"limit": data.get("limit"), "batch_size": data.get("batch_size"), "threads": data.get("threads"),
               "timing": data.get("timing") or {}, "not_registered": extra}
    return runs, options


def plan_runs(args: argparse.Namespace) -> Tuple[List[Run], Dict[str, Any]]:
    """The runs asked for on the command line, and model settings a config brings."""
    given = parse_params(args.param)
    extra: Dict[str, Any] = {}
    if args.config:
        cfg = load_config(args.config)
        if args.method and args.method != cfg.method:
            raise SystemExit(f"error: --method {args.method} contradicts {args.config} (a {cfg.method} config)")
        params = {**cfg.params, **given}
        resolve_params(cfg.method, params)
        extra = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "checkpoint": cfg.checkpoint,
                 "preprocessing": cfg.preprocessing, "paper": cfg.paper, "config": str(cfg.path)}
        runs = [Run(f"{cfg.method} {short_params(params)}", cfg.method, params, paper=cfg.paper)]
    elif args.method:
        get_method(args.method)
        resolve_params(args.method, given)
        runs = [Run(f"{args.method} {short_params(given)}".strip(), args.method, given)]
    else:
        if given:
            raise SystemExit("error: --param needs --method or --config")
        return [Run("unpatched")], extra
    if args.baseline:
        paper = {"top1": extra.get("paper", {}).get("baseline_top1")} if extra.get("paper") else {}
        runs.insert(0, Run("unpatched", paper={k: v for k, v in paper.items() if v is not None}))
    return runs, extra


def unsupported_reason(model: nn.Module, method: str) -> Optional[str]:
    """Why ``method`` cannot run on this model (a site or input the adapter lacks), or None."""
    from .backbones import find_adapter
    adapter = find_adapter(model)
    cls = get_method(method)
    if cls.site not in adapter.sites:
        needs = "a LLaVA model" if cls.site.value in ("tower_out", "llm_layer") else f"site {cls.site.value}"
        return f"skipped: acts at {cls.site.value}, needs {needs}"
    missing = set(cls.needs) - set(adapter.provides)
    if missing:
        return f"skipped: needs {sorted(missing)} from the model"
    return None


def execute(run: Run, model: nn.Module, loader, args: argparse.Namespace, device: torch.device,
            timing: Dict[str, Any]) -> Row:
    """Patch, evaluate, unpatch; a failure becomes a 'failed' row so one broken method does not stop the job."""
    row = Row(run.label, run.method or "none", fmt_params(run.params), "ok", note=run.note,
              paper_top1=run.paper.get("top1"))
    if run.method:
        reason = unsupported_reason(model, run.method)
        if reason:
            row.status, row.note = "skipped", reason
            return row
    start = time.perf_counter()
    try:
        if run.method:
            api.patch(model, run.method, **run.params)
        metrics = evaluate(model, loader, device=device, amp=args.amp, channels_last=args.channels_last,
                           compile=args.compile, timing=not args.no_timing,
                           timing_warmup=int(timing.get("warmup", 2)),
                           timing_repeats=int(timing.get("repeats", args.timing_repeats)),
                           progress=not args.no_progress, desc=run.label[:40])
    except Exception as e:  # noqa: BLE001 - reported in the table, and the exit status
        row.status, row.note = "failed", f"{type(e).__name__}: {e}"
        return row
    finally:
        if api.is_patched(model):
            api.unpatch(model)
    row.top1, row.top5, row.gflops = metrics.top1, metrics.top5, metrics.gflops
    row.img_per_s, row.images = metrics.img_per_s, metrics.images
    row.seconds = time.perf_counter() - start
    return row


def add_differences(rows: List[Row]) -> None:
    """Speedup and top-1 change against the unpatched row, when there is one."""
    base = next((r for r in rows if r.method == "none" and r.status == "ok"), None)
    if base is None:
        return
    for r in rows:
        if r.status != "ok":
            continue
        r.delta_top1 = r.top1 - base.top1
        if r.img_per_s and base.img_per_s:
            r.speedup = r.img_per_s / base.img_per_s


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(rows: Sequence[Row]) -> str:
    head = ["method", "top-1", "Δtop-1", "top-5", "GFLOPs", "img/s", "speedup", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        note = r.note if r.status != "ok" or not r.paper_top1 else (
            f"paper: {r.paper_top1:.2f}, here: {r.top1:.2f}" + (f"; {r.note}" if r.note else ""))
        lines.append(f"| {r.label} | {_f(r.top1, '.2f')} | {_f(r.delta_top1, '+.2f')} | {_f(r.top5, '.2f')} | "
                     f"{_f(r.gflops, '.4f')} | {_f(r.img_per_s, '.0f')} | "
                     f"{_f(r.speedup, '.2f') + 'x' if r.speedup else '-'} | {note} |")
    return "\n".join(lines)


def write_results(path: Path, rows: Sequence[Row], meta: Dict[str, Any]) -> Tuple[Path, Path]:
    """``path`` as JSON ({meta..., rows: [...]}) and the same rows as CSV beside it."""
    path = Path(path)
    json_path = path if path.suffix == ".json" else path.with_suffix(".json")
    csv_path = json_path.with_suffix(".csv")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return json_path, csv_path


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The (GFLOPs, top-1) points no other point beats on both (lower GFLOPs, higher top-1), by GFLOPs."""
    front, best = [], -math.inf
    for g, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((g, a))
            best = a
    return front


def plot_pareto(rows: Sequence[Row], path: Path, title: str) -> Optional[Path]:
    """Top-1 against GFLOPs, one marker per method, the Pareto front as a line. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.status == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    methods = sorted({r.method for r in ok})
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        pts = sorted((r.gflops, r.top1) for r in ok if r.method == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*" if m == "none" else "o",
                markersize=12 if m == "none" else 6, color=cmap(i % 10), label="unpatched" if m == "none" else m,
                linestyle="-" if len(pts) > 1 else "none")
    base = next((r for r in ok if r.method == "none"), None)
    if base is not None:
        ax.axhline(base.top1, color="0.75", linewidth=0.8, linestyle="--", zorder=0)
    front = pareto_front([(r.gflops, r.top1) for r in ok])
    ax.plot([p[0] for p in front], [p[1] for p in front], color="0.6", linestyle=":", zorder=0, label="Pareto front")
    ax.set_xlabel("GFLOPs per image (analytic MACs)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' if threads > 1 else ''}"


# ---------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None, prog: str = "tokenreduce eval") -> int:
    args = build_parser(prog).parse_args(argv)
    started = time.perf_counter()
    default_job = is_default_job(args)
    try:
        if default_job:
            runs, options = load_default_job(args.default_config)
            extra: Dict[str, Any] = {}
        else:
            runs, extra = plan_runs(args)
            options = {"timing": {}}
    except (ConfigError, FileNotFoundError, TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _apply_config_defaults(args, extra, options, default_job)
    if args.model is None and not is_fmnist_dir(args.data):
        print("error: --data is an ImageFolder: name the model with --model (or a --config that names one)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = rank_and_world()
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        if is_fmnist_dir(args.data):
            fashion_mnist_dir(args.data)  # a missing dataset is the first thing a fresh machine must fix
        model = build_model(args, extra.get("model_kwargs") or {})
        dataset, data_desc = build_dataset(args, model)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fmnist = is_fmnist_dir(args.data)
    batch = args.batch_size or (100 if device.type == "cpu" else 256)
    workers = args.workers if args.workers is not None else (0 if fmnist else 4)
    loader = make_loader(dataset, batch, workers, device)
    model_desc = args.model or "reference Fashion-MNIST ViT (checkpoints/fmnist_vit_reference.safetensors)"
    say(f"model: {model_desc}\ndata: {data_desc}\ndevice: {device_description(device)} x {world} process(es); "
        f"batch {batch}, amp {args.amp or 'off'}")
    if default_job and args.limit is None:
        say(f"(the default job evaluates a subset so it finishes in minutes on a CPU; --limit 0 for all 10000)")
    if options.get("not_registered"):
        say(f"note: default_eval.yaml has settings for methods not registered here: {options['not_registered']}")
    rows = []
    for run in runs:
        row = execute(run, model, loader, args, device, options.get("timing") or {})
        rows.append(row)
        if row.status == "ok":
            say(f"  {row.label}: top-1 {row.top1:.2f}  GFLOPs {row.gflops:.4f}  img/s {_f(row.img_per_s, '.0f')}"
                f"  ({row.seconds:.1f}s)" + (f"  paper: {row.paper_top1:.2f}, here: {row.top1:.2f}"
                                            if row.paper_top1 else ""))
        else:
            say(f"  {row.label}: {row.note if row.note.startswith(row.status) else row.status + ': ' + row.note}")
    add_differences(rows)
    wall = time.perf_counter() - started
    if rank == 0:
        _report(rows, args, default_job, {
            "job": "default" if default_job else "custom", "model": model_desc, "data": data_desc,
            "device": device_description(device), "processes": world, "torch": torch.__version__,
            "batch_size": batch, "amp": args.amp, "config": extra.get("config"), "paper": extra.get("paper"),
            "wall_seconds": round(wall, 1)})
    return 1 if any(r.status == "failed" for r in rows) else 0


def _apply_config_defaults(args: argparse.Namespace, extra: Dict[str, Any], options: Dict[str, Any],
                           default_job: bool) -> None:
    """Settings a config or the default job supplies, unless given on the command line."""
    if extra.get("model") and args.model is None:
        args.model = extra["model"]
        args.pretrained = args.pretrained or not (args.checkpoint or extra.get("checkpoint"))
    if extra.get("checkpoint") and not args.checkpoint:
        args.checkpoint = extra["checkpoint"]
    pre = extra.get("preprocessing") or {}
    args.preprocessing = pre  # mean / std / crop_mode have no command-line flags: only a config sets them
    args.img_size = args.img_size or pre.get("img_size")
    args.crop_pct = args.crop_pct or pre.get("crop_pct")
    args.interpolation = args.interpolation or pre.get("interpolation")
    if default_job:
        if args.limit is None and options.get("limit"):
            args.limit = int(options["limit"])
        args.batch_size = args.batch_size or options.get("batch_size")
        args.threads = args.threads or options.get("threads")
        if args.results_file is None:
            args.results_file = str(DEFAULT_RESULTS)
        if args.plot is None:
            args.plot = str(Path(args.results_file).with_name(Path(args.results_file).stem + "_pareto.png"))


def _report(rows: List[Row], args: argparse.Namespace, default_job: bool, meta: Dict[str, Any]) -> None:
    print()
    print(format_table(rows))
    print(f"\nGFLOPs: analytic multiply-accumulates per image; speedup: img/s against the unpatched model, "
          f"measured here ({meta['device']}); wall time {meta['wall_seconds']:.0f}s")
    if args.results_file:
        json_path, csv_path = write_results(Path(args.results_file), rows, meta)
        print(f"wrote {json_path} and {csv_path}")
    if args.plot:
        title = f"{meta['model']}\n{meta['data']}"
        written = plot_pareto(rows, Path(args.plot), title)
        print(f"wrote {written}" if written else "no plot: matplotlib is not installed "
              "(pip install 'tokenreduce[plot]')")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
