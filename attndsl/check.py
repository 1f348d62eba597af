"""Checker: ir.Spec -> typed ir.Spec, with lets inlined. Every rule of LANGUAGE.md 3 and 7.

Each expression node gets a `Type`: its kind (vector / float / integer / boolean), the size
name of a vector, and its side (query, key, pair or constant), which the planner uses to hoist.
"""

from __future__ import annotations

import dataclasses
import keyword
import sys
from collections.abc import Iterable
from typing import NoReturn

from . import ir
from .errors import SpecError, did_you_mean
from .ir import Kind, Side, Type

SIZE_NAMES = ("heads", "kv_heads", "d", "dv", "n_q", "n_k", "n")
POSITION_NAMES = {"i": Side.QUERY, "j": Side.KEY, "h": Side.CONST, "b": Side.CONST}
CLAUSE_KEYWORDS = (
    "attention", "score", "scale", "bias", "softcap", "mask", "normalize", "heads", "kv_heads",
    "param", "index", "input", "let",
)
RESERVED = frozenset(
    ("q", "k", "v", "out", "lse", "dout", "s", "i", "j", "h", "b", "d", "dv", "n", "n_q", "n_k",
     "heads", "kv_heads", "softmax", "none", "and", "or", "not")
    + CLAUSE_KEYWORDS
    + tuple(ir.FUNCTIONS)
)
# Tensors of the call, never values inside an expression.
TENSORS = ("v", "out", "lse", "dout")
# Functions that keep integers integers; every other function gives a float.
INTEGER_PRESERVING = ("abs", "min", "max", "clamp", "where")
# Functions that turn a float into an integer (gradient 0), so it can be a subscript.
ROUNDING = ("floor", "ceil", "round")

# A let chain inlines into one deep tree: past these, a SpecError rather than a RecursionError
# (or an expression too large to derive). The recursion limit is raised (process-wide, never
# lowered, to at most 9000 frames: C-level recursion such as == on IR trees stays far inside
# the C stack) to fit what passes.
MAX_DEPTH = 2000
MAX_NODES = 200_000
FRAMES_PER_LEVEL = 4  # the deepest walks (to_text, derivation, printing) recurse ~2-3 per level

FLOAT = Type(Kind.FLOAT)
INT = Type(Kind.INT)
BOOL = Type(Kind.BOOL)


def _fail(message: str, node: object, hint: str | None = None) -> NoReturn:
    pos = getattr(node, "pos", ir.NOPOS)
    raise SpecError(message, pos.line, pos.column, hint=hint)


def _describe(expr: ir.Expr) -> str:
    return ir.to_text(expr)


