"""Item 14: docs/language.md names exactly the CLI's verbs; bench_cpu.py --specs names."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attndsl.cli import VERBS

ROOT = Path(__file__).resolve().parent.parent


def test_item14_docs_list_exactly_the_cli_verbs() -> None:
    text = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    (sentence,) = re.findall(r"The command line offers the same steps \(([^)]*)\), a timing\s+"
                             r"\(([^)]*)\) and pictures \(([^)]*)\)", text)
    sentence = ", ".join(sentence)
    assert re.findall(r"`(?:attndsl )?(\w+)`", sentence) == list(VERBS)


def _bench_cpu():  # type: ignore[no-untyped-def]
    path = ROOT / "benchmarks" / "bench_cpu.py"
    spec = importlib.util.spec_from_file_location("bench_cpu", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_item14_bench_cpu_spec_names() -> None:
    bench = _bench_cpu()
    assert bench.spec_names("full,causal") == ["full", "causal"]
    # every benchmarked example answers to its file name too
    assert bench.spec_names(",".join(bench.SPECS.values())) == list(bench.SPECS)
    with pytest.raises(ValueError, match="no benchmark for 'causal_linear'; choose from full, "):
        bench.spec_names("causal,causal_linear")


def test_item14_bench_cpu_unknown_spec_is_a_usage_error() -> None:
    """Before anything heavy is imported: exit status 2 and the valid names, no KeyError."""
    script = ROOT / "benchmarks" / "bench_cpu.py"
    run = subprocess.run([sys.executable, str(script), "--specs", "causal_linear"], check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "--specs: no benchmark for 'causal_linear'; choose from full, causal" in run.stderr
    assert "Traceback" not in run.stderr and "KeyError" not in run.stderr
