"""The verbs of issue 3: `attndsl show`, `attndsl emit`, `attndsl verify` (exit statuses 0/1/2)."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from attndsl.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def example(name: str) -> str:
    return str(EXAMPLES / f"{name}.attn")


def test_show_prints_forward_backward_and_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", example("bahdanau")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attention bahdanau\nforward:\n")
    assert "backward:" in out
    assert "dS = P * (dP - D), D = rowsum(dO * O)" in out
    assert "tanh(proj2_f + proj4_f)" in out
    assert "path: fused tiles (0 GEMM pair reduction(s), 1 explicit pair loop(s))" in out


def test_show_linear_path_and_mask(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", example("causal_linear")]) == 0
    out = capsys.readouterr().out
    assert "allowed = j <= i" in out
    assert "path: linear attention (causal prefix sums" in out
    assert main(["show", example("alibi")]) == 0
    out = capsys.readouterr().out
    assert "1 GEMM pair reduction(s)" in out and "mask:" in out


def test_show_latex(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--latex", example("cosine")]) == 0
    out = capsys.readouterr().out
    assert "\\sqrt{" in out and "\\max" in out.lower()
    assert "% path:" in out


ALIBI_LATEX = r"""% attention alibi
\begin{align*}
  &\text{forward:} \\
  x &= \mathrm{slope}_{3} \left(- i + j\right) + \frac{r_{2}}{\sqrt{d}} \\
  \text{allowed} &= j \leq i \\
  q_{f} &= q\left[b, h, i, f\right] && \text{query vector over } d \\
  k_{f} &= k\left[b, g(h), j, f\right] && \text{key vector over } d \\
  r_{2} &= \sum_{f} k_{f} q_{f} && \text{GEMM} \\
  \mathrm{slope}_{3} &= \mathrm{slope}\left[h\right] \\
  \text{weights} &= \operatorname{softmax}_{j}(x) && \text{over allowed keys} \\
  &\text{backward:} \\
  dS &= P \circ (dP - D), \quad D = \operatorname{rowsum}(dO \circ O) \\
  \frac{\partial x}{\partial r_{2}} &= \frac{1}{\sqrt{d}} \\
  \frac{\partial x}{\partial \mathrm{slope}_{3}} &= - i + j
