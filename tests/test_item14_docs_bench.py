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


def test_item14_bench_cpu_report_before_column_and_targets(tmp_path: Path) -> None:
    """write_report on made-up numbers (no timing, no kernels): the before columns, issue 12's
    target rows with met / not met / not measured, and the hand-written reasons by id."""
    bench = _bench_cpu()
    row = {"name": "full", "n": 2048, "reps": 5, "errors": {}, "notes": {},
           "median_s": {"attndsl|fwd": 0.100, "before|fwd": 0.150, "sdpa|fwd": 0.120,
                        "attndsl|fwd+bwd": 0.300, "before|fwd+bwd": 0.250,
                        "sdpa|fwd+bwd": 0.270},
           "peak_mib": {"attndsl|fwd": 0.0, "attndsl|fwd+bwd": 0.0}}
    targets = {"linear": {"quick": False, "n": 8192, "n_big": 65536, "t_small": 0.2,
                          "t_big": 2.0, "pairs": 2, "ratio": 10.0, "before_t_small": 1.2},
               "decode": {"quick": True, "rounds": 5, "shape": [1, 8, 2, 1, 32768],
                          "copy_bytes_per_s": 40e9,
                          "after": {"s": 0.004, "sdpa_s": 0.008, "kv_bytes": 33554432}},
               "memory": {"error": "killed"}}
    meta = {"quick": False, "reps": 5, "date": "2026-12-02 08:00", "model": "AMD EPYC",
            "isa": "AVX2", "cores": 2, "cpu": "znver3", "torch": "2.13.0", "numba": "0.68.1",
            "layer": "workqueue", "load_start": "0.5", "load_end": "0.6", "jobs": [],
            "before": {"commit": "0494974", "path": "/tmp/before"}}
    reasons = {"full-2048-fwdbwd-sdpa": "the backward | recomputes the scores"}
    bench.write_report([row], targets, meta, tmp_path, reasons)
    text = (tmp_path / "cpu.md").read_text()
    assert 'lscpu "AMD EPYC", AVX2, 2 cores' in text and "commit `0494974`" in text
    assert "| N | mode | attndsl ms | GFLOP/s | before ms | before / after | sdpa ratio |" in text
    assert "| 2048 | fwd | 100.0 | 85.9 | 150.0 | 1.50 | 1.20 | 0 | — |" in text
    assert ("| full N=2048 fwd vs torch SDPA | >= 1.1x | 1.20x | 0.80x | yes |  |") in text
    assert ("| full N=2048 fwd+bwd vs torch SDPA | >= 1.1x | 0.90x | 1.08x | **no** | the "
            "backward \\| recomputes the scores |") in text
    assert "| full N=4096 fwd vs torch SDPA | >= 1.1x | not measured | — | not measured |" in text
    assert "| >= 5x faster | 6.00x (1.200 s before, 0.200 s now) | — | yes |" in text
    assert "time(N=65536) / time(N=8192) | <= 9 | 10.0 (0.200 s -> 2.000 s) | — | **no** |" in text
    assert "vs torch SDPA *(quick)* | >= 1.5x | 2.00x (4.00 ms, SDPA 8.00 ms) | — | yes |" in text
    assert "| >= 50% | 21% (8.4 of 40.0 GB/s) | — | **no** |" in text
    assert "| failed: see 'memory failed' below | — | not measured |" in text
    assert "| >= 0.95x (5% noise allowed) | 0.83x (full N=2048 fwd+bwd) | — | **no** |" in text
    assert "two Numba threads vs one" in text and "*(quick)*: measured with `--quick`" in text

    del meta["before"], targets["linear"]["before_t_small"]
    for key in ("before|fwd", "before|fwd+bwd"):
        del row["median_s"][key]
    bench.write_report([row], targets, meta, tmp_path)
    text = (tmp_path / "cpu.md").read_text()
    assert "before ms" not in text and "commit `" not in text
    assert "| >= 5x faster | not measured (no `--before`) | — | not measured |" in text
    assert "| >= 0.95x (5% noise allowed) | not measured | — | not measured |" in text
