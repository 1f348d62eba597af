"""`attndsl bench` (attndsl/bench.py): a tiny run prints the table, every contender checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import attndsl
from attndsl import bench
from attndsl.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytest.importorskip("torch")


def rows(out: str) -> dict[str, list[str]]:
    """The table's rows by contender name: [n, ms, GFLOP/s, ratio, error]."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(attndsl \w+|torch \w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(.*)",
                     line)
        if m:
            found[m.group(2)] = [m.group(1), *m.groups()[2:]]
    return found


def test_bench_causal_has_sdpa_flex_and_eager(capsys: pytest.CaptureFixture[str]) -> None:
    """Every torch contender that applies, by default: compiled flex_attention included."""
    assert main(["bench", str(EXAMPLES / "causal.attn"), "--n", "64", "--repeats", "1",
                 "--heads", "2", "--d", "16"]) == 0
    out = capsys.readouterr().out
    assert "machine: " in out and "cores" in out
    table = rows(out)
    assert table["attndsl cpu"][4] == "(reference)"
    if "no flex row at n = 64: torch.compile(flex_attention) failed" in out:
        table["torch flex"] = ["64", "0", "0", "0", "0"]  # no C++ compiler here: said so
    assert set(table) == {"attndsl cpu", "torch sdpa", "torch eager", "torch flex"}
    for name in ("torch sdpa", "torch eager", "torch flex"):
        assert float(table[name][4]) < 1e-5


def test_bench_a_failing_flex_compile_is_a_note(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    assert main(["bench", str(EXAMPLES / "alibi.attn"), "--n", "32", "--repeats", "1",
                 "--heads", "2", "--d", "8", "--target", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "(no flex row at n = 32: torch.compile(flex_attention) failed: RuntimeError: no C++ " \
        "compiler)" in out
    assert set(rows(out)) == {"attndsl numpy", "torch eager"}
    assert main(["bench", str(EXAMPLES / "alibi.attn"), "--n", "32", "--repeats", "1",
                 "--heads", "2", "--d", "8", "--target", "numpy", "--no-flex"]) == 0
    assert "flex" not in capsys.readouterr().out


def test_bench_backward_of_a_masked_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(EXAMPLES / "document.attn"), "--n", "64", "--repeats", "1",
                 "--heads", "2", "--d", "16", "--backward", "--dtype", "float64",
                 "--target", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "forward + backward" in out and "no SDPA row" in out
    table = rows(out)
    assert set(table) == {"attndsl numpy", "torch eager"}
    assert float(table["torch eager"][4]) < 1e-10


def test_sdpa_covers_plain_softmax_only() -> None:
    covered = {p.stem for p in sorted(EXAMPLES.glob("*.attn"))
               if bench.sdpa_scale(attndsl.load(p)) is not None}
    assert covered == {"causal", "luong_dot", "multi_head_gqa", "scaled_dot_product", "translation"}
    assert bench.sdpa_scale(attndsl.load(EXAMPLES / "luong_dot.attn")) == (1.0, False)
    assert bench.sdpa_scale(attndsl.load(EXAMPLES / "causal.attn")) == (None, True)


@pytest.mark.parametrize("args", [["--n", "0"], ["--n", "64,x"], ["--repeats", "0"]])
def test_bench_bad_arguments(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(EXAMPLES / "causal.attn"), *args]) == 2
    assert "attndsl bench: " in capsys.readouterr().err


def test_bench_without_torch_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(EXAMPLES / "alibi.attn"), "--n", "32", "--repeats", "1",
                 "--d", "8", "--no-torch", "--target", "numpy"]) == 0
    out = capsys.readouterr().out
    assert set(rows(out)) == {"attndsl numpy"} and "attndsl alone" in out


@pytest.mark.parametrize("name", ["alibi", "document", "prefix_lm", "softcap", "t5_bucket"])
def test_flex_mods_compute_the_spec(name: str) -> None:
    """The printed score_mod and block mask, run by flex_attention's eager path (the compiled
    one is `attndsl bench`'s flex row), give the reference's out."""
    import warnings

    import numpy as np
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    spec = attndsl.load(EXAMPLES / f"{name}.attn")
    heads, kv_heads = bench.bench_heads(spec, 2)
    case = bench.make_case(spec, 128, bench.Setup(1, heads, kv_heads, 16, 16, "float64"), {})
    mods = bench.flex_mods(case)
    assert mods is not None
    score_mod, block_mask = mods
    q, k, v = (torch.from_numpy(a) for a in (case.q, case.k, case.v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile says it is slow
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0,
                             enable_gqa=heads != kv_heads)
    want = attndsl.compile(spec, target="numpy")(case.q, case.k, case.v, **case.extra)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-9, atol=1e-12)


def test_flex_covers_softmax_over_q_dot_k_only() -> None:
    covered = {p.stem for p in sorted(EXAMPLES.glob("*.attn"))
               if bench.flex_source(attndsl.load(p)) is not None}
    assert {"alibi", "causal", "document", "softcap", "sliding_window"} <= covered
    assert not covered & {"cosine", "bahdanau", "linear", "sigmoid", "sliding_window_sink"}


def test_bench_leaves_out_eager_past_its_memory(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "EAGER_PAIRS", 64 * 64 - 1)
    assert main(["bench", str(EXAMPLES / "sliding_window.attn"), "--n", "32,64", "--repeats",
                 "1", "--heads", "1", "--d", "8", "--target", "numpy", "--no-flex"]) == 0
    out = capsys.readouterr().out
    assert "(no torch eager row at n = 64: more than 4,095 pairs to materialize)" in out
    assert "n = 32:" not in out and out.count("torch eager") == 2  # the row at 32, the note
