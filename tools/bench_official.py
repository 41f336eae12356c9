#!/usr/bin/env python3
"""tokenreduce against the official implementations, side by side: the same random-init timm model three times
(plain timm with fused SDPA attention, patched by tokenreduce, patched by the official code), timings interleaved.

    git clone https://github.com/facebookresearch/ToMe /tmp/official/ToMe        # and PiToMe, ATC, DiffRate
    pip install --no-deps --target /tmp/timm-0.4.12 timm==0.4.12                   # for PiToMe and DiffRate
    python tools/bench_official.py --official /tmp/official/ToMe /tmp/official/PiToMe /tmp/official/ATC \\
        /tmp/official/DiffRate --official-timm /tmp/timm-0.4.12 --threads 1

Nothing of the official repositories is copied here: each checkout is put on ``sys.path`` at run time and its
public patch function is called (ToMe ``tome.patch.timm``, ATC ``SSLBackbone_setup.token_reduc.patch.timm``,
PiToMe ``algo.pitome.patch.deit``, DiffRate ``DiffRate.patch.deit``). Which repository a path holds is read from
its layout.

**timm versions.** ToMe's and ATC's patches work on timm 1.0 models: they run in this process, on a copy of the
very model the other two variants use. PiToMe's and DiffRate's patches need timm 0.4.12 (their forwards use its
``dist_token`` / ``pre_logits`` / ``drop_path`` attributes): they run in a worker process of the same Python whose
``sys.path`` starts with ``--official-timm`` (a folder with timm 0.4.12, e.g. from ``pip install --target``) or,
with ``--official-python``, in another interpreter (a venv with the official requirements). The worker builds
timm 0.4.12's ``VisionTransformer`` with the same architecture and loads this process's weights (``strict=True``);
the parent sends it "time k forwards" commands between its own timings, so the interleaving is the same as
in-process. PiToMe's package ``__init__`` imports LAVIS and transformers for its other models; the worker imports
only ``algo.pitome.patch.deit`` (and what it imports), registering the parent packages without running their
``__init__``.

**Settings** (per model, ``--setting`` overrides): ToMe ``r`` = 13 on ViT-S, 16 on ViT-B (the paper's); PiToMe
``ratio`` 0.925 (a point of the paper's DeiT sweep, ``configs/pitome``); ATC's off-the-shelf patch with the same r as
ToMe and average linkage (the patch's default; with a class token the official ``m.r = R`` removes ``R - 1`` tokens
per block, so it gets ``R = r + 1``, see docs/methods/atc.md); DiffRate's released tables ``deit_small@2.9`` /
``deit_base@11.5`` (``configs/diffrate``; ``deit_tiny@...`` for ViT-Ti).

**Same numbers first.** Before timing, every pair is run in float64 on a small batch (``--check-batch``) and the
largest logit difference is printed; the comparison is only apples to apples when it is at float64 rounding
(ATC: sklearn's tie order aside, the partitions are the same). ``--no-check`` skips it.

Timing: every variant is warmed up, then the variants take turns for ``--repeats`` rounds of ``--iters`` forwards
(the order reverses every other round, with a short pause between variants so idle OpenMP threads settle); the
median round is reported. The load average before and after is printed: on a shared machine the absolute numbers
are noisy, the ratios measured in alternation much less so.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

METHODS = ("tome", "pitome", "atc", "diffrate")

#: How to recognise each official repository by its layout (a file that only it has).
LAYOUTS = {
    "tome": "tome/patch/timm.py",
    "pitome": "algo/pitome/patch/deit.py",
    "atc": "SSLBackbone_setup/token_reduc/patch/timm.py",
    "diffrate": "DiffRate/patch/deit.py",
}

#: Official patches that need timm 0.4.12 (they run in a worker process).
OLD_TIMM = {"pitome", "diffrate"}

#: DiffRate's released tables by model width (configs/diffrate).
DIFFRATE_TABLES = {192: "deit_tiny@1.0", 384: "deit_small@2.9", 768: "deit_base@11.5"}
TOME_R = {192: 13, 384: 13, 768: 16, 1024: 8}


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------
def default_setting(method: str, width: int) -> Dict[str, Any]:
    """tokenreduce parameters of a method's published setting for a model of this width."""
    if method in ("tome", "atc"):
        params: Dict[str, Any] = {"r": TOME_R.get(width, 13)}
        if method == "atc":
            params["linkage"] = "average"
        return params
    if method == "pitome":
        return {"ratio": 0.925}
    if width not in DIFFRATE_TABLES:
        raise ValueError(f"no released DiffRate table for width {width}; give --setting diffrate:prune_kept=[...],"
                         "merge_kept=[...]")
    return {"rates": DIFFRATE_TABLES[width]}


