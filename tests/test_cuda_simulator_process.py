"""Checks tests/cuda_sim, run in its own pytest process under Numba's CUDA simulator.

NUMBA_ENABLE_CUDASIM is read once, when Numba is imported, so the simulator tests cannot share
this process (which runs the CPU kernels on the real Numba). Their process starts in the
background when this test is collected (tests/simulator_run.py); this test fails with its
output if any of them fails, so `python -m pytest` covers both worlds.
"""

from __future__ import annotations

import pytest
import simulator_run


@pytest.mark.skipif(not simulator_run.available(),
                    reason="numba-cuda is not installed (pip install '.[cuda]')")
def test_cuda_simulator_suite_passes() -> None:
    returncode, output = simulator_run.result()  # started at collection (tests/conftest.py)
    tail = output[-6000:]
    assert returncode == 0, f"simulator tests failed (exit code {returncode}):\n{tail}"
    assert " passed" in output, f"no simulator test ran:\n{tail}"
