#!/usr/bin/env bash
# The GPU suite: everything tokenreduce claims about a GPU, measured in one run of under 8 minutes on an H100-class
# device, written to docs/benchmarks/gpu-<device>.md (device, dtype, batch, versions, date).
#
#   tools/gpu_suite.sh                  # on a CUDA machine, from a checkout with its venv active (or PYTHON=...)
#   tools/gpu_suite.sh --out DIR        # write the report and the raw tables to DIR instead of docs/benchmarks
#   tools/gpu_suite.sh --cpu-dry-run    # every CPU-capable part on tiny sizes, a few seconds each, into a temp dir
#                                       # (what CI runs: the script and the tools it calls keep working)
#
# Parts, in order, each under its own time limit (a part that fails or runs out of time is reported as such and
# the suite goes on):
#   1. kernel tests, compiled natively (no TRITON_INTERPRET): pytest tests/kernels -m "not slow"
#   2. kernel micro-benchmarks against their PyTorch references: tools/bench_kernels.py, N = 197 / 577 / 1025,
#      B = 1 / 64 / 256, bf16 (goal: fused matching >= 3x its reference at N = 577)
#   3. ViT-S/B/L bf16 batch 256, unpatched timm (SDPA) vs tokenreduce ToMe at the paper's r (S 13, B 13 and 16,
#      L 8), eager and torch.compile'd (both sides): tools/benchmark.py (goal: ViT-B r=16 >= 1.8x unpatched SDPA,
#      >= 1.7x compiled SDPA)
#   4. ATC's batched clustering vs the per-image scikit-learn loop: tools/bench_clustering.py, B = 1 / 8 / 32
#      (goal: >= 50x at B = 32)
#   5. VLM prefill: tools/bench_llava.py on a random LLaVA-1.5-7B-shaped model, bf16
#
# Time limits on a GPU (seconds; they add up to 460, so the suite ends within 8 minutes whatever happens): kernel
# tests 50, kernel benchmarks 70, ViT eager 3 x 30, ViT compiled 45 / 55 / 70 (S / B / L), clustering 30, LLaVA 50.
# Environment: PYTHON (default: python), SUITE_SCALE (multiplies every time limit, default 1).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
SCALE=${SUITE_SCALE:-1}
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$DRY" = 1 ]; then
  OUT=${OUT:-$(mktemp -d -t tokenreduce-gpu-suite.XXXXXX)}
  SLUG=cpu-dry-run
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA device visible to $PY (use --cpu-dry-run to exercise the suite on a CPU)" >&2
    exit 1
  fi
  OUT=${OUT:-docs/benchmarks}
  SLUG=$("$PY" -c "import re, torch
print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
fi
mkdir -p "$OUT"
RAW="$OUT/gpu-$SLUG"
mkdir -p "$RAW"
REPORT="$OUT/gpu-$SLUG.md"
STATUS="$RAW/status.txt"
: > "$STATUS"
START=$(date +%s)

# run NAME LIMIT_SECONDS COMMAND...: run a part with a time limit, its output in $RAW/NAME.log
run() {
  local name=$1 limit=$2; shift 2
  limit=$("$PY" -c "print(max(1, int(round($limit * $SCALE))))")
  local t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$RAW/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  local verdict="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="timed out after ${limit}s"
  elif [ $rc -ne 0 ]; then verdict="failed (exit $rc)"; fi
  echo "$name|$verdict|${took}s" >> "$STATUS"
  echo "   $verdict in ${took}s"
  tail -n 3 "$RAW/$name.log" | sed 's/^/   | /'
}

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  # 1. a quick interpreter subset of the kernel tests (the GPU run takes them all, compiled)
  run kernel_tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_dispatch.py -k "parsing or override"
  # 2. the micro-benchmark script end to end through the interpreter (no rates: interpreter times mean nothing)
  run kernel_bench 60 "$PY" tools/bench_kernels.py --smoke --ops matching merge energy --n 33 --b 1 \
      --dtypes fp32 --out "$RAW/kernels.md"
  # 3. the ViT comparison, eager and compiled (the eager backend: Dynamo traces, nothing is generated)
  VIT=(--model vit_tiny_patch16_224 --img-size 32 --batch-size 2 --dtype fp32 --device cpu --threads 1
       --iters 1 --repeats 1 --warmup 0 --run tome:r=1)
  run vit_eager_t 60 "$PY" tools/benchmark.py "${VIT[@]}" --json "$RAW/vit_eager_t.json"
  run vit_compiled_t 90 "$PY" tools/benchmark.py "${VIT[@]}" --compile --compile-backend eager --warmup 1 \
      --json "$RAW/vit_compiled_t.json"
  # 4. clustering, batched vs scikit-learn
  run clustering 60 "$PY" tools/bench_clustering.py --device cpu --batch 2 --tokens 17 --clusters 9 \
      --linkage average --rounds 1 --threads 1 --out "$RAW/clustering.md"
  # 5. LLaVA prefill on the tiny random model
  run llava 90 "$PY" tools/bench_llava.py --geometry tiny --device cpu --threads 1 --methods tome:r=17 \
      --repeats 1 --new-tokens 1 --prefix 3 --suffix 3 --out "$RAW/llava.md"
  DTYPE=fp32; BATCH=2
else
  unset TRITON_INTERPRET
  run kernel_tests 50 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -m "not slow"
  run kernel_bench 70 "$PY" tools/bench_kernels.py --ops matching merge energy --n 197 577 1025 --b 1 64 256 \
      --dtypes bf16 --warmup 10 --rep 40 --out "$RAW/kernels.md"
  # One process per model and mode (each with its own limit); unpatched and patched take turns within it.
  VIT=(--batch-size 256 --dtype bf16 --device cuda --iters 10 --repeats 5 --warmup 3)
  run vit_eager_s 30 "$PY" tools/benchmark.py --model vit_small_patch16_224 "${VIT[@]}" --run tome:r=13 \
      --json "$RAW/vit_eager_s.json"
  run vit_eager_b 30 "$PY" tools/benchmark.py --model vit_base_patch16_224 "${VIT[@]}" --run tome:r=13 \
      --run tome:r=16 --json "$RAW/vit_eager_b.json"
  run vit_eager_l 30 "$PY" tools/benchmark.py --model vit_large_patch16_224 "${VIT[@]}" --run tome:r=8 \
      --json "$RAW/vit_eager_l.json"
  run vit_compiled_s 45 "$PY" tools/benchmark.py --model vit_small_patch16_224 "${VIT[@]}" --compile \
      --run tome:r=13 --json "$RAW/vit_compiled_s.json"
  run vit_compiled_b 55 "$PY" tools/benchmark.py --model vit_base_patch16_224 "${VIT[@]}" --compile \
      --run tome:r=16 --json "$RAW/vit_compiled_b.json"
  run vit_compiled_l 70 "$PY" tools/benchmark.py --model vit_large_patch16_224 "${VIT[@]}" --compile \
      --run tome:r=8 --json "$RAW/vit_compiled_l.json"
  run clustering 30 "$PY" tools/bench_clustering.py --device cuda --batch 1 8 32 --linkage average complete \
      --rounds 5 --out "$RAW/clustering.md"
  run llava 50 "$PY" tools/bench_llava.py --geometry llava-1.5-7b --device cuda --dtype bfloat16 --repeats 3 \
      --new-tokens 16 --methods visionzip:dominant=54,contextual=10 dart:budget=128 tome:r=23 --out "$RAW/llava.md"
  DTYPE=bf16; BATCH=256
fi

TOTAL=$(( $(date +%s) - START ))
"$PY" - "$REPORT" "$RAW" "$DRY" "$DTYPE" "$BATCH" "$TOTAL" <<'EOF'
"""Assemble the suite's report from the parts' outputs."""
import datetime, json, os, platform, sys
from pathlib import Path

report, raw, dry, dtype, batch, total = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", *sys.argv[4:]
import torch
versions = [f"torch {torch.__version__}"]
for mod in ("triton", "timm", "transformers", "sklearn"):
    try:
        versions.append(f"{mod} {__import__(mod).__version__}")
    except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
        versions.append(f"{mod} (not installed)")
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else \
    f"{platform.processor() or platform.machine()} CPU (dry run: tiny sizes; NOT GPU measurements)"
status = [line.split("|") for line in (raw / "status.txt").read_text().splitlines() if line]
lines = [f"# GPU suite: {device}", "",
         f"`tools/gpu_suite.sh{' --cpu-dry-run' if dry else ''}`, {datetime.date.today().isoformat()}; {device}; "
         f"dtype {dtype}, batch {batch} (ViT); {', '.join(versions)}; Python {platform.python_version()}; "
         f"suite wall time {total} s.", "",
         "| part | result | time |", "|---|---|---|"]
lines += [f"| {name} | {verdict} | {took} |" for name, verdict, took in status]


def vit_table(rows: list, title: str) -> list:
    if not rows:
        return []
    out = ["", f"## {title}", "", "| model | method | params | img/s | speedup | FLOP speedup | efficiency |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['method']} | {r['params'] or '-'} | {r['img_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['flop_speedup']:.2f}x | {r['efficiency']:.2f} |" for r in rows]
    return out


def vit_rows(mode: str) -> list:
    return [r for p in sorted(raw.glob(f"vit_{mode}_*.json")) for r in json.loads(p.read_text())["rows"]]


lines += vit_table(vit_rows("eager"), "ViT, eager (unpatched timm with SDPA vs tokenreduce ToMe)")
lines += vit_table(vit_rows("compiled"), "ViT, torch.compile on both sides")
if vit_rows("eager") and vit_rows("compiled"):
    e = {(r["model"], r["method"], r["params"]): r["img_per_s"] for r in vit_rows("eager")}
    c = {(r["model"], r["method"], r["params"]): r["img_per_s"] for r in vit_rows("compiled")}
    lines += ["", "## tokenreduce against compiled unpatched SDPA", "",
              "| model | method | params | eager tokenreduce / compiled SDPA | compiled tokenreduce / compiled SDPA |",
              "|---|---|---|---|---|"]
    for (model, method, params), rate in c.items():
        base = c.get((model, "none", ""))
        if method == "none" or not base:
            continue
        lines.append(f"| {model} | {method} | {params} | {e.get((model, method, params), float('nan')) / base:.2f}x "
                     f"| {rate / base:.2f}x |")
def md_rows(path: Path) -> list:
    """Rows of the first markdown table in a file, as dicts keyed by its header."""
    if not path.is_file():
        return []
    table = [l for l in path.read_text().splitlines() if l.startswith("|")]
    if len(table) < 2:
        return []
    head = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in l.strip("|").split("|")))) for l in table[2:]]


