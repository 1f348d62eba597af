"""The command line: `attndsl check`, exit statuses, and the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from attndsl.cli import VERBS, main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))


def test_check_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", *map(str, EXAMPLES)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(EXAMPLES) == 25  # with channel_attention and translation (issue 10)
    assert f"{ROOT / 'examples' / 'alibi.attn'}: ok — score q . k, normalize softmax, heads 8, " \
           "kv_heads 2" in out
    assert f"{ROOT / 'examples' / 'sigmoid.attn'}: ok — score q . k, normalize " \
           "sigmoid(s - log(n_k)), heads from tensors" in out


def test_check_a_bad_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad {\n    score q * k\n}\n")
    good = ROOT / "examples" / "causal.attn"
    assert main(["check", str(bad), str(good)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        f"{bad}:2:11: q * k is a vector over d; reduce it with '.', sum() or norm()\n"
        "    score q * k\n"
        "          ^\n"
    )
    assert captured.out == (f"{good}: ok — score q . k, normalize softmax, "
                            "heads from tensors\n")


def test_check_reports_what_only_the_derivation_refuses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LANGUAGE.md x3: a reduction over a param dimension of a vector that folds to a constant
    passes the checker but not the derivation; `check` reports it like any spec error, and
    compiling it raises the same located error, on every target (found by the fuzzer)."""
    import attndsl

    bad = tmp_path / "folds.attn"
    text = "attention folds {\n    param wr[r]\n    score q . k + tanh(sum(exp(wr - wr)))\n}\n"
    bad.write_text(text)
    assert main(["check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"{bad}:3:28: a sum over 'r' of a vector that does not vary over its features is not "
        "supported; write the constant times the number of entries along 'r' instead\n"
        "    score q . k + tanh(sum(exp(wr - wr)))\n"
        "                           ^\n")
    for target in ("numpy", "cpu"):
        with pytest.raises(attndsl.SpecError) as info:
            attndsl.compile(bad, target)
        assert str(info.value) == captured.err.rstrip("\n")


def test_missing_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.attn"
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad {\n}\n")
    assert main(["check", str(missing), str(bad), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"attndsl check: {missing}: no such file\n" in err
    assert f"attndsl check: {tmp_path}: is a directory, not a spec file\n" in err
    assert "has no 'score' clause" in err and "Traceback" not in err


def test_binary_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = tmp_path / "blob.attn"
    blob.write_bytes(b"\xff\xfe\x00attention")
    assert main(["check", str(blob)]) == 2
    assert capsys.readouterr().err == f"attndsl check: {blob}: not UTF-8 text\n"


@pytest.mark.parametrize("argv", [[], ["check"], ["frobnicate"], ["check", "--bogus", "x"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: attndsl" in capsys.readouterr().err


def test_help_lists_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: attndsl" in out
    for verb in VERBS:
        assert verb in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("attndsl ")


def test_verbs_are_a_table() -> None:
    assert "check" in VERBS and callable(VERBS["check"].run)


def _console_script() -> str:
    found = shutil.which("attndsl", path=sysconfig.get_path("scripts"))
    if found is None:
        pytest.skip("the attndsl console script is not installed in this environment")
    return found


def test_console_script_in_a_subprocess(tmp_path: Path) -> None:
    script = _console_script()
    done = subprocess.run([script, "check", *map(str, EXAMPLES)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": ok — ") == len(EXAMPLES)
    missing = subprocess.run([script, "check", "missing.attn"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120, check=False)
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr == "attndsl check: missing.attn: no such file\n"


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_works_from_another_directory(tmp_path: Path) -> None:
    """A plain (non-editable) `pip install .` ships the grammar inside the wheel.

    The fresh venv borrows this environment's dependencies through a .pth file, so nothing is
    downloaded; attndsl itself is built from a copy of the project and installed with --no-deps.
    """
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("attndsl", "grammar"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([str(python), "-c", purelib], check=True,
                               capture_output=True, text=True).stdout.strip())
    (site / "borrowed_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-build-isolation", str(source)], check=True, env=env,
                   timeout=300)
    shutil.rmtree(source)  # nothing may be read from the checkout any more
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for example in EXAMPLES:
        shutil.copy(example, elsewhere / example.name)
    where = "import attndsl, attndsl.syntax as s; print(attndsl.__file__, len(s.grammar_text()))"
    located = subprocess.run([str(python), "-c", where], capture_output=True, text=True,
                             cwd=elsewhere, env=env, check=True)
    installed_at = Path(located.stdout.split()[0])
    assert installed_at.is_relative_to(venv), installed_at
    assert (installed_at.parent / "grammar" / "attn.lark").is_file()
    names = sorted(p.name for p in elsewhere.glob("*.attn"))
    done = subprocess.run([str(venv / "bin" / "attndsl"), "check", *names], capture_output=True,
                          text=True, cwd=elsewhere, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": ok — ") == len(names) == len(EXAMPLES)


def test_item13_check_prints_the_clauses_as_written(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Nested lets stay names in the summary: it used to print their inlined bodies."""
    spec = tmp_path / "lets.attn"
    spec.write_text("attention lets {\n    let a = q . k\n    let c = a * a + a\n"
                    "    let e = c * c + c\n    score e\n    normalize sigmoid(s - c0)\n"
                    "    param c0\n}\n")
    assert main(["check", str(spec)]) == 0
    assert capsys.readouterr().out == (f"{spec}: ok — score e, normalize sigmoid(s - c0), "
                                       "heads from tensors\n")


def test_item11_check_five_hundred_chained_lets(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "chain.attn"
    lets = ["    let a0 = 1"] + [f"    let a{i} = a{i - 1} + 1" for i in range(1, 500)]
    spec.write_text("attention chain {\n" + "\n".join(lets) + "\n    score q . k * a499\n}\n")
    assert main(["check", str(spec)]) == 0
    assert capsys.readouterr().out == (f"{spec}: ok — score (q . k) * a499, normalize softmax, "
                                       "heads from tensors\n")
