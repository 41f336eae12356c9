"""tools/gpu_suite.sh: the script parses, refuses what it should, and its CPU dry run exercises every CPU-capable part
(the run CI does; the GPU run itself needs a device)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tools" / "gpu_suite.sh"


def test_the_script_parses():
    assert shutil.which("bash")
    result = subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unknown_arguments_are_refused():
    result = subprocess.run(["bash", str(SUITE), "--bogus"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr


@pytest.mark.slow
def test_cpu_dry_run_writes_a_report(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, SUITE_SCALE="3")  # a loaded CI machine gets longer limits
    result = subprocess.run(["bash", str(SUITE), "--cpu-dry-run", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=1500, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu-cpu-dry-run.md").read_text()
    for part in ("kernel_tests", "kernel_bench", "vit_eager_t", "vit_compiled_t", "clustering", "llava"):
        assert f"| {part} | ok |" in report, part
    assert "NOT GPU measurements" in report and "## Goals (H100-class GPU)" in report
    assert not list((ROOT / "docs" / "benchmarks").glob("gpu-cpu-dry-run*"))  # a dry run never writes into docs/
