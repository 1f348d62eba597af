"""The intermediate representation: plain frozen data, produced by `lower`, typed by `check`.

Every node keeps the source position it came from (`pos`, excluded from equality so golden
tests compare structure) and, once checked, its `type`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True)
class Pos:
    """1-based line and column of the first character of a node."""

    line: int = 0
    column: int = 0


NOPOS = Pos()


class Kind(Enum):
    VECTOR = "vector"
    FLOAT = "float"
    INT = "integer"
    BOOL = "boolean"


class Side(Enum):
    """What a value varies with: nothing, the query (q or i), the key (k or j), or both."""

    CONST = "const"
    QUERY = "query"
    KEY = "key"
    PAIR = "pair"

    def join(self, other: Side) -> Side:
        if self is other or other is Side.CONST:
            return self
        if self is Side.CONST:
            return other
        return Side.PAIR


@dataclass(frozen=True)
class Type:
    kind: Kind
    size: str | None = None  # the feature-size name of a vector ("d", "dv", "r")
    side: Side = Side.CONST

    def __str__(self) -> str:
        if self.kind is Kind.VECTOR:
            return f"a vector over {self.size}"
        return {Kind.FLOAT: "a float", Kind.INT: "an integer", Kind.BOOL: "a boolean"}[self.kind]


# ---- expressions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Num:
    text: str  # the literal as written, so integers stay exact
    is_int: bool
    pos: Pos = field(default=NOPOS, compare=False)
    type: Type | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Name:
    name: str
    pos: Pos = field(default=NOPOS, compare=False)
    type: Type | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Unary:
    op: str  # "-" or "not"
    operand: Expr
    pos: Pos = field(default=NOPOS, compare=False)
    type: Type | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / // % ^ . @ == != < <= > >= and or
    left: Expr
    right: Expr
    pos: Pos = field(default=NOPOS, compare=False)
    type: Type | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Expr, ...]
    pos: Pos = field(default=NOPOS, compare=False)
    type: Type | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Subscript:
    name: str
    indices: tuple[Expr, ...]
    pos: Pos = field(default=NOPOS, compare=False)
    type: Type | None = field(default=None, compare=False)


Expr = Num | Name | Unary | Binary | Call | Subscript

ARITHMETIC_OPS = ("+", "-", "*", "/", "//", "%", "^")
COMPARISON_OPS = ("==", "!=", "<", "<=", ">", ">=")
LOGIC_OPS = ("and", "or")
VECTOR_OPS = (".", "@")

FUNCTIONS: dict[str, int] = {  # name -> number of arguments
    "exp": 1, "log": 1, "sqrt": 1, "rsqrt": 1, "abs": 1, "tanh": 1, "sigmoid": 1,
    "softplus": 1, "relu": 1, "elu": 1, "gelu": 1, "sin": 1, "cos": 1,
    "min": 2, "max": 2, "clamp": 3, "where": 3, "dot": 2, "sum": 1, "norm": 1,
    "floor": 1, "ceil": 1, "round": 1,
}
REDUCTIONS = ("dot", "sum", "norm")


# ---- declarations and the spec -------------------------------------------------------------

Dim = str | int  # a size name ("heads", "d", "r") or an integer literal


@dataclass(frozen=True)
class Param:
    name: str
    dims: tuple[Dim, ...]
    pos: Pos = field(default=NOPOS, compare=False)
    # `input NAME[DIMS]`: a param with a batch axis, dims ("B", *DIMS), that the checker reads
    # at the spec's b (c[h, i] is c[b, h, i]); passed per call and differentiated like a param
    batched: bool = False

    @property
    def kind(self) -> str:
        """What the spec calls it: "input" or "param"."""
        return "input" if self.batched else "param"

    @property
    def spec_dims(self) -> tuple[Dim, ...]:
        """The dims as the spec writes them (an input's without its batch axis)."""
        return self.dims[1:] if self.batched else self.dims


@dataclass(frozen=True)
class Index:
    name: str
    dims: tuple[Dim, ...]
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Let:
    name: str
    expr: Expr
    pos: Pos = field(default=NOPOS, compare=False)


class NormKind(Enum):
    SOFTMAX = "softmax"
    SUM = "sum"
    NONE = "none"
    ELEMENTWISE = "elementwise"  # f(s), an expression in `s`


@dataclass(frozen=True)
class Normalize:
    kind: NormKind
    expr: Expr | None = None  # only for ELEMENTWISE; a scalar expression of `s`
    pos: Pos = field(default=NOPOS, compare=False)
    sink: Expr | None = None  # only for SOFTMAX: the logit of a key with no value, per row


@dataclass(frozen=True)
class Spec:
    name: str
    score: Expr
    scale: Expr | None = None
    bias: Expr | None = None
    softcap: Expr | None = None
    mask: Expr | None = None
    normalize: Normalize = Normalize(NormKind.SOFTMAX)
    heads: int | None = None
    kv_heads: int | None = None
    params: tuple[Param, ...] = ()
    indices: tuple[Index, ...] = ()
    lets: tuple[Let, ...] = ()
    source: str = field(default="", compare=False, repr=False)
    filename: str | None = field(default=None, compare=False)
    checked: bool = field(default=False, compare=False)
    # Where each clause keyword was written, in source order, for errors about a whole clause.
    clause_pos: tuple[tuple[str, Pos], ...] = field(default=(), compare=False, repr=False)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def index(self, name: str) -> Index | None:
        return next((x for x in self.indices if x.name == name), None)

    def clause_at(self, clause: str) -> Pos:
        """Where `clause` was written (its first occurrence), or NOPOS."""
        return next((pos for name, pos in self.clause_pos if name == clause), NOPOS)


def children(expr: Expr) -> tuple[Expr, ...]:
    if isinstance(expr, Unary):
        return (expr.operand,)
    if isinstance(expr, Binary):
        return (expr.left, expr.right)
    if isinstance(expr, Call):
        return expr.args
    if isinstance(expr, Subscript):
        return expr.indices
    return ()


def walk(expr: Expr):
    """Every node of `expr`, parents before children."""
    yield expr
    for child in children(expr):
        yield from walk(child)


def to_text(expr: Expr) -> str:
    """The expression written back in the spec language, fully parenthesized where needed."""
    if isinstance(expr, Num):
        return expr.text
    if isinstance(expr, Name):
        return expr.name
    if isinstance(expr, Unary):
        sep = " " if expr.op == "not" else ""
        return f"{expr.op}{sep}{_wrapped(expr.operand)}"
    if isinstance(expr, Binary):
        return f"{_wrapped(expr.left)} {expr.op} {_wrapped(expr.right)}"
    if isinstance(expr, Call):
        return f"{expr.func}({', '.join(to_text(a) for a in expr.args)})"
    return f"{expr.name}[{', '.join(to_text(a) for a in expr.indices)}]"


def _wrapped(expr: Expr) -> str:
    text = to_text(expr)
    return f"({text})" if isinstance(expr, (Binary, Unary)) else text