def official_setting(method: str, params: Dict[str, Any], num_blocks: int) -> Dict[str, Any]:
    """The official code's knobs for tokenreduce's ``params`` (plain data, sent to a worker as JSON)."""
    if method == "tome":
        return {"r": params["r"], "prop_attn": params.get("prop_attn", True)}
    if method == "atc":
        # The official off-the-shelf patch removes R - 1 tokens per block when the model has a class token.
        r = params["r"]
        r = [v + 1 for v in r] if isinstance(r, list) else r + 1
        return {"r": r, "linkage": params.get("linkage", "average"), "prop_attn": params.get("prop_attn", True)}
    if method == "pitome":
        return {"ratio": params.get("ratio", params.get("keep_ratio"))}
    from tokenreduce.methods.diffrate import load_rates
    if "rates" in params:
        table = load_rates(params["rates"])
        prune, merge = table.prune_kept, table.merge_kept
    else:
        prune, merge = params["prune_kept"], params["merge_kept"]
    if len(prune) != num_blocks:
        raise ValueError(f"diffrate: {len(prune)} kept counts for a {num_blocks}-block model")
    return {"prune_kept": list(prune), "merge_kept": list(merge)}


def detect(path: str) -> str:
    """Which official repository a checkout holds (by its layout)."""
    root = Path(path)
    found = [m for m, rel in LAYOUTS.items() if (root / rel).is_file()]
    if len(found) != 1:
        raise ValueError(f"{path}: not a checkout of one of the official repositories (looked for "
                         + ", ".join(f"{m}: {rel}" for m, rel in LAYOUTS.items()) + ")")
    return found[0]


# ---------------------------------------------------------------------------------------------------------------
# The official patches (run in this process or in a worker; nothing here imports tokenreduce)
# ---------------------------------------------------------------------------------------------------------------
def _register_namespace(name: str, path: Path) -> None:
    """Make ``name`` an importable package rooted at ``path`` without running its ``__init__``."""
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]  # type: ignore[attr-defined]
        sys.modules[name] = module


def apply_official(method: str, root: str, model: torch.nn.Module, setting: Dict[str, Any]) -> torch.nn.Module:
    """Patch ``model`` in place with the official code in checkout ``root`` at ``setting``; returns it."""
    root_path = Path(root).resolve()
    if str(root_path) not in sys.path:
        sys.path.insert(0, str(root_path))
    if method == "tome":
        tome = importlib.import_module("tome")
        tome.patch.timm(model, trace_source=False, prop_attn=setting["prop_attn"])
        model.r = setting["r"]
    elif method == "atc":
        token_reduc = importlib.import_module("SSLBackbone_setup.token_reduc")
        token_reduc.patch.timm(model, "atc", setting["linkage"], trace_source=False, prop_attn=setting["prop_attn"])
        model.r = setting["r"]
    elif method == "pitome":
        for name, rel in (("algo", "algo"), ("algo.pitome", "algo/pitome"), ("algo.pitome.patch", "algo/pitome/patch")):
            _register_namespace(name, root_path / rel)
        deit = importlib.import_module("algo.pitome.patch.deit")
        with contextlib.redirect_stdout(sys.stderr):  # it prints "using pitome"
            deit.apply_patch(model, trace_source=False)
        model.ratio = setting["ratio"]
    elif method == "diffrate":
        diffrate = importlib.import_module("DiffRate")
        diffrate.patch.deit(model, trace_source=False, prune_granularity=1, merge_granularity=1)
        model.set_kept_num(setting["prune_kept"], setting["merge_kept"])
    else:
        raise ValueError(f"unknown official method {method!r}")
    return model.eval()