def measured(values: list) -> str:
    return ", ".join(values) if values else "not measured"


eager_b = [r for r in vit_rows("eager") if r["model"] == "vit_base_patch16_224" and r["params"] == "r=16"]
comp_b = {r["method"]: r["img_per_s"] for r in vit_rows("compiled") if r["model"] == "vit_base_patch16_224"
          and r["params"] in ("", "r=16")}
match = [r for r in md_rows(raw / "kernels.md") if r.get("op") == "matching" and r.get("N") == "577"]
atc = [r for r in md_rows(raw / "clustering.md") if r.get("B") == "32"]
lines += ["", "## Goals (H100-class GPU)", "", "| goal | measured here |", "|---|---|",
          "| ViT-B/16 ToMe r=16 >= 1.8x unpatched SDPA (eager) | "
          + measured([f"{r['speedup']:.2f}x" for r in eager_b]) + " |",
          "| ViT-B/16 ToMe r=16 compiled >= 1.7x compiled SDPA | "
          + measured([f"{comp_b['tome'] / comp_b['none']:.2f}x"] if {"tome", "none"} <= set(comp_b) else []) + " |",
          "| fused matching >= 3x its PyTorch reference at N = 577 | "
          + measured([f"B={r['B']} {r['dtype']}: {r['speedup']}" for r in match]) + " |",
          "| batched ATC clustering >= 50x the scikit-learn loop at B = 32 | "
          + measured([f"K={r['K']} {r['linkage']}: {r['speedup (wall)']}" for r in atc]) + " |"]
