"""SpecError: its fields and rendering; specs carrying Python are rejected, never executed."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest

import attndsl
from attndsl.errors import SpecError, did_you_mean

ALIBI_TYPO = """attention alibi {
    heads     8
    kv_heads  2
    param     slope[heads]
    score     q . k
    scale     1 / sqrt(d)
    bias      slop[h] * (j - i)
    mask      j <= i
}
"""


def test_rendering_matches_the_contract(tmp_path: Path) -> None:
    path = tmp_path / "alibi.attn"
    path.write_text(ALIBI_TYPO)
    with pytest.raises(SpecError) as caught:
        attndsl.load(path)
    err = caught.value
    assert (err.line, err.column, err.hint) == (7, 15, "did you mean 'slope'?")
    assert err.filename == str(path)
    assert str(err) == (
        f"{path}:7:15: unknown name 'slop'; did you mean 'slope'?\n"
        "    bias      slop[h] * (j - i)\n"
        "              ^"
    )


def test_rendering_without_a_file_name_and_with_tabs() -> None:
    with pytest.raises(SpecError) as caught:
        attndsl.parse("attention t {\n\tscore\tq * k\n}")
    assert str(caught.value) == (
        "<spec>:2:8: q * k is a vector over d; reduce it with '.', sum() or norm()\n"
        "    score   q * k\n"
        "            ^"
    )


def test_rendering_with_a_name_given_to_parse() -> None:
    with pytest.raises(SpecError) as caught:
        attndsl.parse("attention t {\n score\n}", filename="x.attn")
    assert str(caught.value).splitlines()[0] == "x.attn:2:7: expected an expression after 'score'"


def test_a_line_outside_the_source_renders_only_the_head() -> None:
    err = SpecError("boom", 9, 1, source="one line", filename="f")
    assert str(err) == "f:9:1: boom"
    assert str(SpecError("boom", 1, 1, hint="h")) == "<spec>:1:1: boom; h"


def test_spec_error_is_an_exception_with_fields() -> None:
    err = SpecError("m", 3, 4, hint="h")
    assert isinstance(err, Exception) and attndsl.SpecError is SpecError
    assert (err.message, err.line, err.column, err.hint) == ("m", 3, 4, "h")


@pytest.mark.parametrize(
    ("name", "candidates", "hint"),
    [
        ("slop", ["slope", "tau"], "did you mean 'slope'?"),
        ("softmx", ["softmax", "sum", "none"], "did you mean 'softmax'?"),
        ("zzz", ["slope", "tau"], None),
    ],
)
def test_did_you_mean(name: str, candidates: list[str], hint: str | None) -> None:
    assert did_you_mean(name, candidates) == hint


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("param tau\n    score q . k\n    bias tua", "unknown name 'tua'"),
        ("score q . k\n    normalize sigmod", "unknown normalization 'sigmod'"),
        ("score q . k\n    bias exq(1)", "unknown function 'exq'"),
        ("scroe q . k", "unknown clause 'scroe'"),
    ],
)
def test_did_you_mean_for_names_normalizations_functions_and_clauses(body: str,
                                                                     message: str) -> None:
    with pytest.raises(SpecError) as caught:
        attndsl.parse("attention t {\n    " + body + "\n}")
    assert caught.value.message == message and caught.value.hint is not None
    assert caught.value.hint.startswith("did you mean")


# ---- a spec is not Python --------------------------------------------------------------------

PYTHON = [
    'score __import__("os").system("echo pwned") . k',
    "score __import__(os)",
    "score q.__class__",
    "score q . k.__class__.__bases__",
    "score x.__class__",
    "score exec(q)",
    "score eval(q . k)",
    "score compile(q, k, k)",
    "score lambda: q . k",
    "score (lambda x: x)(q . k)",
    "score 'q . k'",
    'score "q . k"',
    "score `q . k`",
    "score q . k if True else 0",
    "score [x for x in q]",
    "score open(q)",
    "score q . k; import os",
    "score q . k\n    import os",
    "score getattr(q, __dict__)",
    "score globals()",
    "score q . k\n    let __builtins__ = 1",
    "score q @ __import__",
    "score f'{q}'",
    "score q . k # ok, a comment: __import__('os')\n    bias __import__",
]


def parse_guarded(text: str) -> list[str]:
    """Parse `text` with import/eval/exec/compile trapped; the names of any that were called."""
    import attndsl.syntax

    attndsl.syntax.parser()  # build the grammar (and its imports) before the guard goes up
    called: list[str] = []
    saved = {name: getattr(builtins, name) for name in ("__import__", "eval", "exec", "compile")}

    def trap(name: str):  # type: ignore[no-untyped-def]
        def trapped(*args: object, **kwargs: object) -> object:
            called.append(name)
            return saved[name](*args, **kwargs)

        return trapped

    for name in saved:
        setattr(builtins, name, trap(name))
    try:
        attndsl.parse(text)
    except SpecError:
        called.append("SpecError")
    finally:
        for name, value in saved.items():
            setattr(builtins, name, value)
    return called


@pytest.mark.parametrize("body", PYTHON)
def test_python_in_a_spec_is_rejected_and_not_executed(body: str) -> None:
    assert parse_guarded("attention t {\n    " + body + "\n}\n") == ["SpecError"]


def test_the_guard_sees_a_good_spec_through_and_would_see_an_import() -> None:
    assert parse_guarded("attention t {\n    score q . k\n}") == []
    from attndsl import syntax

    original = syntax.parse_tree

    def importing(text: str):  # type: ignore[no-untyped-def]
        import os  # noqa: F401

        return original(text)

    syntax_patch = pytest.MonkeyPatch()
    syntax_patch.setattr(attndsl, "parse_tree", importing)
    try:
        assert parse_guarded("attention t {\n    score q . k\n}") == ["__import__"]
    finally:
        syntax_patch.undo()


def test_dunder_names_get_a_not_python_hint() -> None:
    with pytest.raises(SpecError) as caught:
        attndsl.parse("attention t {\n    score q.__class__\n}")
    err = caught.value
    assert (err.message, err.line, err.column, err.hint) == (
        "unknown name '__class__'", 2, 13, "a spec is not Python")
