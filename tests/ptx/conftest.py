"""Tests that compile kernels to PTX with libNVVM and assemble them with ptxas (no GPU needed).

    pytest tests/ptx

They need numba-cuda[cu12] (pip install 'attndsl[cuda]') and must not run under the CUDA
simulator, where numba.cuda.compile_ptx does not exist; such runs skip them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from attndsl.codegen import cuda_toolchain as tc

    reason = None
    if tc.simulator_enabled():
        reason = "PTX tests cannot run under NUMBA_ENABLE_CUDASIM=1 (no compile_ptx there)"
    elif not tc.numba_cuda_installed():
        reason = tc.INSTALL_HINT
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
