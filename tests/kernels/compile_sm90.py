"""Compile every kernel for an H100 (sm_90) without a GPU: Triton front end, MLIR passes, LLVM and ptxas.

Run as a script in a process *without* ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions),
``python tests/kernels/compile_sm90.py [--all]``; prints one line per kernel variant with its registers and spills
and exits 1 on any compile error or a spill above MAX_SPILL bytes. ``test_compile.py`` runs it in a subprocess.
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tokenreduce.kernels import energy, matching, merge

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"margin", "alpha", "eps"}
MAX_SPILL = 64  # bytes of register spill tolerated (a few fp32 configurations spill a word or two)


def signature(fn, pointers, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def ptxas_info(ptx):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", fh.name, "-o", os.devnull], capture_output=True,
                         text=True)
    os.unlink(fh.name)
    return " ".join(line.split(":", 1)[-1].strip() for line in out.stderr.splitlines()
                    if "registers" in line or "spill" in line)


def variants(everything):
    dtypes = ["fp16", "bf16", "fp32"]

    def tile_configs(module, dt):
        configs = module._CONFIGS_FP32 if dt == "fp32" else module._CONFIGS
        return configs if everything else configs[:1]

    for dt in dtypes:
        # fp32: the wrapper's 32-wide feature chunks (d = 64 -> two chunks, never a single one)
        shapes = [(False, 32)] if dt == "fp32" else [(True, 64), (False, 32)] if everything else [(True, 64)]
        for cfg, (single_k, block_d), (has_valid, norm) in itertools.product(
                tile_configs(matching, dt), shapes, [(False, False), (True, True)] if everything else [(True, False)]):
            const = dict(HAS_VALID=has_valid, NORMALIZE=norm, UPCAST=False, PRECISION="ieee", BLOCK_D=block_d,
                         SINGLE_K=single_k, **cfg.kwargs)
            ptrs = dict(a_ptr=dt, b_ptr=dt, val_ptr=dt, idx_ptr="i64", valid_ptr="i64")
            yield f"matching {dt} {cfg.kwargs} single_k={single_k} valid={has_valid} normalize={norm}", \
                matching._best_match_kernel, ptrs, const, cfg
    g_configs = merge._CONFIGS if everything else merge._CONFIGS[:1]
    for dt, cfg, sdt in itertools.product(dtypes, g_configs, ["same", "fp32"] if everything else ["same"]):
        sdt = dt if sdt == "same" else sdt
        ptrs = dict(x_ptr=dt, size_ptr=sdt, perm_ptr="i64", bounds_ptr="i64", out_ptr=dt, out_size_ptr=sdt)
        yield f"merge {dt} size {sdt} {cfg.kwargs}", merge._merge_weighted_kernel, ptrs, dict(cfg.kwargs), cfg
    for dt in dtypes:
        shapes = [(False, 32)] if dt == "fp32" else [(True, 64), (False, 32)] if everything else [(True, 64)]
        for cfg, (single_k, block_d) in itertools.product(tile_configs(energy, dt), shapes):
            const = dict(UPCAST=False, PRECISION="ieee", BLOCK_D=block_d, SINGLE_K=single_k, **cfg.kwargs)
            yield f"energy {dt} {cfg.kwargs} single_k={single_k}", energy._energy_kernel, \
                dict(x_ptr=dt, out_ptr=dt), const, cfg


def main(argv):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
        return 2
    failures = 0
    for label, fn, ptrs, const, cfg in variants("--all" in argv):
        try:
            src = ASTSource(fn=fn, signature=signature(fn, ptrs, const), constexprs=const)
            kernel = triton.compile(src, target=TARGET,
                                    options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            info = ptxas_info(kernel.asm["ptx"])
            spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", info))
            failures += spilled > MAX_SPILL
            print(("SPILLS " if spilled > MAX_SPILL else "ok     ") + label + "  " + info, flush=True)
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            print(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