if dry:
    lines += ["", "(dry run: the sizes are tiny and the device is a CPU, so none of these numbers says anything about "
              "a GPU; the run only shows that every part works)"]
for name, title in (("kernels.md", "Kernels against their PyTorch references"),
                    ("clustering.md", "ATC: batched clustering vs the per-image scikit-learn loop"),
                    ("llava.md", "LLaVA prefill / generate")):
    path = raw / name
    if path.is_file():
        body = path.read_text().strip().splitlines()
        body = body[1:] if body and body[0].startswith("# ") else body
        lines += ["", f"## {title}", ""] + body
tests = raw / "kernel_tests.log"
if tests.is_file():
    tail = [l for l in tests.read_text().splitlines() if l.strip()][-1:]
    what = "`pytest tests/kernels -m 'not slow'`" + (" (an interpreter subset)" if dry else " (compiled)")
    lines += ["", "## Kernel tests", "", what + ": " + (tail[0] if tail else "no output")]
lines += ["", "Raw outputs (logs, JSON) are in `" + str(raw) + "/`."]
Path(report).write_text("\n".join(lines) + "\n")
print(f"wrote {report} ({total} s)")
EOF
FAILED=$(grep -v '|ok|' "$STATUS" | wc -l)
echo "gpu_suite.sh: ${TOTAL}s, $FAILED part(s) not ok; report $REPORT"
[ "$FAILED" = 0 ]
