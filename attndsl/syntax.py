"""Text -> lark Tree. The grammar is loaded once, from grammar/attn.lark."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .errors import SpecError, did_you_mean

_OPEN = {"LPAR", "LSQB"}
_CLOSE = {"RPAR", "RSQB"}


class BracketNewlines:
    """Postlexer: a clause ends at a newline, except inside () or []; runs of newlines are one."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        previous_newline = False
        for token in stream:
            if token.type in _OPEN:
                depth += 1
            elif token.type in _CLOSE:
                depth = max(depth - 1, 0)
            if token.type == "_NL":
                if depth > 0 or previous_newline:
                    continue
                previous_newline = True
            else:
                previous_newline = False
            yield token


def grammar_text() -> str:
    """The grammar: the checkout's grammar/attn.lark, else the copy shipped in the wheel."""
    in_checkout = Path(__file__).resolve().parent.parent / "grammar" / "attn.lark"
    if in_checkout.is_file():
        return in_checkout.read_text()
    return resources.files("attndsl.grammar").joinpath("attn.lark").read_text()


@lru_cache(maxsize=1)
def parser() -> Lark:
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        postlex=BracketNewlines(),
        propagate_positions=True,
        maybe_placeholders=True,
    )


def parse_tree(text: str) -> Tree:
    """Parse spec text; a syntax error is raised as a SpecError in plain words."""
    try:
        return parser().parse(text)
    except UnexpectedInput as exc:
        raise translate(exc, text) from None


# ---- lark's exceptions in plain words -------------------------------------------------------

_TOKEN_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "_NL": "the end of the line",
    "$END": "the end of the file", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='", "PLUS": "'+'",
    "MINUS": "'-'", "MUL": "an operator", "POW": "'^'", "COMPARE": "a comparison",
    "AND": "'and'", "OR": "'or'", "NOT": "'not'",
}
_CLAUSES = ("score", "scale", "bias", "softcap", "mask", "normalize", "heads", "kv_heads",
            "param", "index", "let")
_EXPRESSION_START = {"NAME", "NUMBER", "LPAR", "MINUS", "NOT"}


def _describe_token(token: Token) -> str:
    if token.type == "_NL":
        return "the end of the line"
    if token.type == "$END":
        return "the end of the file"
    return f"'{token}'"


def translate(exc: Exception, text: str) -> SpecError:
    """A SpecError in plain words for one of lark's parse exceptions."""
    if isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        hint = None
        if char in "\"'`":
            hint = "a spec has no strings; names and numbers only"
        elif char == "=":
            hint = "compare with '=='; define names with 'let NAME = EXPR'"
        elif char in "{}":
            hint = "one 'attention NAME { ... }' block per file"
        return SpecError(f"unexpected character {char!r}", exc.line, exc.column, hint=hint)
    if isinstance(exc, UnexpectedToken):
        return _unexpected_token(exc, text)
    if isinstance(exc, UnexpectedEOF):
        lines = text.splitlines() or [""]
        return SpecError("unexpected end of file", len(lines), len(lines[-1]) + 1,
                         hint="close the block with '}'")
    return SpecError(str(exc).splitlines()[0] if str(exc) else "syntax error", 1, 1)


def _previous_token(text: str, offset: int | None) -> str | None:
    """The last word or operator before `offset`, on the same line, for "after '+'"."""
    if offset is None:
        return None
    before = text[:offset].rsplit("\n", 1)[-1].split("#", 1)[0].rstrip()
    match = re.search(r"(//|==|!=|<=|>=|[A-Za-z_][A-Za-z0-9_]*|[0-9.]+|\S)$", before)
    return match.group(1) if match else None


def _unexpected_token(exc: UnexpectedToken, text: str) -> SpecError:
    token = exc.token
    expected = set(exc.expected)
    line = token.line if token.line is not None else 1
    column = token.column if token.column is not None else 1
    last = _previous_token(text, token.start_pos)
    if token.type == "$END":
        return SpecError("unexpected end of file", line, column, hint="close the block with '}'")
    if expected & _EXPRESSION_START and token.type not in _EXPRESSION_START:
        after = f" after '{last}'" if last is not None else ""
        return SpecError(f"expected an expression{after}", line, column)
    if token.type == "COMPARE" and "COMPARE" not in expected:
        return SpecError("comparisons do not chain", line, column, hint="write 'a < b and b < c'")
    if token.type == "NAME" and "SCORE" in expected | {t.upper() for t in expected}:
        hint = did_you_mean(str(token), _CLAUSES)
        return SpecError(f"unknown clause '{token}'", line, column,
                         hint=hint or f"a clause is one of: {', '.join(_CLAUSES)}")
    if token.type == "ATTENTION" or str(token) == "attention":
        return SpecError("only one 'attention' block per file", line, column)
    words = sorted(_TOKEN_WORDS.get(t, f"'{t.lower()}'") for t in expected)
    shown = ", ".join(words[:6]) + (", ..." if len(words) > 6 else "")
    return SpecError(f"unexpected {_describe_token(token)}", line, column,
                     hint=f"expected {shown}" if words else None)