\end{align*}
% path: fused tiles (1 GEMM pair reduction(s), mask: 1 linear atom(s) bounded from tile corners, 0 checked per tile)
"""

LOG_T = """attention logt {
    param log_t
    param Wq[d, r]
    param w[r]
    score sum(w * tanh(q @ Wq + k @ Wq))
    scale exp(log_t)
    normalize sigmoid(s - log(n_k))
}
"""


def test_item13_show_latex_golden(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--latex", example("alibi")]) == 0
    assert capsys.readouterr().out == ALIBI_LATEX


def _latex_rows(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines[0] == r"\begin{align*}" and lines[-1] == r"\end{align*}", text
    rows = [line.strip() for line in lines[1:-1]]
    assert all(row.endswith(" \\\\") for row in rows[:-1]), text
    return [row.removesuffix(" \\\\") for row in rows]


def test_item13_show_latex_is_latex_throughout(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """No half-LaTeX: `log_t_3` printed as `log_{t 3}`, text labels such as `sum_f` or
    `dx/dr2`; every row parses as math (matplotlib's mathtext, an independent parser)."""
    mathtext = pytest.importorskip("matplotlib.mathtext")
    parser = mathtext.MathTextParser("path")
    spec = tmp_path / "logt.attn"
    spec.write_text(LOG_T)
    assert main(["show", "--latex", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "\\mathrm{log\\_t}_{" in out and "log_{t" not in out, out
    for path in [spec, *sorted(EXAMPLES.glob("*.attn"))]:
        assert main(["show", "--latex", str(path)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("% attention ") and lines[-1].startswith("% path: ")
        for row in _latex_rows("\n".join(lines[1:-1])):
            assert not re.search(r"_\{[^{}\\]* [^{}]*\}", row), row  # _{t 3}
            assert not re.search(r"sum_f|/d|@|\*\*|_v\d|\[\]", row), row
            # mathtext lacks \bmod, \textstyle and the cases environment, all plain LaTeX
            math = row.replace("&&", r"\quad ").replace("&", " ").replace(r"\bmod", "mod")
            math = math.replace(r"\begin{cases}", r"\left\{").replace(r"\end{cases}", r"\right.")
            math = math.replace(r"\\", ", ")
            parser.parse("$" + math.replace(r"\textstyle", "") + "$")


def test_show_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(tmp_path / "missing.attn")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad {\n    score q * k\n}\n")
    assert main(["show", str(bad)]) == 1
    assert f"{bad}:2:11:" in capsys.readouterr().err


def test_emit_numpy_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emit", example("sigmoid"), "--target", "numpy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('"""attndsl NumPy reference for \'sigmoid\' (generated; do not edit).')
    assert "def forward(xp, q, k, v, q_offset=0, k_offset=0):" in out
    assert "def backward(xp, q, k, v, dout, out=None, lse=None, q_offset=0, k_offset=0):" in out
    compile(out, "sigmoid.py", "exec")
    # numpy is the default target
    assert main(["emit", example("sigmoid")]) == 0
    assert capsys.readouterr().out == out


def test_emit_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emit", str(tmp_path / "nope.attn")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["emit", example("sigmoid"), "--target", "fortran"]) == 2


def test_verify_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", example("alibi"), example("sigmoid")]) == 0
    out, err = capsys.readouterr()
    # several files: one progress line per file on stderr (not a terminal here), none on stdout
    assert err.splitlines() == [f"[1/2] {example('alibi')}", f"[2/2] {example('sigmoid')}"]
    assert "[1/2]" not in out
    assert "verify alibi: ok" in out and "verify sigmoid: ok" in out
    for what in ("dq", "dk", "dv", "dslope"):
        assert f"ok   proof {what}" in out
    assert "exact" in out and "P(wrong) <=" in out
    assert "numpy vs finite differences" in out
    assert out.count("derived + verified in") == 2


def test_verify_no_proof(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--no-proof", example("luong_dot")]) == 0
    out = capsys.readouterr().out
    assert "proof d" not in out and "numpy vs finite differences" in out


def test_verify_progress_names_each_check_on_a_terminal(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import attndsl
    import attndsl.verification  # not imported by `import attndsl` itself

    steps: list[str] = []
    attndsl.verification.verify(attndsl.load(example("luong_dot")), proof=False,
                                progress=steps.append)
    assert steps == ["numpy reference", "numpy vs finite differences"]
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert main(["verify", "--no-proof", example("luong_dot")]) == 0
    out, err = capsys.readouterr()
    # each check rewrites the line in place, which is cleared before the report prints
    assert err.split("\r\033[K") == ["", f"{example('luong_dot')}: numpy reference",
                                        f"{example('luong_dot')}: numpy vs finite differences",
                                        ""]
    assert out.startswith("verify luong_dot: ok")


def test_verify_exits_1_when_a_check_fails(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module("attndsl.verification")
    real = module.verify

    def failing(spec, targets=("numpy",), proof=True, **kw):  # type: ignore[no-untyped-def]
        report = real(spec, targets=targets, proof=False, **kw)
        report.checks[0] = dataclasses.replace(report.checks[0], ok=False, detail="forced")
        return report

    monkeypatch.setattr(module, "verify", failing)
    assert main(["verify", example("luong_dot")]) == 1
    out = capsys.readouterr().out
    assert "verify luong_dot: FAILED" in out and "FAIL numpy vs finite differences" in out


def test_verify_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path / "missing.attn")]) == 2
    assert "no such file" in capsys.readouterr().err
    # a good file beside a missing one is still verified; the status is the worst
    assert main(["verify", "--no-proof", str(tmp_path / "missing.attn"),
                 example("luong_dot")]) == 2
    assert "verify luong_dot: ok" in capsys.readouterr().out


def test_verify_bad_spec_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad {\n    score q * k\n}\n")
    assert main(["verify", str(bad)]) == 1
    assert f"{bad}:2:11:" in capsys.readouterr().err


def test_verify_unknown_target_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", example("luong_dot"), "--target", "numpy,tpu"]) == 2
    assert "unknown target 'tpu'; choose from numpy, cpu, cuda" in capsys.readouterr().err


def test_item10_verify_reports_what_it_could_not_check(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """A table too small for verify's sizes: SKIP lines and exit status 1, no traceback."""
    spec = tmp_path / "small.attn"
    spec.write_text("attention small_table {\n    param table[2]\n    score q . k\n"
                    "    bias table[j]\n}\n")
    assert main(["verify", str(spec)]) == 1
    captured = capsys.readouterr()
    assert "verify small_table: INCOMPLETE" in captured.out
    assert "SKIP proof" in captured.out and "could not be checked: ValueError" in captured.out
    assert "Traceback" not in captured.err and captured.err == ""


@pytest.mark.slow
def test_verify_numpy_and_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """--target numpy,cpu compiles the Numba kernels (seconds) and compares them."""
    assert main(["verify", "--no-proof", example("luong_dot"), "--target", "numpy,cpu"]) == 0
    out = capsys.readouterr().out
    assert "cpu vs numpy (float64)" in out and "cpu vs numpy (float32)" in out
