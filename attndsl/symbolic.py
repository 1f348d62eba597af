"""Forward derivation: typed ir.Spec -> SymPy expressions over a small graph of row-level nodes.

A spec becomes
  * `Vec` nodes: per-row vectors, one SymPy symbol standing for "this vector at feature f"
    (q, k, param vectors, projections `X @ W`, element-wise maps hoisted for a dot product);
  * `Reduction` nodes: `R = sum_f body_f`, per query row, per key row, constant, or per pair
    (a pair reduction of a query-side and a key-side vector is a GEMM);
  * `Lookup` nodes: a param or index element read at integer subscripts (`slope[h]`, `doc[j]`);
  * the logit `softcap(score * scale + bias)`, the mask and the normalizer, as SymPy expressions
    in those symbols, positions `i j h b` and sizes.
Nodes are listed in creation order, which is a topological order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from . import check, ir
from .errors import SpecError
from .functions import SPEC_FUNCTIONS, Clamp, Max, Min, Mod, Norm, elementary
from .ir import Kind, NormKind, Side

# Positions and sizes, shared by every derivation so expressions compare across specs.
POSITIONS = {name: sp.Symbol(name, integer=True, nonnegative=True) for name in "ijhb"}
SIZES = {
    name: sp.Symbol(name, integer=True, positive=True)
    for name in ("d", "dv", "n_q", "n_k", "heads", "kv_heads")
}
# q_offset and k_offset of a call (per batch): position i is query row i - q_offset
OFFSETS = {side: sp.Symbol(f"{side}_offset", integer=True, nonnegative=True) for side in "qk"}
_AXIS_OFFSET = {"n_q": "q", "n": "q", "n_k": "k"}  # a spec using n has q_offset == k_offset


def local_subscripts(spec: ir.Spec, array: str, subscripts: tuple[sp.Expr, ...]
                     ) -> tuple[sp.Expr, ...]:
    """Subscripts into `array` as stored: an axis sized n_q (or n) holds the call's query rows
    and one sized n_k its keys, so a position there is shifted by the call's offset (doc[i] is
    doc[i - q_offset]); every other axis is read as written."""
    declared = spec.param(array) or spec.index(array)
    assert declared is not None, array
    dims = declared.dims  # an input's ("B", ...) matches its subscripts (b, ...)
    return tuple(s - OFFSETS[_AXIS_OFFSET[dim]] if isinstance(dim, str) and dim in _AXIS_OFFSET
                 else s for s, dim in zip(subscripts, dims))
S = sp.Symbol("s", real=True)  # the logit, in an element-wise normalizer


@dataclass(frozen=True)
class Vec:
    """A vector per row (or constant), known by its per-feature symbol."""

    name: str
    symbol: sp.Symbol
    size: str
    side: Side
    kind: str  # "input" (q, k) | "param" | "proj" (X @ W) | "map" (element-wise expression)
    expr: sp.Expr | None = None  # map: the expression; proj: the symbol of X
    param: str | None = None  # param vectors: the param; projections: the matrix
    subscripts: tuple[sp.Expr, ...] = ()  # param vectors: leading subscripts (P[h])


@dataclass(frozen=True)
class Reduction:
    """R = sum over the feature axis of `body`."""

    name: str
    symbol: sp.Symbol
    size: str
    side: Side
    body: sp.Expr
    gemm: tuple[Vec, Vec] | None = None  # (query-side a, key-side b) with body = a_f * b_f


@dataclass(frozen=True)
class Lookup:
    """One element of a param or index array, read at integer subscripts."""

    name: str
    symbol: sp.Symbol
    array: str
    subscripts: tuple[sp.Expr, ...]
    is_param: bool
    side: Side


Node = Vec | Reduction | Lookup


@dataclass
class Derivation:
    spec: ir.Spec
    nodes: list[Node] = field(default_factory=list)
    logit: sp.Expr = sp.S.Zero  # softcap(score * scale + bias)
    mask: sp.Basic | None = None  # a SymPy boolean, None = every key allowed
    norm: NormKind = NormKind.SOFTMAX
    norm_expr: sp.Expr | None = None  # element-wise normalizers: an expression in S
    sink: sp.Expr | None = None  # softmax(sink = e): the sink logit, a row-level expression
    uses_n: bool = False  # 'n' appears: n_q must equal n_k

    def of(self, cls: type) -> list:
        return [n for n in self.nodes if isinstance(n, cls)]

    @property
    def vecs(self) -> list[Vec]:
        return self.of(Vec)

    @property
    def reductions(self) -> list[Reduction]:
        return self.of(Reduction)

    @property
    def lookups(self) -> list[Lookup]:
        return self.of(Lookup)

    def node(self, symbol: sp.Symbol) -> Node | None:
        return next((n for n in self.nodes if n.symbol == symbol), None)

    def weights_expr(self) -> sp.Expr:
        """The weight of one allowed pair before the row normalization (softmax: exp)."""
        if self.norm is NormKind.ELEMENTWISE:
            assert self.norm_expr is not None
            return self.norm_expr.subs(S, self.logit)
        return self.logit


def _sym(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


class Deriver:
    """Builds the node graph of one checked spec, bottom-up."""

    def __init__(self, spec: ir.Spec) -> None:
        self.out = Derivation(spec)
        self.by_key: dict[tuple, Node] = {}
        self.params = {p.name: p for p in spec.params}
        self.indices = {x.name: x for x in spec.indices}

    def _add(self, key: tuple, make) -> Node:  # type: ignore[no-untyped-def]
        if key not in self.by_key:
            node = make(len(self.out.nodes))
            self.by_key[key] = node
            self.out.nodes.append(node)
        return self.by_key[key]

    # ---- vectors: per-feature SymPy expressions ----
    def vector(self, e: ir.Expr) -> sp.Expr:
        t = e.type
        assert t is not None
        if t.kind is not Kind.VECTOR:
            return self.scalar(e)
        if isinstance(e, ir.Name) and e.name in ("q", "k"):
            side = Side.QUERY if e.name == "q" else Side.KEY
            return self._add(("input", e.name), lambda _: Vec(
                e.name, _sym(f"{e.name}_f"), "d", side, "input")).symbol
        if isinstance(e, ir.Name):  # a param vector
            return self._param_vec(e.name, (), t)
        if isinstance(e, ir.Subscript):
            subs = tuple(self.scalar(x) for x in e.indices)
            return self._param_vec(e.name, subs, t)
        if isinstance(e, ir.Binary) and e.op == "@":
            return self._projection(e)
        if isinstance(e, ir.Unary):
            return -self.vector(e.operand)
        if isinstance(e, ir.Binary):
            return _arith(e.op, self.vector(e.left), self.vector(e.right), False)
        if isinstance(e, ir.Call):
            return self._call(e.func, [self.vector(a) for a in e.args], e.args)
        raise AssertionError(f"unexpected vector node {e}")

    def _param_vec(self, name: str, subs: tuple[sp.Expr, ...], t: ir.Type) -> sp.Symbol:
        key = ("param", name, subs)
        return self._add(key, lambda n: Vec(
            f"{name}_v{n}", _sym(f"{name}_v{n}_f"), t.size or "", t.side, "param",
            param=name, subscripts=subs)).symbol

    def _projection(self, e: ir.Binary) -> sp.Symbol:
        assert e.type is not None and isinstance(e.right, ir.Name)
        side = e.type.side
        if side is Side.PAIR:
            raise SpecError("a projection of a vector that depends on both q and k is not "
                            "supported", e.pos.line, e.pos.column,
                            hint="project each side separately: q @ W + k @ W")
        expr = self.vector(e.left)
        if expr == 0:  # (k - k) @ W: SymPy folded the vector to 0, so is its projection
            return sp.S.Zero
        left = self.as_vec(expr, e.left.type)  # type: ignore[arg-type]
        matrix = e.right.name
        return self._add(("proj", left.symbol, matrix), lambda n: Vec(
            f"proj{n}", _sym(f"proj{n}_f"), e.type.size or "", side, "proj",  # type: ignore
            expr=left.symbol, param=matrix)).symbol

    def as_vec(self, expr: sp.Expr, t: ir.Type) -> Vec:
        """A Vec node holding `expr` (itself when it already is one)."""
        node = self.out.node(expr) if isinstance(expr, sp.Symbol) else None
        if isinstance(node, Vec):
            return node
        side = self.side(expr)
        return self._add(("map", expr), lambda n: Vec(  # type: ignore[return-value]
            f"vec{n}", _sym(f"vec{n}_f"), t.size or "", side, "map", expr=expr))

    def side(self, expr: sp.Expr) -> Side:
        """What a lowered expression varies with, from what is left after SymPy folded it:
        the checker's side of `(k - k) + wd` is the key's, its value's is constant."""
        side = Side.CONST
        for symbol in expr.free_symbols:
            node = self.out.node(symbol)  # type: ignore[arg-type]
            if node is not None:
                side = side.join(node.side)
            elif symbol == POSITIONS["i"]:
                side = side.join(Side.QUERY)
            elif symbol == POSITIONS["j"]:
                side = side.join(Side.KEY)
        return side

    # ---- scalars ----
    def scalar(self, e: ir.Expr) -> sp.Expr:
        t = e.type
        assert t is not None
        if isinstance(e, ir.Num):
            return sp.Integer(int(e.text)) if e.is_int else sp.Rational(e.text)
        if isinstance(e, ir.Name):
            return self._name(e)
        if isinstance(e, ir.Subscript):
            return self._lookup(e.name, tuple(self.scalar(x) for x in e.indices), t.side)
        if isinstance(e, ir.Unary):
            operand = self.scalar(e.operand)
            return sp.Not(operand) if e.op == "not" else -operand
        if isinstance(e, ir.Binary):
            if e.op == ".":
                return self._reduce("dot", (e.left, e.right))
            left, right = self.scalar(e.left), self.scalar(e.right)
            if e.op in ir.LOGIC_OPS:
                return (sp.And if e.op == "and" else sp.Or)(left, right)
            if e.op in ir.COMPARISON_OPS:
                return _compare(e.op, left, right)
            return _arith(e.op, left, right, True)
        if isinstance(e, ir.Call):
            if e.func in ir.REDUCTIONS:
                return self._reduce(e.func, e.args)
            return self._call(e.func, [self.scalar(a) for a in e.args], e.args)
        raise AssertionError(f"unexpected scalar node {e}")

    def _name(self, e: ir.Name) -> sp.Expr:
        if e.name in POSITIONS:
            return POSITIONS[e.name]
        if e.name == "n":
            self.out.uses_n = True
            return SIZES["n_q"]
        if e.name in SIZES:
            return SIZES[e.name]
        if e.name == "s":
            return S
        return self._lookup(e.name, (), Side.CONST)

    def _lookup(self, array: str, subs: tuple[sp.Expr, ...], side: Side) -> sp.Symbol:
        is_param = array in self.params
        integer = not is_param
        return self._add(("lookup", array, subs), lambda n: Lookup(
            f"{array}_{n}", sp.Symbol(f"{array}_{n}", integer=integer, real=True), array, subs,
            is_param, side)).symbol

    def _reduce(self, op: str, args: tuple[ir.Expr, ...]) -> sp.Expr:
        types = [a.type for a in args]
        vectors = [self.vector(a) for a in args]
        size = types[0].size or ""  # type: ignore[union-attr]
        sides = [self.side(v) for v in vectors]  # after folding: dot((k - k) + wd, q) is q's
        side = Side.CONST
        for one in sides:
            side = side.join(one)
        constant = [not self._has_features(v) for v in vectors]
        if all(constant) or any(v == 0 for v in vectors):  # dot(k, q - q) is 0
            return self._constant_reduction(op, vectors, size, args[0])
        if op == "dot" and set(sides) == {Side.QUERY, Side.KEY} and not any(constant):
            a, b = (0, 1) if sides[0] is Side.QUERY else (1, 0)
            va = self.as_vec(vectors[a], types[a])  # type: ignore[arg-type]
            vb = self.as_vec(vectors[b], types[b])  # type: ignore[arg-type]
            body = va.symbol * vb.symbol
            return self._add(("reduce", body, Side.PAIR), lambda n: Reduction(
                f"r{n}", _sym(f"r{n}"), size, Side.PAIR, body, gemm=(va, vb))).symbol
        body = {"dot": lambda: vectors[0] * vectors[1], "sum": lambda: vectors[0],
                "norm": lambda: vectors[0] ** 2}[op]()
        symbol = self._add(("reduce", body, side), lambda n: Reduction(
            f"r{n}", _sym(f"r{n}"), size, side, body)).symbol
        return Norm(symbol) if op == "norm" else symbol

    def _has_features(self, vector: sp.Expr) -> bool:
        """Whether a vector expression varies over its features (SymPy folds q - q to 0)."""
        return any(isinstance(self.out.node(x), Vec) for x in vector.free_symbols)

    @staticmethod
    def _constant_reduction(op: str, vectors: list[sp.Expr], size: str, at: ir.Expr
                            ) -> sp.Expr:
        """sum/dot/norm of feature-constant vectors (`sum(q - q)`, `norm(wd * 0 + 1)`): the
        size times the constant, as there is no feature axis to reduce over."""
        body = {"dot": lambda: vectors[0] * vectors[1], "sum": lambda: vectors[0],
                "norm": lambda: vectors[0] ** 2}[op]()
        if body == 0:
            return sp.S.Zero
        if size not in SIZES:
            raise SpecError(f"a {op} over '{size}' of a vector that does not vary over its "
                            "features is not supported", at.pos.line, at.pos.column,
                            hint=f"write the constant times the number of entries along '{size}' instead")
        return Norm(SIZES[size] * body) if op == "norm" else SIZES[size] * body

    def _call(self, func: str, args: list[sp.Expr], nodes: tuple[ir.Expr, ...]) -> sp.Expr:
        if func == "where":
            cond, then, other = args
            return sp.Piecewise((then, cond), (other, True))
        integer = all(n.type is not None and n.type.kind is Kind.INT for n in nodes)
        if func == "clamp" and integer:  # integer clamps (subscripts) stay exact integers
            return Min(Max(args[0], args[1]), args[2])
        if func == "clamp":
            return Clamp(*args)
        return SPEC_FUNCTIONS[func](*args)


