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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

from .. import api
from ..configs import CONFIG_DIR, ConfigError, load_config
from ..core import get_method, list_methods, resolve_params
from ..evaluation.datasets import FashionMNIST, describe_transform, eval_data_config, fashion_mnist_dir, image_folder
from ..evaluation.distributed import init_distributed, make_loader, rank_and_world
from ..evaluation.evaluate import evaluate
from ..evaluation.models import build_model as build_named_model
from ..evaluation.report import format_params, markdown_table, number, short_params, write_rows
from ..evaluation.timing import AMP_DTYPES, device_description
from .common import parse_params

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


def is_default_job(args: argparse.Namespace) -> bool:
    """No data, model, method or config named: evaluate the reference model with every method."""
    return not any([args.data, args.model, args.method, args.config, args.param])


# ---------------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, model_kwargs: Dict[str, Any]) -> nn.Module:
    """The timm model named by ``--model`` (or the reference Fashion-MNIST ViT), weights loaded, eval mode."""
    return build_named_model(args.model, args.checkpoint, args.pretrained, **model_kwargs)


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
            raise ValueError(f"--method {args.method} contradicts {args.config} (a {cfg.method} config)")
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
            raise ValueError("--param needs --method or --config")
        return [Run("unpatched")], extra
    if args.baseline:
        paper = {"top1": extra.get("paper", {}).get("baseline_top1")} if extra.get("paper") else {}
        runs.insert(0, Run("unpatched", paper={k: v for k, v in paper.items() if v is not None}))
    return runs, extra


def unsupported_reason(model: nn.Module, run: "Run") -> Optional[str]:
    """Why ``patch`` would refuse this run on this model (a site or input the model lacks), or None."""
    try:
        api.check(model, run.method, **run.params)
    except (TypeError, ValueError) as e:
        return f"skipped: {str(e).split(' (it offers')[0]}"  # the site it needs is the point; the details are long
    return None


def execute(run: Run, model: nn.Module, loader, args: argparse.Namespace, device: torch.device,
            timing: Dict[str, Any]) -> Row:
    """Patch, evaluate, unpatch; a failure becomes a 'failed' row so one broken method does not stop the job."""
    row = Row(run.label, run.method or "none", format_params(run.params), "ok", note=run.note,
              paper_top1=run.paper.get("top1"))
    if run.method:
        reason = unsupported_reason(model, run)
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
def format_table(rows: Sequence[Row]) -> str:
    head = ["method", "top-1", "Δtop-1", "top-5", "GFLOPs", "img/s", "speedup", "note"]
    cells = []
    for r in rows:
        note = r.note if r.status != "ok" or not r.paper_top1 else (
            f"paper: {r.paper_top1:.2f}, here: {r.top1:.2f}" + (f"; {r.note}" if r.note else ""))
        cells.append([r.label, number(r.top1, ".2f"), number(r.delta_top1, "+.2f"), number(r.top5, ".2f"),
                      number(r.gflops, ".4f"), number(r.img_per_s, ".0f"),
                      number(r.speedup, ".2f") + "x" if r.speedup else "-", note])
    return markdown_table(head, cells)


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
        say("(the default job evaluates a subset so it finishes in minutes on a CPU; --limit 0 for all 10000)")
    if options.get("not_registered"):
        say(f"note: default_eval.yaml has settings for methods not registered here: {options['not_registered']}")
    rows = []
    for run in runs:
        row = execute(run, model, loader, args, device, options.get("timing") or {})
        rows.append(row)
        if row.status == "ok":
            say(f"  {row.label}: top-1 {row.top1:.2f}  GFLOPs {row.gflops:.4f}  img/s {number(row.img_per_s, '.0f')}"
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
    if default_job:
        print("timing note: fixed per-step costs dominate at the reference ViT's width of 32 channels (Python, op "
              "launches, each reduction step's bookkeeping), so these img/s and speedups say little about real "
              "models; for those run `tokenreduce bench` (e.g. --model vit_base_patch16_224 --batch-size 32 --profile)")
    if args.results_file:
        json_path, csv_path = write_rows(Path(args.results_file), rows, meta)
        print(f"wrote {json_path} and {csv_path}")
    if args.plot:
        from ..viz.results import plot_pareto
        title = f"{meta['model']}\n{meta['data']}"
        written = plot_pareto([r for r in rows if r.status == "ok"], Path(args.plot), title)
        print(f"wrote {written}" if written else "no plot: matplotlib is not installed "
              "(pip install 'tokenreduce[plot]')")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
