"""Runs tests/cuda_sim in its own pytest process under Numba's CUDA simulator.

NUMBA_ENABLE_CUDASIM is read once, when Numba is imported, so the simulator tests cannot share
this process (which runs the CPU kernels on the real Numba). One test here runs them all and
fails with their output if any fails, so `python -m pytest` covers both worlds.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason="numba-cuda is not installed (pip install '.[cuda]')")
def test_cuda_simulator_suite_passes() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda_sim"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False,
    )
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"simulator tests failed:\n{tail}"
    assert " passed" in result.stdout, f"no simulator test ran:\n{tail}"
