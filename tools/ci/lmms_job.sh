#!/usr/bin/env bash
# CI job for the lmms-eval integration: its own venv with lmms-eval 0.7.3, then the offline tests.
#
#   bash tools/ci/lmms_job.sh                 # builds .venv-lmms once (3-4 min), then runs tests/integrations/lmms_eval
#   LMMS_VENV=/tmp/v bash tools/ci/lmms_job.sh -x   # another venv; extra arguments go to pytest
#
# lmms-eval lives in its own venv, never in the project's .venv: it pulls in heavy extras (wandb, openai, opencv,
# peft, ...) and would change what the main suite resolves. Everything runs offline: the tests build their tiny
# model, tokenizer and processor on disk and read a five-sample parquet task shipped with them.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV=${LMMS_VENV:-.venv-lmms}
PY="$VENV/bin/python"
STAMP="$VENV/.tokenreduce-lmms-installed"
# Generous limits (a busy 2-core machine is several times slower than an idle one); the job takes ~6 min idle.
INSTALL_TIMEOUT=${LMMS_INSTALL_TIMEOUT:-1200}
TEST_TIMEOUT=${LMMS_TEST_TIMEOUT:-900}

step() { echo "lmms_job: $*"; }

install() {
  # A venv whose pyvenv.cfg is gone (interrupted rm) would run as the system Python: pip must never install there.
  if ! "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
    "$PYTHON" -m venv --clear "$VENV"
  fi
  # torch first, from the machine's local wheels, so lmms-eval's `torch>=2.1` is already met and pip fetches no
  # other build. filelock<4: filelock 4 lacks `filelock._api`, which breaks every lmms-eval evaluation.
  # decord: lmms-eval's own llava_hf model (the parity test) imports it.
  step "installing torch 2.14.1"
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  step "installing lmms-eval 0.7.3"
  "$PY" -m pip install -q "lmms-eval==0.7.3" "filelock<4" "transformers>=5.18" decord pytest pyarrow
  step "installing tokenreduce (editable, with its lmms_eval.models entry point)"
  "$PY" -m pip install -q -e ".[plot]"  # (plot: eval-vlm draws its figure)
}

if [ ! -f "$STAMP" ] || [ setup.cfg -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
  start=$SECONDS
  export -f install step
  export PY PYTHON VENV
  if ! timeout "$INSTALL_TIMEOUT" bash -euo pipefail -c install; then
    step "FAILED: building $VENV did not finish (exit status above, 124 = over ${INSTALL_TIMEOUT}s)" >&2
    exit 1
  fi
  touch "$STAMP"
  step "venv ready in $((SECONDS - start)) s"
fi

"$PY" - <<'EOF' || { step "FAILED: tokenreduce is installed without its lmms_eval.models entry point (setup.cfg)" >&2; exit 1; }
from importlib.metadata import entry_points
assert any(ep.name == "tokenreduce" for ep in entry_points(group="lmms_eval.models"))
EOF

start=$SECONDS
step "running tests/integrations/lmms_eval"
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider -m lmms tests/integrations/lmms_eval "$@"
step "tests done in $((SECONDS - start)) s"
