"""Suite-wide hooks."""

from __future__ import annotations

import os

import pytest
import simulator_run

CHECKER = "test_cuda_simulator_process.py"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the CUDA simulator's suite in the background once the test that checks it is
    collected (tests/simulator_run.py says why), unless this is that suite's own process."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or session.config.option.collectonly:
        return
    if simulator_run.available() and any(item.path.name == CHECKER for item in session.items):
        simulator_run.start()
