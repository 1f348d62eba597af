"""docs/cuda.md's ptxas table is generated (benchmarks/cuda_registers.py), not hand-copied: one
row, rebuilt from the generated kernels, must match the document."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda_registers.py"


def _script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("cuda_registers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_issue9_register_table_is_generated():
    script = _script()
    lines = script.documented()
    rows = [line for line in lines if line.startswith("| causal, float32 |")]
    assert len(rows) == 1, "docs/cuda.md lost its generated table: run " + str(SCRIPT)
    if script.toolchain() not in lines[0]:
        pytest.skip(f"the table was measured with another toolchain than {script.toolchain()}")
    assert script.row("causal", "float32") == rows[0], (
        "docs/cuda.md's ptxas table is out of date: run python benchmarks/cuda_registers.py")