class Checker:
    """Types expressions against the declarations of one spec."""

    def __init__(self, spec: ir.Spec) -> None:
        self.spec = spec
        self.params = {p.name: p for p in spec.params}
        self.indices = {x.name: x for x in spec.indices}
        self.lets: dict[str, ir.Expr] = {}  # checked, inlined bodies
        self.let_lines = {let.name: let.pos.line for let in spec.lets}
        self.current_let: str | None = None
        self.allow_s = False
        self.sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (depth, nodes), see _measure

    # ---- declarations ----
    def declarations(self) -> None:
        declared: dict[str, ir.Param | ir.Index | ir.Let] = {}
        decls: list[ir.Param | ir.Index | ir.Let] = [*self.spec.params, *self.spec.indices,
                                                     *self.spec.lets]
        for decl in decls:
            kind = decl.kind if isinstance(decl, ir.Param) else type(decl).__name__.lower()
            kind = f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
            if decl.name in RESERVED:
                _fail(f"'{decl.name}' is reserved and cannot name {kind}", decl,
                      hint="choose another name")
            if "__" in decl.name or keyword.iskeyword(decl.name):
                _fail(f"'{decl.name}' cannot name {kind}", decl,
                      hint="names with '__' and Python keywords are reserved; a spec is not "
                      "Python")
            if decl.name in declared:
                first = declared[decl.name]
                _fail(f"'{decl.name}' is declared twice", decl,
                      hint=f"first declared on line {first.pos.line}")
            declared[decl.name] = decl
        arrays: list[ir.Param | ir.Index] = [*self.spec.params, *self.spec.indices]
        for decl in arrays:
            for dim in decl.dims:
                self._dim(decl, dim, declared)
        heads, kv_heads = self.spec.heads, self.spec.kv_heads
        for value, clause in ((heads, "heads"), (kv_heads, "kv_heads")):
            if value is not None and value < 1:
                pos = self.spec.clause_at(clause)
                raise SpecError(f"'{clause}' must be at least 1, got {value}", pos.line,
                                pos.column)
        if heads is not None and kv_heads is not None and heads % kv_heads:
            pos = self.spec.clause_at("kv_heads")
            raise SpecError(
                f"kv_heads {kv_heads} does not divide heads {heads}", pos.line, pos.column,
                hint="grouped-query attention shares each key/value head among "
                "heads / kv_heads query heads",
            )

    def _dim(self, decl: ir.Param | ir.Index, dim: ir.Dim,
             declared: dict[str, ir.Param | ir.Index | ir.Let]) -> None:
        """A size in DIMS: a size name, a positive integer literal, or a fresh name."""
        if isinstance(dim, int):
            if dim < 1:
                _fail(f"size {dim} of '{decl.name}' must be at least 1", decl)
        elif dim in declared:
            _fail(f"size name '{dim}' of '{decl.name}' clashes with the "
                  f"{type(declared[dim]).__name__.lower()} '{dim}'", decl,
                  hint="a size is a name such as 'd', 'heads' or a fresh name like 'r'")
        elif dim in RESERVED and dim not in SIZE_NAMES:
            _fail(f"'{dim}' is not a size (in the dimensions of '{decl.name}')", decl,
                  hint=f"a size is one of {', '.join(SIZE_NAMES)}, an integer, or a fresh "
                  "name such as 'r'")

    # ---- expressions ----
    def expr(self, node: ir.Expr) -> ir.Expr:
        method = getattr(self, "_" + type(node).__name__.lower())
        return method(node)

    def _num(self, node: ir.Num) -> ir.Expr:
        return dataclasses.replace(node, type=INT if node.is_int else FLOAT)

    def _name(self, node: ir.Name) -> ir.Expr:
        name = node.name
        if name in ("q", "k"):
            return dataclasses.replace(node, type=Type(Kind.VECTOR, "d",
                                                       Side.QUERY if name == "q" else Side.KEY))
        if name in POSITION_NAMES:
            return dataclasses.replace(node, type=Type(Kind.INT, side=POSITION_NAMES[name]))
        if name in SIZE_NAMES:
            return dataclasses.replace(node, type=INT)
        if name == "s":
            if not self.allow_s:
                _fail("'s' (the logit) may only be used in the normalize clause", node)
            return dataclasses.replace(node, type=Type(Kind.FLOAT, side=Side.PAIR))
        if name == "v":
            _fail("'v' cannot be used in an expression", node,
                  hint="values enter only through the weights: out = sum_j weights * v")
        if name in TENSORS:
            _fail(f"'{name}' cannot be used in an expression", node,
                  hint="a spec computes out and lse; it cannot read them")
        if name in self.lets:
            return self.lets[name]
        if name == self.current_let:
            _fail(f"the let '{name}' cannot use itself", node)
        if name in self.let_lines:
            _fail(f"'{name}' is defined by a later let (line {self.let_lines[name]})", node,
                  hint="a let may use only the lets above it")
        if name in self.params:
            return self._bare_param(node, self.params[name])
        if name in self.indices:
            index = self.indices[name]
            if index.dims:
                _fail(f"index '{name}' is an integer array [{', '.join(map(str, index.dims))}]"
                      f" and needs {len(index.dims)} subscript"
                      f"{'s' if len(index.dims) > 1 else ''}", node,
                      hint=f"write, e.g., {name}[{', '.join(['i'] * len(index.dims))}]; "
                      "index arrays are never vectors")
            return dataclasses.replace(node, type=INT)
        if name in ir.FUNCTIONS:
            _fail(f"'{name}' is a function", node, hint=f"call it as {name}(...)")
        self._unknown(name, node)

    def _bare_param(self, node: ir.Name, param: ir.Param) -> ir.Expr:
        if param.batched:  # the row of the call's batch: c is c[b]
            return self._subscript(ir.Subscript(param.name, (), pos=node.pos))
        if not param.dims:
            return dataclasses.replace(node, type=FLOAT)
        if len(param.dims) == 1:
            return dataclasses.replace(node, type=Type(Kind.VECTOR, str(param.dims[0])))
        _fail(f"'{param.name}' is a matrix [{', '.join(map(str, param.dims))}]", node,
              hint=f"use it as the right operand of '@' (q @ {param.name}) or index it")

    def _unknown(self, name: str, node: object) -> NoReturn:
        if "__" in name:
            _fail(f"unknown name '{name}'", node, hint="a spec is not Python")
        known = [*self.params, *self.indices, *self.lets, *POSITION_NAMES, *SIZE_NAMES, "q", "k"]
        if self.allow_s:
            known.append("s")
        _fail(f"unknown name '{name}'", node, hint=did_you_mean(name, known))

    def _subscript(self, node: ir.Subscript) -> ir.Expr:
        array = self.params.get(node.name) or self.indices.get(node.name)
        if array is None:
            if node.name in ir.FUNCTIONS:
                _fail(f"'{node.name}' is a function", node, hint=f"call it as {node.name}(...)")
            if self._is_known(node.name):
                _fail(f"'{node.name}' cannot be subscripted", node,
                      hint="only params and indices take [...]")
            self._unknown(node.name, node)
        indices = tuple(self.expr(i) for i in node.indices)
        for index in indices:
            assert index.type is not None
            if index.type.kind is not Kind.INT:
                _fail(f"subscript {_describe(index)} of '{node.name}' is {index.type}; "
                      "subscripts must be integers", index)
        is_param = isinstance(array, ir.Param)
        if is_param and array.batched:  # an input: its batch axis is read at b
            indices = (self.expr(ir.Name("b", pos=node.pos)), *indices)
        side = _join(i.type.side for i in indices if i.type)
        rank = len(array.dims)
        if len(indices) == rank:
            return dataclasses.replace(node, indices=indices,
                                       type=Type(Kind.FLOAT if is_param else Kind.INT, side=side))
        if is_param and len(indices) == rank - 1:
            return dataclasses.replace(node, indices=indices,
                                       type=Type(Kind.VECTOR, str(array.dims[-1]), side))
        what = array.kind if is_param else "index"
        dims = array.spec_dims if is_param else array.dims
        used = len(node.indices)
        rank = len(dims)
        if rank == 0:
            _fail(f"{what} '{node.name}' is a scalar and takes no subscripts", node,
                  hint=f"write {node.name}")
        _fail(f"{what} '{node.name}' has {rank} dimension{'s' if rank != 1 else ''} "
              f"[{', '.join(map(str, dims))}] but is used with {used} "
              f"subscript{'s' if used != 1 else ''}", node,
              hint=f"write {rank} subscript{'s' if rank != 1 else ''}"
              + (" (or one fewer for a vector)" if is_param else "; index arrays are never vectors"))

    def _is_known(self, name: str) -> bool:
        return (name in ("q", "k", "s", *TENSORS) or name in POSITION_NAMES
                or name in SIZE_NAMES or name in self.let_lines)

    def _unary(self, node: ir.Unary) -> ir.Expr:
        operand = self.expr(node.operand)
        assert operand.type is not None
        if node.op == "not":
            self._need_bool(operand, "'not'")
            return dataclasses.replace(node, operand=operand, type=operand.type)
        self._need_number(operand, "'-'")
        return dataclasses.replace(node, operand=operand, type=operand.type)

    def _binary(self, node: ir.Binary) -> ir.Expr:
        if node.op == "@":
            return self._project(node)
        left, right = self.expr(node.left), self.expr(node.right)
        assert left.type is not None and right.type is not None
        side = left.type.side.join(right.type.side)
        if node.op in ir.LOGIC_OPS:
            self._need_bool(left, f"'{node.op}'")
            self._need_bool(right, f"'{node.op}'")
            return dataclasses.replace(node, left=left, right=right, type=Type(Kind.BOOL, None,
                                                                                side))
        if node.op in ir.COMPARISON_OPS:
            for operand in (left, right):
                self._need_scalar(operand, f"'{node.op}'")
            return dataclasses.replace(node, left=left, right=right,
                                       type=Type(Kind.BOOL, None, side))
        if node.op == ".":
            return self._reduce_dot(node, left, right)
        for operand in (left, right):
            self._need_number(operand, f"'{node.op}'")
        if node.op in ("//", "%"):
            for operand in (left, right):
                if operand.type.kind is not Kind.INT:  # type: ignore[union-attr]
                    _fail(f"'{node.op}' takes integers, but {_describe(operand)} is "
                          f"{operand.type}", operand, hint="use '/' for float division")
        result = self._broadcast(node, left, right)
        if result.kind is Kind.INT and node.op in ("/", "^"):
            result = dataclasses.replace(result, kind=Kind.FLOAT)
        return dataclasses.replace(node, left=left, right=right, type=result)

    def _broadcast(self, node: ir.Expr, *operands: ir.Expr) -> Type:
        """The type of an element-wise combination: vectors must share a size."""
        types = [o.type for o in operands if o.type is not None]
        side = _join(t.side for t in types)
        vectors = [(o, o.type) for o in operands if o.type and o.type.kind is Kind.VECTOR]
        if vectors:
            first, ftype = vectors[0]
            for other, otype in vectors[1:]:
                if otype.size != ftype.size:
                    _fail(f"size mismatch: {_describe(first)} is a vector over {ftype.size} "
                          f"but {_describe(other)} is a vector over {otype.size}", node)
            return Type(Kind.VECTOR, ftype.size, side)
        if all(t.kind is Kind.INT for t in types):
            return Type(Kind.INT, None, side)
        return Type(Kind.FLOAT, None, side)

    def _project(self, node: ir.Binary) -> ir.Expr:
        left = self.expr(node.left)
        assert left.type is not None
        matrix = self.params.get(node.right.name) if isinstance(node.right, ir.Name) else None
        if matrix is None or len(matrix.dims) != 2:
            _fail(f"the right operand of '@' must be a param matrix, not "
                  f"{_describe(node.right)}", node.right,
                  hint="declare it as 'param W[d, r]' and write q @ W")
        if left.type.kind is not Kind.VECTOR:
            _fail(f"the left operand of '@' must be a vector, but {_describe(left)} is "
                  f"{left.type}", left)
        if left.type.side is Side.PAIR:  # kernels project rows once, never per (i, j) pair
            _fail(f"the left operand of '@' depends on both the query and the key side "
                  f"({_describe(left)}); a projection takes a query-side or a key-side vector",
                  left, hint=f"project first, then combine (a projection is linear): "
                  f"q @ {matrix.name} + k @ {matrix.name} for (q + k) @ {matrix.name}, "
                  f"where(c, q @ {matrix.name}, k @ {matrix.name}) for where(c, q, k) @ "
                  f"{matrix.name}, (q @ {matrix.name}) * s for (q * s) @ {matrix.name}")
        rows, cols = (str(x) for x in matrix.dims)
        if left.type.size != rows:
            _fail(f"size mismatch: {_describe(left)} is a vector over {left.type.size} but "
                  f"'{matrix.name}' has {rows} rows", node,
                  hint=f"declare it as 'param {matrix.name}[{left.type.size}, {cols}]'")
        right = dataclasses.replace(node.right, type=Type(Kind.VECTOR, cols))
        return dataclasses.replace(node, left=left, right=right,
                                   type=Type(Kind.VECTOR, cols, left.type.side))

    def _reduce_dot(self, node: ir.Binary | ir.Call, left: ir.Expr, right: ir.Expr) -> ir.Expr:
        for operand in (left, right):
            if operand.type is None or operand.type.kind is not Kind.VECTOR:
                _fail(f"'.' takes two vectors, but {_describe(operand)} is {operand.type}",
                      operand, hint="use '*' to multiply scalars")
        if left.type.size != right.type.size:  # type: ignore[union-attr]
            _fail(f"size mismatch: {_describe(left)} is a vector over "
                  f"{left.type.size} but {_describe(right)} is a vector over "  # type: ignore
                  f"{right.type.size}", node)  # type: ignore[union-attr]
        side = left.type.side.join(right.type.side)  # type: ignore[union-attr]
        typed = Type(Kind.FLOAT, None, side)
        if isinstance(node, ir.Call):
            return dataclasses.replace(node, args=(left, right), type=typed)
        return dataclasses.replace(node, left=left, right=right, type=typed)

    def _call(self, node: ir.Call) -> ir.Expr:
        arity = ir.FUNCTIONS.get(node.func)
        if arity is None:
            if node.func in self.params or node.func in self.indices:
                _fail(f"'{node.func}' is not a function", node,
                      hint=f"index it with [...]: {node.func}[...]")
            if self._is_known(node.func):
                _fail(f"'{node.func}' is not a function", node)
            hint = ("a spec is not Python" if "__" in node.func
                    else did_you_mean(node.func, ir.FUNCTIONS))
            _fail(f"unknown function '{node.func}'", node, hint=hint)
        if len(node.args) != arity:
            _fail(f"{node.func}() takes {arity} argument{'s' if arity > 1 else ''}, "
                  f"got {len(node.args)}", node)
        args = tuple(self.expr(a) for a in node.args)
        if node.func == "dot":
            return self._reduce_dot(node, args[0], args[1])
        if node.func in ("sum", "norm"):
            (arg,) = args
            if arg.type is None or arg.type.kind is not Kind.VECTOR:
                _fail(f"{node.func}() reduces a vector, but {_describe(arg)} is {arg.type}", arg)
            return dataclasses.replace(node, args=args, type=Type(Kind.FLOAT, None,
                                                                  arg.type.side))
        if node.func == "where":
            cond, *branches = args
            self._need_bool(cond, "where()")
            for branch in branches:
                self._need_number(branch, "where()")
            kinds = {(b.type.kind is Kind.VECTOR, b.type.size) for b in branches if b.type}
            if len(kinds) > 1 and any(v for v, _ in kinds):
                yes, no = branches
                _fail(f"where() needs two branches of the same kind, but {_describe(yes)} is "
                      f"{yes.type} and {_describe(no)} is {no.type}", node,
                      hint="both scalars, or vectors of the same size")
            typed = self._broadcast(node, *branches)
            side = typed.side.join(cond.type.side)  # type: ignore[union-attr]
            return dataclasses.replace(node, args=args, type=dataclasses.replace(typed, side=side))
        for arg in args:
            self._need_number(arg, f"{node.func}()")
        typed = self._broadcast(node, *args)
        if typed.kind is Kind.INT and node.func not in INTEGER_PRESERVING + ROUNDING:
            typed = dataclasses.replace(typed, kind=Kind.FLOAT)
        if typed.kind is Kind.FLOAT and node.func in ROUNDING:
            typed = dataclasses.replace(typed, kind=Kind.INT)
        return dataclasses.replace(node, args=args, type=typed)

    # ---- kind requirements ----
    def _need_bool(self, node: ir.Expr, where: str) -> None:
        if node.type is None or node.type.kind is not Kind.BOOL:
            _fail(f"{where} needs a boolean, but {_describe(node)} is {node.type}", node,
                  hint="compare it, e.g. 'x > 0'")

    def _need_number(self, node: ir.Expr, where: str) -> None:
        if node.type is not None and node.type.kind is Kind.BOOL:
            _fail(f"{where} needs a number, but {_describe(node)} is a boolean", node,
                  hint="use where(c, x, y) to pick a number from a condition")

    def _need_scalar(self, node: ir.Expr, where: str) -> None:
        self._need_number(node, where)
        if node.type is not None and node.type.kind is Kind.VECTOR:
            _fail(f"{_describe(node)} is a vector over {node.type.size}; reduce it with '.', "
                  "sum() or norm()", node)

    # ---- clauses ----
    def let(self, let: ir.Let) -> None:
        self.current_let = let.name
        self.lets[let.name] = body = self.expr(let.expr)
        self.current_let = None
        depth, nodes = _measure(body, self.sizes)
        if depth > MAX_DEPTH or nodes > MAX_NODES:
            _fail(f"let '{let.name}' is too large once the lets it uses are inlined: {depth} "
                  f"levels deep and {nodes} nodes (at most {MAX_DEPTH} and {MAX_NODES})", let,
                  hint="lets are inlined where used; write the expression with fewer lets")
        _make_room(depth)

    def scalar_clause(self, clause: str, node: ir.Expr | None) -> ir.Expr | None:
        if node is None:
            return None
        typed = self.expr(node)
        self._need_scalar(typed, f"'{clause}'")
        return typed

    def softcap(self, node: ir.Expr | None) -> ir.Expr | None:
        """A constant cap c > 0: no q, k, vectors, positions; a literal must be positive."""
        if node is None:
            return None
        typed = self.expr(node)
        for sub in ir.walk(typed):
            if sub.type is not None and sub.type.kind is Kind.VECTOR:
                _fail(f"'softcap' may not use {_describe(sub)} (a vector)", sub,
                      hint="the cap is a constant: a number, a size or a scalar param")
        self._need_scalar(typed, "'softcap'")
        assert typed.type is not None
        if typed.type.side is not Side.CONST:
            _fail(f"'softcap' must not depend on i or j, but {_describe(typed)} does", typed,
                  hint="the cap is a constant: a number, a size or a scalar param")
        value = _literal_value(typed)
        if value is not None and value <= 0:
            _fail(f"'softcap' must be positive, got {_describe(typed)}", typed)
        return typed

    def mask(self, node: ir.Expr | None) -> ir.Expr | None:
        if node is None:
            return None
        typed = self.expr(node)
        for sub in ir.walk(typed):
            if sub.type is not None and sub.type.kind is Kind.VECTOR:
                _fail(f"a mask may not use {_describe(sub)} (a vector)", sub,
                      hint="masks use positions, indices and params only")
        if typed.type is None or typed.type.kind is not Kind.BOOL:
            _fail(f"'mask' needs a boolean, but {_describe(typed)} is {typed.type}", typed,
                  hint="write a comparison such as 'j <= i'")
        return typed

    def normalize(self, norm: ir.Normalize) -> ir.Normalize:
        if norm.sink is not None:
            return dataclasses.replace(norm, sink=self.sink(norm.sink))
        if norm.expr is None:
            return norm
        bare = norm.expr
        if isinstance(bare, ir.Name) and bare.name != "s" and not (
            bare.name in self.params or bare.name in self.indices or self._is_known(bare.name)
        ):
            names = ["softmax", "sum", "none", *(f for f, a in ir.FUNCTIONS.items() if a == 1)]
            _fail(f"unknown normalization '{bare.name}'", bare,
                  hint=did_you_mean(bare.name, names)
                  or "write softmax, sum, none, or an expression in s")
        self.allow_s = True
        try:
            typed = self.expr(norm.expr)
        finally:
            self.allow_s = False
        self._need_scalar(typed, "'normalize'")
        if not any(isinstance(n, ir.Name) and n.name == "s" for n in ir.walk(norm.expr)):
            names = ["softmax", "sum", "none", *(f for f, a in ir.FUNCTIONS.items() if a == 1)]
            text = _describe(norm.expr)
            hint = did_you_mean(text, names) or "write softmax, sum, none, or an expression in s"
            _fail(f"'normalize {text}' does not use the logit 's'", norm.expr, hint=hint)
        for sub in ir.walk(typed):
            if sub.type is not None and sub.type.kind is Kind.VECTOR:
                _fail(f"normalize may not use {_describe(sub)} (a vector)", sub)
        return dataclasses.replace(norm, expr=typed)


    def sink(self, node: ir.Expr) -> ir.Expr:
        """`softmax(sink = EXPR)`: one logit per row, so no vectors and no key position."""
        typed = self.expr(node)
        for sub in ir.walk(typed):
            if sub.type is not None and sub.type.kind is Kind.VECTOR:
                _fail(f"a sink may not use {_describe(sub)} (a vector)", sub,
                      hint="a sink is one logit per row: positions i, h, b, params, indices")
        self._need_scalar(typed, "'sink'")
        assert typed.type is not None
        if typed.type.side not in (Side.CONST, Side.QUERY):
            _fail(f"a sink must not depend on j, but {_describe(typed)} does", typed,
                  hint="a sink is one logit per row: positions i, h, b, params, indices")
        return typed


