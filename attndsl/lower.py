"""lark Tree -> ir.Spec: one Transformer method per grammar rule, positions kept."""

from __future__ import annotations

from typing import Any

from lark import Token, Transformer, v_args
from lark.exceptions import VisitError
from lark.tree import Meta

from . import ir
from .errors import SpecError

# Names the normalize clause understands on their own; a bare function name f means f(s).
_NAMED_NORMALIZERS = {"softmax": ir.NormKind.SOFTMAX, "sum": ir.NormKind.SUM, "none": ir.NormKind.NONE}
_SINGLE_CLAUSES = ("score", "scale", "bias", "softcap", "mask", "normalize", "heads", "kv_heads")


def _pos(meta: Meta | Token) -> ir.Pos:
    return ir.Pos(getattr(meta, "line", 0) or 0, getattr(meta, "column", 0) or 0)


@v_args(inline=True, meta=True)
class ToIR(Transformer[Token, Any]):
    """Each method returns an IR node, or a (clause, value, pos) triple for clauses."""

    # ---- expressions ----
    def number(self, meta: Meta, token: Token) -> ir.Num:
        text = str(token)
        return ir.Num(text, text.isdigit(), pos=_pos(token))

    def name(self, meta: Meta, token: Token) -> ir.Name:
        return ir.Name(str(token), pos=_pos(token))

    def unary(self, meta: Meta, op: Token, operand: ir.Expr) -> ir.Unary:
        return ir.Unary(str(op), operand, pos=_pos(meta))

    def binary(self, meta: Meta, left: ir.Expr, op: Token, right: ir.Expr) -> ir.Binary:
        return ir.Binary(str(op), left, right, pos=_pos(meta))

    def compare(self, meta: Meta, *items: Any) -> ir.Binary:
        if len(items) > 3:
            op = items[3]
            raise SpecError(
                "comparisons do not chain",
                op.line,
                op.column,
                hint="write 'a < b and b < c'",
            )
        left, op, right = items
        return ir.Binary(str(op), left, right, pos=_pos(meta))

    def call(self, meta: Meta, func: Token, args: tuple[ir.Expr, ...] | None) -> ir.Call:
        return ir.Call(str(func), args or (), pos=_pos(meta))

    def subscript(self, meta: Meta, name: Token, args: tuple[ir.Expr, ...]) -> ir.Subscript:
        return ir.Subscript(str(name), args, pos=_pos(meta))

    def args(self, meta: Meta, *exprs: ir.Expr) -> tuple[ir.Expr, ...]:
        return exprs

    # ---- clauses ----
    def _expr_clause(self, clause: str, meta: Meta, expr: ir.Expr) -> tuple[str, Any, ir.Pos]:
        return (clause, expr, _pos(meta))

    def score(self, meta: Meta, expr: ir.Expr) -> tuple[str, Any, ir.Pos]:
        return self._expr_clause("score", meta, expr)

    def scale(self, meta: Meta, expr: ir.Expr) -> tuple[str, Any, ir.Pos]:
        return self._expr_clause("scale", meta, expr)

    def bias(self, meta: Meta, expr: ir.Expr) -> tuple[str, Any, ir.Pos]:
        return self._expr_clause("bias", meta, expr)

    def softcap(self, meta: Meta, expr: ir.Expr) -> tuple[str, Any, ir.Pos]:
        return self._expr_clause("softcap", meta, expr)

    def mask(self, meta: Meta, expr: ir.Expr) -> tuple[str, Any, ir.Pos]:
        return self._expr_clause("mask", meta, expr)

    def normalize(self, meta: Meta, expr: ir.Expr) -> tuple[str, Any, ir.Pos]:
        if isinstance(expr, ir.Name) and expr.name in _NAMED_NORMALIZERS:
            norm = ir.Normalize(_NAMED_NORMALIZERS[expr.name], pos=expr.pos)
        elif isinstance(expr, ir.Name) and ir.FUNCTIONS.get(expr.name) == 1:
            s = ir.Name("s", pos=expr.pos)
            norm = ir.Normalize(ir.NormKind.ELEMENTWISE, ir.Call(expr.name, (s,), pos=expr.pos),
                                pos=expr.pos)
        else:
            norm = ir.Normalize(ir.NormKind.ELEMENTWISE, expr, pos=expr.pos)
        return ("normalize", norm, _pos(meta))

    def normalize_keyword(self, meta: Meta, name: Token, keyword: Token, expr: ir.Expr
                          ) -> tuple[str, Any, ir.Pos]:
        """`normalize softmax(sink = EXPR)`: the only keyword argument of the language."""
        if str(name) != "softmax":
            raise SpecError(f"'{name}' takes no keyword argument", name.line, name.column,
                            hint="only 'normalize softmax(sink = EXPR)' has one")
        if str(keyword) != "sink":
            raise SpecError(f"softmax has no argument '{keyword}'", keyword.line, keyword.column,
                            hint="write 'normalize softmax(sink = EXPR)'")
        norm = ir.Normalize(ir.NormKind.SOFTMAX, pos=_pos(name), sink=expr)
        return ("normalize", norm, _pos(meta))

    def heads(self, meta: Meta, value: Token) -> tuple[str, Any, ir.Pos]:
        return ("heads", int(value), _pos(meta))

    def kv_heads(self, meta: Meta, value: Token) -> tuple[str, Any, ir.Pos]:
        return ("kv_heads", int(value), _pos(meta))

    def dims(self, meta: Meta, *dims: Token) -> tuple[ir.Dim, ...]:
        return tuple(int(t) if t.type == "INT" else str(t) for t in dims)

    def param(self, meta: Meta, name: Token, dims: tuple[ir.Dim, ...] | None) -> Any:
        return ("param", ir.Param(str(name), dims or (), pos=_pos(name)), _pos(meta))

    def input(self, meta: Meta, name: Token, dims: tuple[ir.Dim, ...] | None) -> Any:
        param = ir.Param(str(name), ("B", *(dims or ())), pos=_pos(name), batched=True)
        return ("param", param, _pos(meta))

    def index(self, meta: Meta, name: Token, dims: tuple[ir.Dim, ...] | None) -> Any:
        return ("index", ir.Index(str(name), dims or (), pos=_pos(name)), _pos(meta))

    def let(self, meta: Meta, name: Token, expr: ir.Expr) -> Any:
        return ("let", ir.Let(str(name), expr, pos=_pos(name)), _pos(meta))

    # ---- the block ----
    def spec(self, meta: Meta, name: Token, *clauses: tuple[str, Any, ir.Pos]) -> ir.Spec:
        single: dict[str, Any] = {}
        seen: dict[str, ir.Pos] = {}
        lists: dict[str, list[Any]] = {"param": [], "index": [], "let": []}
        present = [c for c in clauses if c is not None]
        for clause, value, pos in present:
            if clause in lists:
                lists[clause].append(value)
                continue
            if clause in seen:
                first = seen[clause]
                raise SpecError(
                    f"duplicate '{clause}' clause",
                    pos.line,
                    pos.column,
                    hint=f"'{clause}' was already given on line {first.line}",
                )
            seen[clause] = pos
            single[clause] = value
        if "score" not in single:
            raise SpecError(
                f"attention '{name}' has no 'score' clause",
                _pos(meta).line,
                _pos(meta).column,
                hint="add a line such as 'score q . k'",
            )
        return ir.Spec(
            name=str(name),
            params=tuple(lists["param"]),
            indices=tuple(lists["index"]),
            lets=tuple(lists["let"]),
            clause_pos=tuple((clause, pos) for clause, _, pos in present),
            **single,
        )

    def start(self, meta: Meta, spec: ir.Spec) -> ir.Spec:
        return spec


def to_ir(tree: Any) -> ir.Spec:
    """The unchecked IR of a parsed spec."""
    try:
        return ToIR().transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, SpecError):
            raise exc.orig_exc from None
        raise