def logits_of(output: Any) -> torch.Tensor:
    """PiToMe's and DiffRate's forwards return ``(logits, flops)``."""
    return output[0] if isinstance(output, (tuple, list)) else output


def build_timm_vit(arch: Dict[str, Any]) -> torch.nn.Module:
    """``timm.models.vision_transformer.VisionTransformer(**arch)`` of whatever timm is importable."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(**arch)


def clock(name: str):
    """``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU time, all its threads)."""
    return time.process_time if name == "cpu" else time.perf_counter


class LocalRunner:
    """A model in this process, behind the worker's interface."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, clock_name: str = "wall") -> None:
        self.model, self.x, self.now = model, x, clock(clock_name)

    def warmup(self, n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                self.model(self.x)

    def time(self, iters: int) -> float:
        with torch.inference_mode():
            start = self.now()
            for _ in range(iters):
                self.model(self.x)
            return self.now() - start

    def close(self) -> None:
        pass


def _worker_main(spec_path: str) -> int:
    """The worker: build the model of its timm, load the weights, apply the official patch, serve commands."""
    spec = json.loads(Path(spec_path).read_text())
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the official code prints goes to stderr, not into the replies
    sys.stdout = sys.stderr
    for entry in reversed(spec.get("sys_path", [])):
        sys.path.insert(0, entry)
    torch.set_num_threads(spec["threads"])
    import timm
    state = torch.load(spec["weights"], map_location="cpu", weights_only=True)

    def build(dtype: torch.dtype) -> torch.nn.Module:
        with _default_dtype(dtype):
            model = build_timm_vit(spec["arch"])
            model.load_state_dict(state, strict=True)
            model = model.to(dtype).eval()
            return apply_official(spec["method"], spec["root"], model, spec["setting"])

    x = torch.load(spec["input"], weights_only=True)
    now = clock(spec.get("clock", "wall"))
    model = build(torch.float32)
    reply.write(json.dumps({"ready": True, "timm": timm.__version__}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "warmup":
            with torch.inference_mode():
                for _ in range(cmd["n"]):
                    model(x)
            out: Dict[str, Any] = {"ok": True}
        elif cmd["cmd"] == "time":
            with torch.inference_mode():
                start = now()
                for _ in range(cmd["iters"]):
                    model(x)
                out = {"seconds": now() - start}
        elif cmd["cmd"] == "check":
            check_x = torch.load(cmd["input"], weights_only=True)
            with _default_dtype(torch.float64), torch.inference_mode():
                logits = logits_of(build(torch.float64)(check_x))
            torch.save(logits, cmd["output"])
            out = {"ok": True}
        else:
            return 0
        reply.write(json.dumps(out) + "\n")
    return 0


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """The official codes create buffers in the default dtype (DiffRate's sizes, ATC's merge buffer)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class WorkerRunner:
    """An official patch in a worker process (timm 0.4.12), driven through a pipe."""

    def __init__(self, method: str, root: str, setting: Dict[str, Any], arch: Dict[str, Any], weights: Path,
                 x_path: Path, threads: int, python: str, sys_path: Sequence[str], workdir: Path,
                 clock_name: str = "wall") -> None:
        spec = workdir / f"worker_{method}.json"
        spec.write_text(json.dumps({"method": method, "root": str(Path(root).resolve()), "setting": setting,
                                    "arch": arch, "weights": str(weights), "input": str(x_path),
                                    "threads": threads, "sys_path": list(sys_path), "clock": clock_name}))
        self.workdir, self.method = workdir, method
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", str(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read()
        self.timm_version = hello.get("timm", "?")

    def _read(self) -> Dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.method} worker exited (status {self.proc.wait()}); its error is above")
        return json.loads(line)

    def _ask(self, **cmd: Any) -> Dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def warmup(self, n: int) -> None:
        self._ask(cmd="warmup", n=n)

    def time(self, iters: int) -> float:
        return float(self._ask(cmd="time", iters=iters)["seconds"])

    def check(self, x64: torch.Tensor) -> torch.Tensor:
        inp, out = self.workdir / f"check_in_{self.method}.pt", self.workdir / f"check_out_{self.method}.pt"
        torch.save(x64, inp)
        self._ask(cmd="check", input=str(inp), output=str(out))
        return torch.load(out, weights_only=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------------
def architecture(model: torch.nn.Module) -> Dict[str, Any]:
    """Constructor arguments that rebuild this plain timm ViT in any timm version (refuses anything else)."""
    blk = model.blocks[0]
    if getattr(model, "num_reg_tokens", 0) or getattr(model, "cls_token", None) is None \
            or getattr(model, "global_pool", "token") != "token" or not isinstance(model.norm_pre, torch.nn.Identity):
        raise ValueError("bench_official compares plain ViT/DeiT models (class token, token pooling, no registers)")
    for name in ("ls1", "ls2", "q_norm", "k_norm"):
        mod = getattr(blk, name, None) or getattr(blk.attn, name, None)
        if mod is not None and not isinstance(mod, torch.nn.Identity):
            raise ValueError(f"bench_official compares plain ViT/DeiT models; this one has {name}")
    return {"img_size": int(model.patch_embed.img_size[0]), "patch_size": int(model.patch_embed.patch_size[0]),
            "num_classes": int(model.num_classes), "embed_dim": int(model.embed_dim), "depth": len(model.blocks),
            "num_heads": int(blk.attn.num_heads), "mlp_ratio": blk.mlp.fc1.out_features / model.embed_dim,
            "qkv_bias": blk.attn.qkv.bias is not None}


def interleaved(runners: Sequence[Any], iters: int, repeats: int, warmup: int, pause: float) -> List[List[float]]:
    """Seconds per round of every runner; the runners take turns, the order reversing every other round."""
    for r in runners:
        r.warmup(warmup)
    rounds: List[List[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for rep in range(repeats):
        for i in (order if rep % 2 == 0 else order[::-1]):
            time.sleep(pause)
            rounds[i].append(runners[i].time(iters))
    return rounds


def parse_setting(spec: str) -> Tuple[str, Dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tokenreduce.cli.common import parse_run
    return parse_run(spec)


def compare_model(name: str, officials: List[Tuple[str, str]], args: argparse.Namespace, workdir: Path
                  ) -> List[Dict[str, Any]]:
    import timm

    import tokenreduce
    torch.manual_seed(args.seed)
    plain = timm.create_model(name, pretrained=False).eval()
    arch = architecture(plain)
    weights = workdir / f"{name}.pt"
    torch.save(plain.state_dict(), weights)
    x = torch.randn(args.batch_size, 3, arch["img_size"], arch["img_size"], generator=torch.Generator().manual_seed(1))
    x_path = workdir / f"{name}_input.pt"
    torch.save(x, x_path)
    overrides = dict(parse_setting(s) for s in args.setting)
    threads = torch.get_num_threads()

    entries = []
    for method, root in officials:
        params = dict(overrides.get(method) or default_setting(method, arch["embed_dim"]))
        setting = official_setting(method, params, arch["depth"])
        ours = tokenreduce.patch(copy.deepcopy(plain), method, **params)
        if method in OLD_TIMM or args.isolate:
            if method in OLD_TIMM and not (args.official_timm or args.official_python):
                raise SystemExit(f"error: the official {method} patch needs timm 0.4.12: give --official-timm DIR "
                                 "(pip install --no-deps --target DIR timm==0.4.12) or --official-python PY")
            sys_path = [args.official_timm] if args.official_timm else []
            theirs: Any = WorkerRunner(method, root, setting, arch, weights, x_path, threads,
                                       args.official_python or sys.executable, sys_path, workdir, args.clock)
            timm_version = theirs.timm_version
        else:
            theirs = LocalRunner(apply_official(method, root, copy.deepcopy(plain), setting), x, args.clock)
            timm_version = timm.__version__
        entries.append(dict(method=method, params=params, setting=setting, ours=ours, theirs=theirs,
                            timm=timm_version))

    if not args.no_check:
        xc = torch.randn(args.check_batch, 3, arch["img_size"], arch["img_size"], dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
        for e in entries:
            with torch.inference_mode():
                want = tokenreduce.patch(copy.deepcopy(plain).double(), e["method"], **e["params"])(xc)
            if isinstance(e["theirs"], WorkerRunner):
                got = e["theirs"].check(xc)
            else:
                with _default_dtype(torch.float64):
                    model = apply_official(e["method"], dict(officials)[e["method"]], copy.deepcopy(plain).double(),
                                           e["setting"])
                    with torch.inference_mode():
                        got = logits_of(model(xc))
            e["max_diff"] = float((want - got).abs().max())
            e["scale"] = float(want.abs().max())
            print(f"  {name} {e['method']}: float64 logits, tokenreduce vs official: max |diff| {e['max_diff']:.2e} "
                  f"(logits up to {e['scale']:.2f})", flush=True)

    macs_plain = tokenreduce.count_macs(plain, x[:1])
    runners: List[Any] = [LocalRunner(plain, x, args.clock)]
    for e in entries:
        runners += [LocalRunner(e["ours"], x, args.clock), e["theirs"]]
    rounds = interleaved(runners, args.iters, args.repeats, args.warmup, args.pause)
    rates = [args.iters * args.batch_size / statistics.median(r) for r in rounds]
    for r in runners:
        r.close()
    rows = []
    for i, e in enumerate(entries):
        macs = tokenreduce.count_macs(e["ours"], x[:1])
        r_ours, r_theirs = rates[1 + 2 * i], rates[2 + 2 * i]
        rows.append(dict(model=name, method=e["method"], params=_params_text(e["params"]),
                         official_setting=_params_text(e["setting"]), official_timm=e["timm"],
                         threads=threads, batch=args.batch_size, img_s_timm=rates[0], img_s_ours=r_ours,
                         img_s_official=r_theirs, gflops=macs / 1e9, gflops_timm=macs_plain / 1e9,
                         speedup_ours=r_ours / rates[0], speedup_official=r_theirs / rates[0],
                         flop_speedup=macs_plain / macs, ratio=r_ours / r_theirs,
                         max_diff=e.get("max_diff"), rounds_s=[rounds[0], rounds[1 + 2 * i], rounds[2 + 2 * i]]))
    return rows


def _params_text(params: Dict[str, Any]) -> str:
    def short(v: Any) -> str:
        if isinstance(v, list) and len(v) > 4:
            return f"[{v[0]},{v[1]},...,{v[-1]}]"
        return json.dumps(v, separators=(",", ":"))
    return " ".join(f"{k}={short(v)}" for k, v in params.items())


def table(rows: Sequence[Dict[str, Any]]) -> str:
    head = ["model", "method", "tokenreduce params", "official setting", "GFLOPs", "timm img/s", "tokenreduce img/s",
            "official img/s", "tokenreduce speedup", "official speedup", "FLOP speedup", "tokenreduce / official",
            "float64 max diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        diff = "-" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        lines.append("| " + " | ".join([
            r["model"], r["method"], r["params"], r["official_setting"], f"{r['gflops']:.2f}",
            f"{r['img_s_timm']:.2f}", f"{r['img_s_ours']:.2f}", f"{r['img_s_official']:.2f}",
            f"{r['speedup_ours']:.2f}x", f"{r['speedup_official']:.2f}x", f"{r['flop_speedup']:.2f}x",
            f"**{r['ratio']:.2f}x**", diff]) + " |")
    return "\n".join(lines)


def describe_machine(threads: int) -> Dict[str, Any]:
    import timm
    return {"device": f"{platform.processor() or platform.machine()} CPU, {threads} thread(s) of {os.cpu_count()}",
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="What runs where: see the docstring at the head of this file.")
    p.add_argument("--official", nargs="+", action="extend", required=True, metavar="PATH",
                   help="checkouts of the official repositories (ToMe, PiToMe, ATC, DiffRate), any subset")
    p.add_argument("--official-timm", default=None, metavar="DIR",
                   help="a folder holding timm 0.4.12 (pip install --no-deps --target DIR timm==0.4.12), put first on "
                        "the worker's sys.path; needed for PiToMe and DiffRate")
    p.add_argument("--official-python", default=None, metavar="PY",
                   help="run the timm-0.4.12 workers with this interpreter instead (a venv with the official pins)")
    p.add_argument("--isolate", action="store_true",
                   help="run ToMe and ATC in worker processes too (default: in this process, on timm 1.0)")
    p.add_argument("--model", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--setting", action="append", default=[], metavar="METHOD:k=v,...",
                   help="tokenreduce parameters for a method instead of its published setting, e.g. tome:r=8")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--iters", type=int, default=1, help="forwards per timed round")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or each process's own CPU time (steady on a shared machine with --threads 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per variant first")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between variants (idle threads settle)")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--check-batch", type=int, default=2, help="images of the float64 logits check")
    p.add_argument("--no-check", action="store_true", help="skip the float64 logits check")
    p.add_argument("--out", default=None, help="write the results as markdown here (and JSON beside it)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1])
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokenreduce from this checkout
    officials = []
    for path in args.official:
        method = detect(path)
        if any(m == method for m, _ in officials):
            raise SystemExit(f"error: two checkouts of the official {method}")
        officials.append((method, path))
    officials.sort(key=lambda mp: METHODS.index(mp[0]))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    threads = torch.get_num_threads()
    meta = describe_machine(threads)
    load_before = os.getloadavg()
    print(f"{meta['device']}; torch {meta['torch']}, timm {meta['timm']}; fp32, batch {args.batch_size}; "
          f"load average {load_before[0]:.1f}", flush=True)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_official_") as tmp:
        for name in args.model:
            rows += compare_model(name, officials, args, Path(tmp))
    load_after = os.getloadavg()
    print(table(rows))
    print(f"speedups against plain timm {meta['timm']} with fused SDPA attention; tokenreduce / official = img/s ratio "
          f"at the same setting (median of {args.repeats} interleaved rounds of {args.iters} forward(s), {args.clock} "
          f"clock); load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    if args.out:
        out = Path(args.out)
        meta.update(batch=args.batch_size, dtype="fp32", load_before=load_before[0], load_after=load_after[0],
                    repeats=args.repeats, iters=args.iters, clock=args.clock)
        text = (f"{meta['device']}; torch {meta['torch']}, timm {meta['timm']} (official PiToMe/DiffRate: timm "
                f"{', '.join(sorted({r['official_timm'] for r in rows}))}); fp32, batch {args.batch_size}; "
                f"{meta['date']}; median of {args.repeats} interleaved rounds, {args.clock} clock; load average "
                f"{load_before[0]:.1f} before, {load_after[0]:.1f} after\n\n"
                + table(rows) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
