#!/usr/bin/env bash
# CI job for the lmms-eval integration (issue 20): its own venv, lmms-eval 0.7.3, the offline tests.
#
#   bash tools/ci/lmms_job.sh            # builds .venv-lmms once (about 4 min), then runs tests/integrations/lmms_eval
#   LMMS_VENV=/tmp/v bash tools/ci/lmms_job.sh
#
# lmms-eval lives in its own venv (never in the project's .venv): it pulls in heavy extras and would change what the
# main suite resolves. Everything runs offline; the tests build their tiny model, tokenizer and task on disk.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV=${LMMS_VENV:-.venv-lmms}
PY="$VENV/bin/python"
STAMP="$VENV/.tokenreduce-lmms-installed"
INSTALL_TIMEOUT=${LMMS_INSTALL_TIMEOUT:-480}
TEST_TIMEOUT=${LMMS_TEST_TIMEOUT:-300}

if [ ! -f "$STAMP" ] || [ setup.cfg -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
  test -x "$PY" || "$PYTHON" -m venv "$VENV"
  # torch first, from the machine's local wheels, so lmms-eval's `torch>=2.1` is already met and pip does not
  # fetch a CUDA build. filelock<4: filelock 4 lacks `filelock._api`, which breaks every lmms-eval evaluation.
  # decord: lmms-eval's own llava_hf model (the parity test) imports it.
  timeout "$INSTALL_TIMEOUT" bash -c "
    set -euo pipefail
    '$PY' -m pip install -q --upgrade pip
    '$PY' -m pip install -q torch==2.14.1 torchvision==0.29.1
    '$PY' -m pip install -q 'lmms-eval==0.7.3' 'filelock<4' 'transformers>=5' decord pytest pyarrow
    '$PY' -m pip install -q -e .
  "
  touch "$STAMP"
fi

# --verbosity is lmms-eval's; the tests themselves turn its swallowed errors into failures.
timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider -m lmms tests/integrations/lmms_eval "$@"
