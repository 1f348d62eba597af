"""Text -> lark Tree. The grammar is loaded once, from grammar/attn.lark."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

from .errors import SpecError, did_you_mean

_OPEN = {"LPAR", "LSQB"}
_CLOSE = {"RPAR", "RSQB"}
_CLAUSES = ("score", "scale", "bias", "softcap", "mask", "normalize", "heads", "kv_heads",
            "param", "index", "let")
_CLAUSE_TYPES = {c.upper() for c in _CLAUSES}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD_CHARS = re.compile(r"[A-Za-z0-9_]*")


class BracketNewlines:
    """Postlexer: a clause ends at a newline, except inside () or []; runs of newlines are one.

    It also refuses a word the contextual lexer cut in two: where only keywords are expected,
    `masks` lexes as the keyword `mask` followed by the name `s`.
    """

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        previous: Token | None = None
        previous_newline = False
        for token in stream:
            if previous is not None and _split_word(previous, token):
                raise _split_word_error(previous, token)
            previous = token
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


def _split_word(previous: Token, token: Token) -> bool:
    """A keyword directly followed by letters or digits: one word that the lexer cut in two."""
    first = str(token)[:1]
    return (
        previous.type != "NAME"
        and _WORD.fullmatch(str(previous)) is not None
        and token.start_pos is not None
        and token.start_pos == previous.end_pos
        and (first.isalnum() or first == "_")
    )


def _split_word_error(previous: Token, token: Token) -> SpecError:
    rest = _WORD_CHARS.match(str(token))
    word = str(previous) + (rest.group(0) if rest else "")
    line, column = previous.line or 1, previous.column or 1
    if previous.type in _CLAUSE_TYPES:
        hint = did_you_mean(word, _CLAUSES) or f"a clause is one of: {', '.join(_CLAUSES)}"
        return SpecError(f"unknown clause '{word}'", line, column, hint=hint)
    if previous.type == "ATTENTION":
        return SpecError(f"unexpected '{word}'", line, column,
                         hint="a spec starts with 'attention NAME {'")
    return SpecError(f"unexpected name '{word}'", line, column,
                     hint="expected an operator or the end of the line")


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
        cache=True,  # the LALR tables, kept by lark in the temp dir: 0.4 s off every start
    )


def parse_tree(text: str) -> Tree:
    """Parse spec text; a syntax error is raised as a SpecError in plain words."""
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#")
                               for ln in text.splitlines()):
        raise SpecError("the spec is empty", 1, 1,
                        hint="write a block such as 'attention NAME { score q . k }'")
    try:
        return parser().parse(text)
    except LarkError as exc:
        raise translate(exc, text) from None


# ---- lark's exceptions in plain words -------------------------------------------------------

_TOKEN_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "INT": "a whole number", "_NL": "the end of the line",
    "$END": "the end of the file", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='", "PLUS": "'+'",
    "MINUS": "'-'", "MUL": "an operator", "POW": "'^'", "COMPARE": "a comparison",
    "AND": "'and'", "OR": "'or'", "NOT": "'not'", "ATTENTION": "'attention'",
}
_CHARACTER_HINTS = {
    '"': "a spec has no strings; names and numbers only",
    "'": "a spec has no strings; names and numbers only",
    "`": "a spec has no strings; names and numbers only",
    "=": "compare with '=='; define names with 'let NAME = EXPR'",
    "{": "one 'attention NAME { ... }' block per file",
    "}": "one 'attention NAME { ... }' block per file",
    ";": "a clause ends at the end of its line; there is no ';'",
    ":": "a spec is not Python; there is no ':'",
    "!": "write 'not' for negation; '!=' compares",
    "&": "write 'and'",
    "|": "write 'or'",
    "~": "write 'not'",
    "\\": "an expression continues onto the next line only inside () or []",
}
_OPERATOR_TYPES = {"PLUS", "MINUS", "MUL", "POW", "COMPARE", "AND", "OR"}
_PAIRS = {"(": ")", "[": "]"}


def _describe_token(token: Token) -> str:
    if token.type == "_NL":
        return "the end of the line"
    if token.type == "$END":
        return "the end of the file"
    return f"'{token}'"


def translate(exc: Exception, text: str) -> SpecError:
    """A SpecError in plain words for one of lark's exceptions."""
    if isinstance(exc, UnexpectedCharacters):
        at = exc.pos_in_stream
        char = text[at] if at is not None and 0 <= at < len(text) else ""
        return SpecError(f"unexpected character {char!r}", exc.line, exc.column,
                         hint=_CHARACTER_HINTS.get(char))
    if isinstance(exc, UnexpectedToken):
        return _unexpected_token(exc, text)
    if isinstance(exc, UnexpectedEOF):
        line, column = _end_of(text)
        return SpecError("unexpected end of file", line, column, hint="close the block with '}'")
    return SpecError("the spec could not be read", 1, 1)


