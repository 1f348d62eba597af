"""Tests that run CUDA kernels in Numba's simulator. Run this folder as its own pytest process:

    pytest tests/cuda_sim

Numba reads NUMBA_ENABLE_CUDASIM once, when it is imported, so it must be set before anything
imports numba. This conftest sets it when pytest is pointed only at this folder (it is then an
"initial conftest", loaded before any test module). In a run over all of tests/ numba is
already imported, or other folders would be switched to the simulator too, so the tests here
are skipped with that reason instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # attndsl and benchmarks/, without installing the package

RUN_ALONE_HINT = (
    "needs the CUDA simulator, which must be enabled before numba is imported: run "
    "`pytest tests/cuda_sim` as its own pytest invocation"
)


def _only_this_folder(config: pytest.Config) -> bool:
    base = config.invocation_params.dir
    paths = [(base / arg.split("::")[0]).resolve() for arg in config.args]
    return bool(paths) and all(p == HERE or HERE in p.parents for p in paths)


def pytest_configure(config: pytest.Config) -> None:
    # Called right after this conftest is imported, before test modules are collected.
    if _only_this_folder(config) and "numba" not in sys.modules:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from attndsl.codegen.cuda_toolchain import simulator_enabled

    if simulator_enabled():
        return
    skip = pytest.mark.skip(reason=RUN_ALONE_HINT)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
