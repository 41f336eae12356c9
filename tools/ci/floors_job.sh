#!/usr/bin/env bash
# The floors job: the default test suite in its own venv, against the declared floors (constraints/floors.txt)
# instead of the newest versions pip resolves.
#
#   tools/ci/floors_job.sh            # or: make test-floors; extra arguments go to pytest
#
# Environment: FLOORS_VENV (default .venv-floors), FLOORS_INSTALL_TIMEOUT (seconds, default 900),
# FLOORS_TEST_TIMEOUT (seconds, default 1800). The venv is rebuilt when this script, the constraints or setup.cfg
# change.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV=${FLOORS_VENV:-.venv-floors}
PY=$VENV/bin/python
STAMP=$VENV/.tokenreduce-floors
WANT=$(cat "$0" constraints/floors.txt setup.cfg tools/ci/torchvision_cpu.py | sha256sum | cut -c1-16)
t0=$SECONDS

quiet_pip() {  # pip, without the notices about this machine's optional local index folders
  "$PY" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
  return "${PIPESTATUS[0]}"
}

install() {
  "$PYTHON" -m venv --clear "$VENV"
  quiet_pip install -q --upgrade pip
  # torch first (the CPU wheel on disk), so nothing later asks for another build.
  quiet_pip install -q -c constraints/floors.txt torch torchvision
  # torchvision 0.28.0 on PyPI is a CUDA build: under the CPU torch it imports only with this hook (see the file).
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp tools/ci/torchvision_cpu.py "$site/tokenreduce_torchvision_cpu.py"
  echo "import tokenreduce_torchvision_cpu" > "$site/tokenreduce_torchvision_cpu.pth"
  quiet_pip install -q -c constraints/floors.txt -e ".[dev]"
  "$PY" - <<'PY'
# The venv really holds the floors (a constraint pip could not meet would have failed above; this names them).
from importlib.metadata import version
import re
pins = dict(l.split("==") for l in open("constraints/floors.txt").read().split("\n") if re.match(r"^[a-z]+==", l))
have = {name: version(name).split("+")[0] for name in pins}
bad = {n: (pins[n], have[n]) for n in pins if have[n] != pins[n]}
assert not bad, f"floors venv does not hold the floors: {bad}"
print("floors_job: " + ", ".join(f"{n} {v}" for n, v in have.items()))
PY
  echo "$WANT" > "$STAMP"
}

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "floors_job: creating $VENV against constraints/floors.txt"
  export -f install quiet_pip
  export PY PYTHON VENV WANT STAMP
  timeout "${FLOORS_INSTALL_TIMEOUT:-900}" bash -euo pipefail -c install
fi
t1=$SECONDS
echo "floors_job: venv ready in $((t1 - t0)) s"
status=0
timeout "${FLOORS_TEST_TIMEOUT:-1800}" "$PY" -m pytest -q -m "not slow" -p no:cacheprovider tests "$@" || status=$?
echo "floors_job: install $((t1 - t0)) s, tests $((SECONDS - t1)) s"
[ "$status" -eq 124 ] && echo "floors_job: the tests ran past FLOORS_TEST_TIMEOUT=${FLOORS_TEST_TIMEOUT:-1800} s"
exit "$status"
