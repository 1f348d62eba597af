"""The grammar and its errors: every syntax mistake is a SpecError in plain words."""

from __future__ import annotations

import pytest
from lark import Tree

import attndsl
from attndsl.syntax import grammar_text, parse_tree

GOOD = "attention t {\n    score q . k\n    mask j <= i\n}\n"


def error(text: str) -> attndsl.SpecError:
    with pytest.raises(attndsl.SpecError) as caught:
        attndsl.parse(text)
    return caught.value


def test_parse_tree_is_a_lark_tree() -> None:
    assert isinstance(parse_tree(GOOD), Tree)


def test_grammar_is_the_top_level_file() -> None:
    assert "attention" in grammar_text() and "NUMBER" in grammar_text()


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        GOOD.replace("\n", "\r\n"),
        GOOD.replace("    ", "\t"),
        GOOD.rstrip("\n"),
        "\n\n  " + GOOD + "\n\n",
        "# only a comment line first\n" + GOOD + "# and last",
        "attention t { score q . k }",
        "attention t {score q . k\nmask j <= i}",
        "attention t {\n    score (q .\n        k)\n}",
        "attention t {\n    score q . k   # comment with 'quotes' \"and\" `ticks` and ünïcode\n}",
        "attention t {\n\n\n    score q . k\n\n\n}",
        "attention t {\n    score q.k\n    mask j<=i\n    bias -1e-3*(j-i)\n}",
        "attention t {\n    score q . k\f\n}",
    ],
)
def test_layout_variants_parse(text: str) -> None:
    assert attndsl.parse(text).name == "t"


# (text, message, line, column): syntax errors in plain words.
SYNTAX_ERRORS = [
    ("", "the spec is empty", 1, 1),
    ("  \n\t\n", "the spec is empty", 1, 1),
    ("# just a comment\n", "the spec is empty", 1, 1),
    ("attention", "expected a name after 'attention'", 1, 10),
    ("attention t", "expected '{' after 't'", 1, 12),
    ("attention t {", "unexpected end of file", 1, 14),
    ("attention t {\n score q . k", "unexpected end of file", 2, 13),
    ("attention t {\n score q . k\n", "unexpected end of file", 2, 13),
    ("attention t {\n score q +", "expected an expression after '+'", 2, 11),
    ("attention t {\n score\n}", "expected an expression after 'score'", 2, 7),
    ("attention t {\n score q . k\n}\nattention u {\n score q . k\n}",
     "only one 'attention' block per file", 4, 1),
    ("attention t {\n score q . k\n}}", "unexpected '}'", 3, 2),
    ("{", "unexpected '{'", 1, 1),
    ("score q . k", "unexpected 'score'", 1, 1),
    ("attention t {\n score (q . k\n}", "'(' at line 2, column 8 is never closed", 3, 1),
    ("attention t {\n score sum(q . k]\n}", "'(' at line 2, column 11 is never closed", 2, 17),
    ("attention t {\n score q k\n}", "unexpected 'k' after 'q'", 2, 10),
    ("attention t {\n score q . k\n mask i andy\n}", "unexpected name 'andy'", 3, 9),
    ("attention t {\n scorek . q\n}", "unknown clause 'scorek'", 2, 2),
    ("attention t {\n normalizesum\n score q . k\n}", "unknown clause 'normalizesum'", 2, 2),
    ("attentions t {\n score q . k\n}", "unexpected 'attentions'", 1, 1),
    ("attention t {\n score q . k\n kv_heads -2\n}", "'kv_heads' takes a whole number", 3, 11),
    ("attention t {\n heads 1e3\n score q . k\n}", "'heads' takes a whole number", 2, 9),
    ("attention t {\n param w[d r]\n score q . k\n}", "unexpected 'r' after 'd'", 2, 12),
    ("attention t {\n param w[]\n score q . k\n}", "unexpected ']' after '['", 2, 10),
    ("attention t {\n param 3\n score q . k\n}", "expected a name after 'param'", 2, 8),
    ("attention t {\n let = 2\n score q . k\n}", "expected a name after 'let'", 2, 6),
    ("attention t {\n score q . k\n mask j == i == 0\n}", "comparisons do not chain", 3, 14),
    ("attention t {\n score q . k ^\n}", "expected an expression after '^'", 2, 15),
    ("attention t {\n score .5\n}", "expected an expression after 'score'", 2, 8),
    ("attention t {\n score 1.\n}", "expected an expression after '1.'", 2, 10),
    ("attention t {\n score q . k\n mask i >= = j\n}", "expected an expression after '>='", 3, 12),
    ("attention t {\n score q . k\n mask i >== j\n}", "expected an expression after '>='", 3, 11),
    ("attention t {\n score q . k\n mask i => j\n}", "unexpected '=' after 'i'", 3, 9),
    ("attention t {\n score q . k\n mask !(j <= i)\n}", "unexpected character '!'", 3, 7),
    ("attention t {\n score q . k\n mask j <= i && i > 0\n}", "unexpected character '&'", 3, 14),
    ("attention t {\n score q . k\n mask j <= i || i > 0\n}", "unexpected character '|'", 3, 14),
    ("attention t {\n score q.k\\\n}", "unexpected character '\\\\'", 2, 11),
    ("attention t {\n score q . k\t\u00b7 2\n}", "unexpected character '·'", 2, 14),
    ("attention t {\n score q\u00e9\n}", "unexpected character 'é'", 2, 9),
    ("attention t {\n score q . k\x00\n}", "unexpected character '\\x00'", 2, 13),
    ("attention t {\r\n score q +\r\n}", "expected an expression after '+'", 2, 11),
    ("attention t {\n\tscore\tq\t+\n}", "expected an expression after '+'", 2, 11),
    ("attention t {\n score f(,)\n}", "expected an expression after '('", 2, 10),
    ("attention t {\n score f(q,)\n}", "expected an expression after ','", 2, 12),
    ("attention t {\n score (q . k))\n}", "unexpected ')' after ')'", 2, 15),
    ("attention t {\n score q[0](1)\n}", "unexpected '(' after ']'", 2, 12),
    ("attention t {\n score 2 q\n}", "unexpected 'q' after '2'", 2, 10),
]