def _end_of(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    return len(lines), len(lines[-1]) + 1


def _previous_word(text: str, offset: int | None) -> str | None:
    """The last word or operator before `offset`, on the same line, for "after '+'"."""
    if offset is None:
        return None
    before = text[:offset].rsplit("\n", 1)[-1].split("#", 1)[0].rstrip()
    match = re.search(r"(//|==|!=|<=|>=|[A-Za-z_][A-Za-z0-9_]*|[0-9.]+|\S)$", before)
    return match.group(1) if match else None


def _open_brackets(text: str, offset: int) -> list[tuple[str, int]]:
    """The brackets still open at `offset`: (bracket, offset), comments skipped."""
    stack: list[tuple[str, int]] = []
    in_comment = False
    for at, char in enumerate(text[:offset]):
        if char == "#":
            in_comment = True
        elif char == "\n":
            in_comment = False
        elif in_comment:
            continue
        elif char in _PAIRS:
            stack.append((char, at))
        elif char in ")]" and stack:
            stack.pop()
    return stack


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _unexpected_token(exc: UnexpectedToken, text: str) -> SpecError:
    token = exc.token
    expected = set(exc.expected)
    if token.type == "$END":
        line, column = _end_of(text.rstrip()) if text.strip() else (1, 1)
        offset = len(text)
    else:
        line, column = token.line or 1, token.column or 1
        offset = token.start_pos if token.start_pos is not None else len(text)
    last = _previous_word(text, offset)
    after = f" after '{last}'" if last is not None else ""
    seen = _describe_token(token)
    line_text = text.split("\n")[line - 1] if line - 1 < text.count("\n") + 1 else ""
    heads = re.match(r"\s*(kv_heads|heads)\b", line_text)

    if heads and token.type not in ("_NL", "$END", "RBRACE") or heads and "INT" in expected:
        return SpecError(f"'{heads.group(1)}' takes a whole number", line, column,
                         hint=f"write, e.g., '{heads.group(1)} 8'")
    if token.type == "ATTENTION" or str(token) == "attention" and "ATTENTION" not in expected:
        return SpecError("only one 'attention' block per file", line, column)
    if "ATTENTION" in expected:
        return SpecError(f"unexpected {seen}", line, column,
                         hint="a spec starts with 'attention NAME {'")
    if "NUMBER" in expected:  # at the start of an operand
        hint = "the power operator is '^'" if last == "*" and str(token) == "*" else None
        return SpecError(f"expected an expression{after}", line, column, hint=hint)
    stack = _open_brackets(text, offset)
    if stack and token.type in ("_NL", "$END", "RBRACE", "RPAR", "RSQB"):
        bracket, at = stack[-1]
        if token.type not in ("RPAR", "RSQB") or str(token) != _PAIRS[bracket]:
            bl, bc = _line_col(text, at)
            return SpecError(f"'{bracket}' at line {bl}, column {bc} is never closed", line,
                             column, hint=f"expected '{_PAIRS[bracket]}'")
    if token.type == "NAME" and expected & _CLAUSE_TYPES:
        hint = did_you_mean(str(token), _CLAUSES)
        return SpecError(f"unknown clause '{token}'", line, column,
                         hint=hint or f"a clause is one of: {', '.join(_CLAUSES)}")
    if token.type in _CLAUSE_TYPES and not expected & _CLAUSE_TYPES:
        return SpecError(f"unexpected {seen}", line, column,
                         hint=f"each clause starts on its own line; '{token}' is a clause")
    if token.type == "COMPARE" and "COMPARE" not in expected and "PLUS" in expected:
        return SpecError("comparisons do not chain", line, column, hint="write 'a < b and b < c'")
    for terminal, word in (("LBRACE", "'{'"), ("EQUAL", "'='")):
        if terminal in expected:
            return SpecError(f"expected {word}{after}", line, column)
    if expected == {"NAME"} or expected == {"NAME", "_NL"}:
        return SpecError(f"expected a name{after}", line, column)
    if token.type == "$END":
        return SpecError("unexpected end of file", line, column, hint="close the block with '}'")
    if expected & _OPERATOR_TYPES:  # after a complete operand
        closer = f", ',' or '{_PAIRS[stack[-1][0]]}'" if stack else " or the end of the line"
        hint = _CHARACTER_HINTS["="] if token.type == "EQUAL" else f"expected an operator{closer}"
        return SpecError(f"unexpected {seen}{after}", line, column, hint=hint)
    if token.type == "RBRACE":
        return SpecError("unexpected '}'", line, column, hint="the block is already closed")
    words = sorted({_TOKEN_WORDS.get(t, f"'{t.lower()}'") for t in expected})
    shown = ", ".join(words[:6]) + (", ..." if len(words) > 6 else "")
    return SpecError(f"unexpected {seen}{after}", line, column,
                     hint=f"expected {shown}" if words else None)
