"""The kernels compile for an H100 (sm_90) through Triton's real compiler and ptxas, without a GPU.

The interpreter tests check what the kernels compute; this checks that the compiled path accepts them (the
interpreter is more permissive than the compiler) and that they do not spill registers. It runs
``compile_sm90.py`` in a subprocess without ``TRITON_INTERPRET``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_sm90.py")


def _run(*flags):
    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in getattr(backends, "backends", {"nvidia": None}):
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout


def test_one_configuration_per_kernel_and_dtype():
    out = _run()
    assert out.count("ok ") == 9, out


@pytest.mark.slow
def test_every_autotuning_configuration():
    _run("--all")