@pytest.mark.parametrize(("text", "message", "line", "column"), SYNTAX_ERRORS)
def test_syntax_error(text: str, message: str, line: int, column: int) -> None:
    err = error(text)
    assert (err.message, err.line, err.column) == (message, line, column)
    rendered = str(err)
    assert "Unexpected" not in rendered and "Token(" not in rendered and "lark" not in rendered


def test_syntax_error_hints() -> None:
    assert error("attention t {\n scor q . k\n}").hint == "did you mean 'score'?"
    assert error("attention t {\n score q . k\n masks j <= i\n}").hint == "did you mean 'mask'?"
    assert error("attention t {\n score q ** 2\n}").hint == "the power operator is '^'"
    assert error("attention t {\n score q . k scale 2\n}").hint == (
        "each clause starts on its own line; 'scale' is a clause")
    assert error("attention t {\n score q . k\n mask j = i\n}").hint == (
        "compare with '=='; define names with 'let NAME = EXPR'")
    assert error("attention t {\n score q . k;\n}").hint == (
        "a clause ends at the end of its line; there is no ';'")
    assert error('attention t {\n score "q"\n}').hint == (
        "a spec has no strings; names and numbers only")


def test_a_clause_ends_at_the_end_of_its_line() -> None:
    err = error("attention t {\n score q .\n    k\n}")
    assert (err.message, err.line) == ("expected an expression after '.'", 2)


def test_deep_nesting_is_a_spec_error() -> None:
    deep = "attention t {\n score " + "(" * 5000 + "q . k" + ")" * 5000 + "\n}"
    long = "attention t {\n score q . k" + " + 1" * 20000 + "\n}"
    assert attndsl.parse(deep).name == "t"  # parentheses add no nodes
    assert error(long).message == "the spec is nested too deeply to read"
    assert error("attention t {\n score " + "-" * 5000 + "q . k\n}").line == 1
