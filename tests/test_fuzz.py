"""Fuzz the front end: mutated examples and token soup raise SpecError or parse, nothing else.

Three suites of 800 cases each (2,400 in all) in the default run.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attndsl

EXAMPLES = [p.read_text() for p in
            sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.attn"))]
TOKEN = re.compile(r"#[^\n]*|\n|[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
                   r"|//|==|!=|<=|>=|\s+|.")
WORDS = [
    "attention", "score", "scale", "bias", "softcap", "mask", "normalize", "heads", "kv_heads",
    "param", "index", "let", "q", "k", "v", "s", "i", "j", "h", "b", "d", "dv", "n", "n_q", "n_k",
    "and", "or", "not", "softmax", "sum", "none", "exp", "log", "sqrt", "rsqrt", "abs", "tanh",
    "sigmoid", "softplus", "relu", "elu", "gelu", "sin", "cos", "min", "max", "clamp", "where",
    "dot", "norm", "slope", "w", "W", "r", "doc", "__import__", "__class__", "lambda", "x",
    "0", "1", "2", "128", "0.5", "1e-3", "2.5E+3", "+", "-", "*", "/", "//", "%", "^", ".", "@",
    "==", "!=", "<", "<=", ">", ">=", "(", ")", "[", "]", "{", "}", ",", "=", "\n", " ", "\t",
    "#", "'", '"', "`", ";", ":", "\r\n", "·", "é", "\x00", "\\",
]
FUZZ = settings(max_examples=800, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def parse_or_spec_error(text: str) -> None:
    """The property: a spec parses, or it raises SpecError with a position, never anything else."""
    try:
        spec = attndsl.parse(text)
    except attndsl.SpecError as err:
        assert err.line >= 1 and err.column >= 1, (err, text)
        str(err)  # renders
    else:
        assert spec.checked


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(1, 4))):
        unit = draw(st.sampled_from(["char", "token"]))
        parts = list(text) if unit == "char" else tokens(text)
        if not parts:
            break
        at = draw(st.integers(0, len(parts) - 1))
        other = draw(st.integers(0, len(parts) - 1))
        action = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace"]))
        if action == "delete":
            del parts[at]
        elif action == "duplicate":
            parts.insert(at, parts[at])
        elif action == "swap":
            parts[at], parts[other] = parts[other], parts[at]
        else:
            new = draw(st.sampled_from(WORDS) | st.text(max_size=3))
            if action == "insert":
                parts.insert(at, new)
            else:
                parts[at] = new
        text = "".join(parts)
    return text


@FUZZ
@given(mutated_example())
def test_mutated_examples(text: str) -> None:
    parse_or_spec_error(text)


@FUZZ
@given(st.lists(st.sampled_from(WORDS), max_size=40).map(" ".join))
def test_token_soup(text: str) -> None:
    parse_or_spec_error(text)


@FUZZ
@given(st.lists(st.sampled_from([w for w in WORDS if w not in ("attention", "{", "}")]),
                max_size=25).map(" ".join))
def test_token_soup_inside_a_block(body: str) -> None:
    parse_or_spec_error("attention fuzz {\n    score q . k\n    " + body + "\n}\n")