def _arith(op: str, left: sp.Expr, right: sp.Expr, scalar: bool) -> sp.Expr:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if op == "/":
        return left / right
    if op == "^":
        return left**right
    if op == "//":
        return sp.floor(left / right)
    if op == "%":
        return Mod(left, right)  # not sp.Mod: see functions.Mod
    raise AssertionError(op)


def _compare(op: str, left: sp.Expr, right: sp.Expr) -> sp.Basic:
    relation = {"==": sp.Eq, "!=": sp.Ne, "<": sp.Lt, "<=": sp.Le, ">": sp.Gt, ">=": sp.Ge}[op]
    if left.is_comparable and right.is_comparable:  # two numbers: true or false now
        return relation(left, right)
    if left.is_number and right.is_number:  # gelu(1/4) < 1: numbers SymPy cannot order
        return relation(sp.N(elementary(left - right), 50), 0)
    return relation(left, right, evaluate=False)


def _fold_normalizer(out: Derivation) -> None:
    """An element-wise f(s) that reads nodes (sb[h] in sigmoid(s + sb[h])) becomes the logit
    f(x) under `none`: the same weights (masked pairs 0), and the chain rule then reaches
    those nodes through d logit / d node like any other logit term."""
    assert out.norm_expr is not None
    if not any(out.node(symbol) is not None for symbol in out.norm_expr.free_symbols):
        return
    out.logit = out.norm_expr.xreplace({S: out.logit})
    out.norm, out.norm_expr = NormKind.NONE, None


def derive(spec: ir.Spec) -> Derivation:
    """The forward derivation of a checked spec. A construct the checker accepts but the
    derivation refuses (LANGUAGE.md x3) raises SpecError located in the spec's text."""
    try:
        return _derive(spec)
    except SpecError as err:
        raise err.located(spec.source, spec.filename) from None


def _derive(spec: ir.Spec) -> Derivation:
    deriver = Deriver(spec)
    out = deriver.out
    x = deriver.scalar(spec.score)
    if spec.scale is not None:
        x = x * deriver.scalar(spec.scale)
    if spec.bias is not None:
        x = x + deriver.scalar(spec.bias)
    if spec.softcap is not None:
        cap = deriver.scalar(spec.softcap)
        x = cap * sp.tanh(x / cap)
    out.logit = x
    out.mask = deriver.scalar(spec.mask) if spec.mask is not None else None
    out.norm = spec.normalize.kind
    if spec.normalize.expr is not None:
        out.norm_expr = deriver.scalar(spec.normalize.expr)
        _fold_normalizer(out)
    if spec.normalize.sink is not None:
        out.sink = deriver.scalar(spec.normalize.sink)
    out.uses_n = out.uses_n or check.uses_n(spec)  # also `n` as a param or index dimension
    return out