def _measure(expr: ir.Expr, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(depth, tree size) of `expr`, without recursion; inlined lets share sub-trees, so `memo`
    (kept across lets, keyed by node identity) makes each let cost only its own nodes."""
    stack = [(expr, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in memo:
            continue
        kids = ir.children(node)
        if ready:
            depth = 1 + max((memo[id(c)][0] for c in kids), default=0)
            memo[id(node)] = (depth, 1 + sum(memo[id(c)][1] for c in kids))
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in kids if id(c) not in memo)
    return memo[id(expr)]


def _make_room(depth: int) -> None:
    """Raise (never lower) the recursion limit so walks of a `depth`-deep tree fit."""
    needed = FRAMES_PER_LEVEL * depth + 1000
    if sys.getrecursionlimit() < needed:
        sys.setrecursionlimit(needed)


def _literal_value(expr: ir.Expr) -> float | None:
    """The value of a literal, or a negated literal; None for anything else."""
    if isinstance(expr, ir.Num):
        return float(expr.text)
    if isinstance(expr, ir.Unary) and expr.op == "-":
        inner = _literal_value(expr.operand)
        return None if inner is None else -inner
    return None


def uses_n(spec: ir.Spec) -> bool:
    """Whether the spec writes `n` (as a size or a value), so needs n_q == n_k at call time."""
    arrays: list[ir.Param | ir.Index] = [*spec.params, *spec.indices]
    if any("n" in decl.dims for decl in arrays):
        return True
    exprs = [spec.score, spec.scale, spec.bias, spec.softcap, spec.mask, spec.normalize.expr,
             spec.normalize.sink, *(let.expr for let in spec.lets)]
    return any(isinstance(node, ir.Name) and node.name == "n"
               for e in exprs if e is not None for node in ir.walk(e))


def _join(sides: Iterable[Side]) -> Side:
    result = Side.CONST
    for side in sides:
        result = result.join(side)
    return result


def check(spec: ir.Spec) -> ir.Spec:
    """The typed spec, lets inlined; raises SpecError on the first rule broken."""
    if spec.checked:
        return spec
    checker = Checker(spec)
    checker.declarations()
    for let in spec.lets:
        checker.let(let)
    score = checker.scalar_clause("score", spec.score)
    assert score is not None
    scale = checker.scalar_clause("scale", spec.scale)
    bias = checker.scalar_clause("bias", spec.bias)
    softcap = checker.softcap(spec.softcap)
    mask = checker.mask(spec.mask)
    normalize = checker.normalize(spec.normalize)
    return dataclasses.replace(
        spec, score=score, scale=scale, bias=bias, softcap=softcap, mask=mask,
        normalize=normalize, checked=True,
    )
