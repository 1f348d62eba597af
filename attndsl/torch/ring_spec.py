"""A spec as ring attention runs it: the per-shard programs of one spec (docs/distributed.md).

A ring step runs a spec's kernels on one query shard against one visiting key shard, at their
global offsets. Three things of a spec would change meaning on a shard, so each step runs a
rewritten spec, printed back to spec text and checked again (nothing is patched as text):

  sizes     `n`, `n_q` and `n_k` in an expression mean the whole sequence: each becomes the
            index `ring_n` (shape [B], the global length), so no kernel recompiles per length
  [n]-arrays an index or input sized `n` holds one sequence read from both sides; it splits
            into a query-side copy (same name, sized n_q) and a key-side copy (NAME_k, sized
            n_k) that travels with k and v; doc[i] reads the first, doc[j] the second
  whole axes an array read at a sequence position other than exactly i or j (`doc[0]`,
            `doc[i - 1]`), a param with a sequence axis, and the second sequence axis of an
            array with two (`input pb[n_q, n_k]`, a pair bias) hold the whole sequence: that
            axis is declared with the free size `ring_len` (so no offset shifts it) and read at
            global positions. A param is the same on every rank; an index or input with one
            such axis is gathered from the ranks' shards (ring_attention); the first axis of
            a two-axis array is the query's, sliced like any query-side array
  key rows  a key-side row term the plan hoists (`norm(k)`, `k @ Wk`) is computed once, by
            the rank that owns the keys, and travels with k and v: the step program reads it
            as an input `k_rowsN[h // (heads // kv_heads), j]` (per key/value head), so no step
            recomputes it, and its gradient travels home with dk (key_rows: name -> the term)
  normalizer `sum` runs as `none` with a column of ones appended to v, so each step returns
            its numerator and denominator (merged exactly, then divided once); a softmax sink
            is counted once per row: only the step of a query shard against its own keys runs
            the spec with the sink, every other step runs it without
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from fractions import Fraction

import sympy as sp

import attndsl
from attndsl import ir
from attndsl.intervals import Interval, fold
from attndsl.ir import NormKind, Side
from attndsl.plan import make_plan
from attndsl.symbolic import POSITIONS

from .linear_scan import ARITH, FUNCTIONS, ROW_ONLY

SIZE_NAMES = ("n", "n_q", "n_k")
POSITIONAL = ("n", "n_q", "n_k")


@dataclasses.dataclass(frozen=True)
class RingSpec:
    """The programs of one spec on shards, and how their partial results merge."""

    base: ir.Spec  # the user's spec, checked
    step: ir.Spec  # every step's program
    own: ir.Spec  # a query shard against its own keys (the sink's step); else `step`
    unmasked: ir.Spec | None  # causal linear: a shard against fully visible keys
    merge: str  # "lse" (softmax), "ratio" (sum: numerators and denominators), "add"
    size_index: str | None  # the index holding the global length, if the spec reads one
    key_copies: dict[str, str]  # [n]-array -> its key-side copy
    mask: sp.Basic | None  # the step's mask as derived (SymPy), None: every key allowed
    lookups: dict[sp.Symbol, tuple[str, tuple[sp.Basic, ...]]]  # mask symbol -> array, subscripts
    key_rows: dict[str, ir.Expr]  # hoisted key-side row term's input name -> the term (base's)
    roles: dict[str, tuple[str | None, ...]]  # array -> per dim of its decl.dims: "query",
    # "key", "both" (an [n]-array read at i and j), "whole" or None (not a sequence axis)
    whole_size: str  # the free size name of whole axes in the shard programs

    @property
    def causal_linear(self) -> bool:
        return self.unmasked is not None

    def visible(self, q0: int, q1: int, k0: int, k1: int,
                known: Mapping[sp.Symbol, Interval] | None = None) -> str:
        """Which pairs of queries [q0, q1) x keys [k0, k1) the mask allows: "all", "none" or
        "some" (unknown counts as some). Each atom is bounded over the whole block
        (intervals.py) from the positions' ranges and `known`: an interval per lookup symbol
        (`lookups`) holding every value it reads in the block, e.g. the least and greatest
        document id of each shard."""
        if self.mask is None:
            return "all"
        i, j = POSITIONS["i"], POSITIONS["j"]
        ranges = {**(known or {})}
        for symbol, (first, last) in ((i, (q0, q1 - 1)), (j, (k0, k1 - 1))):
            ranges[symbol] = (Fraction(first), Fraction(last))
        seen = fold(self.mask, ranges)
        return "all" if seen is True else "none" if seen is False else "some"


def ring_spec(base: ir.Spec) -> RingSpec:
    """The shard programs of a checked spec; ValueError for what a ring cannot shard."""
    names = {p.name for p in base.params} | {x.name for x in base.indices}
    size_index = _fresh("ring_n", names) if _reads_sizes(base) else None
    roles = _roles(base)
    key_copies = {name: _fresh(f"{name}_k", names | {size_index})
                  for name, role in roles.items() if "both" in role}
    taken: set[str | None] = {*names, size_index, *key_copies.values()}
    whole_size = _fresh("ring_len", taken | _size_names(base))
    taken.add(whole_size)
    hoist = _KeyRows(base, taken)
    rewrite = _Rewrite(base, size_index, key_copies, roles)
    shard = dataclasses.replace(base, **{c: rewrite(hoist(getattr(base, c))) for c in
                                         ("score", "scale", "bias", "softcap", "mask")})
    norm = base.normalize
    expr = rewrite(hoist(norm.expr))
    merge = {NormKind.SOFTMAX: "lse", NormKind.SUM: "ratio"}.get(norm.kind, "add")
    if norm.kind is NormKind.SUM:
        step_norm = ir.Normalize(NormKind.NONE)
    else:
        step_norm = dataclasses.replace(norm, expr=expr, sink=None)
    declared = _declarations(base, size_index, key_copies, roles, whole_size) + \
        hoist.declarations
    step = _parse(dataclasses.replace(shard, normalize=step_norm), declared)
    own = step
    if norm.sink is not None:
        own = _parse(dataclasses.replace(shard, normalize=dataclasses.replace(
            norm, sink=rewrite(norm.sink))), declared)
    unmasked = None
    plan = make_plan(step)
    if plan.linear is not None and plan.linear.causal:
        unmasked = _parse(dataclasses.replace(shard, normalize=step_norm, mask=None), declared)
    lookups = {x.symbol: (x.array, x.subscripts) for x in plan.lookups}
    return RingSpec(base, step, own, unmasked, merge, size_index, key_copies, plan.deriv.mask,
                    lookups, hoist.terms, roles, whole_size)


def _fresh(name: str, taken: set[str | None]) -> str:
    while name in taken:
        name += "_"
    return name


def _dims(decl: ir.Param | ir.Index) -> tuple[ir.Dim, ...]:
    return decl.spec_dims if isinstance(decl, ir.Param) else decl.dims


def _clauses(spec: ir.Spec) -> list[ir.Expr]:
    norm = spec.normalize
    return [e for e in (spec.score, spec.scale, spec.bias, spec.softcap, spec.mask, norm.expr,
                        norm.sink) if e is not None]


def _reads_sizes(spec: ir.Spec) -> bool:
    return any(isinstance(node, ir.Name) and node.name in SIZE_NAMES
               for e in _clauses(spec) for node in ir.walk(e))


def _arrays(spec: ir.Spec) -> list[ir.Param | ir.Index]:
    return [*spec.params, *spec.indices]


def _size_names(spec: ir.Spec) -> set[str | None]:
    return {str(d) for decl in _arrays(spec) for d in decl.dims}


def _roles(spec: ir.Spec) -> dict[str, tuple[str | None, ...]]:
    """Each array's sequence axes, by how the spec reads them (the module docstring): an
    axis read only at exactly i (n_q, n) or j (n_k, n) is the query's, the key's or both;
    any other read, a param's axis and an array's second sequence axis hold the whole
    sequence. ValueError for what no shard can serve."""
    reads: dict[str, list[set[str]]] = {}
    for e in _clauses(spec):
        for node in ir.walk(e):
            if isinstance(node, ir.Subscript):
                forms = reads.setdefault(node.name, [set() for _ in node.indices])
                for axis, sub in enumerate(node.indices):
                    forms[axis].add(sub.name if isinstance(sub, ir.Name) and sub.name in "ij"
                                    else "other")
    roles = {}
    for decl in _arrays(spec):
        dims = decl.dims
        axes = [a for a, d in enumerate(dims) if d in POSITIONAL]
        role: list[str | None] = [None] * len(dims)
        seen = reads.get(decl.name, [set() for _ in dims])
        if isinstance(decl, ir.Param) and not decl.batched:
            for a in axes:
                role[a] = "whole"  # replicated: every rank holds all of it
        elif len(axes) == 1:
            a = axes[0]
            allowed = {"n_q": {"i"}, "n_k": {"j"}, "n": {"i", "j"}}[str(dims[a])]
            if seen[a] <= allowed:
                role[a] = {"n_q": "query", "n_k": "key", "n": "both"}[str(dims[a])]
            else:
                role[a] = "whole"
        elif len(axes) == 2:
            first, second = axes
            if not seen[first] <= {"i"} or dims[first] == "n_k":
                raise ValueError(
                    f"ring_attention: {decl.name} has two sequence axes "
                    f"({', '.join(map(str, _dims(decl)))}); a shard holds the rows of its "
                    "queries on the first, so the spec must read it there at i exactly (and the "
                    "first must not be n_k)")
            role[first], role[second] = "query", "whole"
        elif axes:
            raise ValueError(f"ring_attention: {decl.name} has {len(axes)} sequence axes; a "
                             "shard serves arrays with at most two")
        roles[decl.name] = tuple(role)
    return roles


# what a key-side row term may be built from to be computed apart: what linear_scan.evaluate
# computes with torch
ROW_FUNCTIONS = (*FUNCTIONS, *ROW_ONLY)
ROW_OPS = (*ARITH, ".", "@")


class _KeyRows:
    """Replaces each largest key-side term built from k (not k itself) by a key-side input
    read, `k_rowsN[h // (heads // kv_heads), j]`, when every part of it is computed apart:
    k, numbers, `d`, and params without a sequence axis, combined by ROW_OPS and ROW_FUNCTIONS.
    A spec on the linear path keeps its terms (its features are the kernel's own form)."""

    def __init__(self, spec: ir.Spec, taken: set[str | None]) -> None:
        self.spec, self.taken = spec, set(taken)
        self.on = make_plan(spec).linear is None
        self.terms: dict[str, ir.Expr] = {}
        self.declarations: list[str] = []

    def __call__(self, e: ir.Expr | None) -> ir.Expr | None:
        return e if e is None or not self.on else self._visit(e)

    def _visit(self, e: ir.Expr) -> ir.Expr:
        if self._hoisted(e):
            return self._read(e)
        if isinstance(e, ir.Unary):
            return dataclasses.replace(e, operand=self._visit(e.operand))
        if isinstance(e, ir.Binary):
            return dataclasses.replace(e, left=self._visit(e.left), right=self._visit(e.right))
        if isinstance(e, ir.Call):
            return dataclasses.replace(e, args=tuple(self._visit(a) for a in e.args))
        return e  # a subscript's indices are integers: never a row term

    def _hoisted(self, e: ir.Expr) -> bool:
        return (e.type is not None and e.type.side is Side.KEY and not isinstance(e, ir.Name)
                and any(isinstance(x, ir.Name) and x.name == "k" for x in ir.walk(e))
                and self._computed_apart(e))

    def _computed_apart(self, e: ir.Expr) -> bool:
        if isinstance(e, ir.Num):
            return True
        if isinstance(e, ir.Name):
            p = self.spec.param(e.name)
            return e.name in ("k", "d") or (p is not None and not p.batched and not any(
                dim in POSITIONAL for dim in p.dims))
        ok = ((isinstance(e, ir.Unary) and e.op == "-")
              or (isinstance(e, ir.Binary) and e.op in ROW_OPS)
              or (isinstance(e, ir.Call) and e.func in ROW_FUNCTIONS))
        return ok and all(self._computed_apart(c) for c in ir.children(e))

    def _read(self, e: ir.Expr) -> ir.Expr:
        for name, term in self.terms.items():  # the same term twice is one input
            if term == e:
                break
        else:
            name = _fresh(f"k_rows{len(self.terms)}", self.taken)
            self.taken.add(name)
            self.terms[name] = e
            assert e.type is not None
            feature = f", {e.type.size}" if e.type.kind is ir.Kind.VECTOR else ""
            self.declarations.append(f"input {name}[kv_heads, n_k{feature}]")
        group = ir.Binary("//", ir.Name("h"), ir.Binary("//", ir.Name("heads"),
                                                          ir.Name("kv_heads")))
        return ir.Subscript(name, (group, ir.Name("j")), e.pos)


class _Rewrite:
    """Sizes -> the global-length index; [n]-array reads -> the side's copy."""

    def __init__(self, spec: ir.Spec, size_index: str | None, key_copies: dict[str, str],
                 roles: dict[str, tuple[str | None, ...]]):
        self.spec, self.size_index, self.key_copies = spec, size_index, key_copies
        self.roles = roles

    def __call__(self, e: ir.Expr | None) -> ir.Expr | None:
        return None if e is None else _map(e, self._node)

    def _node(self, e: ir.Expr) -> ir.Expr:
        if isinstance(e, ir.Name) and e.name in SIZE_NAMES:
            assert self.size_index is not None
            return ir.Name(self.size_index, e.pos)
        if isinstance(e, ir.Subscript):
            return self._subscript(e)
        return e

    def _subscript(self, e: ir.Subscript) -> ir.Subscript:
        declared = self.spec.param(e.name) or self.spec.index(e.name)
        if declared is None:
            return e
        # an input's checked subscripts lead with b (dims ("B", ...)); spec text omits it
        reads_j = any(role == "both" and isinstance(sub, ir.Name) and sub.name == "j"
                      for role, sub in zip(self.roles[e.name], e.indices))
        name = self.key_copies[e.name] if reads_j else e.name
        written = e.indices[1:] if isinstance(declared, ir.Param) and declared.batched else \
            e.indices
        return dataclasses.replace(e, name=name, indices=written)


def _map(e: ir.Expr, f: Callable[[ir.Expr], ir.Expr]) -> ir.Expr:
    """`e` rebuilt bottom-up with `f` applied to every node."""
    if isinstance(e, ir.Unary):
        e = dataclasses.replace(e, operand=_map(e.operand, f))
    elif isinstance(e, ir.Binary):
        e = dataclasses.replace(e, left=_map(e.left, f), right=_map(e.right, f))
    elif isinstance(e, ir.Call):
        e = dataclasses.replace(e, args=tuple(_map(a, f) for a in e.args))
    elif isinstance(e, ir.Subscript):
        e = dataclasses.replace(e, indices=tuple(_map(a, f) for a in e.indices))
    return f(e)


def _declarations(spec: ir.Spec, size_index: str | None, key_copies: dict[str, str],
                  roles: dict[str, tuple[str | None, ...]], whole_size: str) -> list[str]:
    """The shard program's param, input and index lines: an [n] axis read at i and j becomes
    n_q (the query copy) and n_k (the key copy), a query axis n_q, a whole axis the free size
    `whole_size`."""
    lines = []
    for decl in _arrays(spec):
        kind = ("input" if decl.batched else "param") if isinstance(decl, ir.Param) else "index"
        role = roles[decl.name][len(decl.dims) - len(_dims(decl)):]  # as the spec writes it
        dims = _dims(decl)
        if decl.name in key_copies:
            lines.append(f"{kind} {decl.name}{_text_dims(dims, role, 'n_q', whole_size)}")
            lines.append(f"{kind} {key_copies[decl.name]}"
                         f"{_text_dims(dims, role, 'n_k', whole_size)}")
        else:
            lines.append(f"{kind} {decl.name}{_text_dims(dims, role, 'n', whole_size)}")
    if size_index is not None:
        lines.append(f"index {size_index}")
    return lines


def _text_dims(dims: tuple[ir.Dim, ...], role: tuple[str | None, ...], n_as: str,
               whole_size: str) -> str:
    if not dims:
        return ""
    named = {"whole": whole_size, "query": "n_q"}
    return "[" + ", ".join(named.get(r or "", n_as if d == "n" else str(d))
                           for d, r in zip(dims, role)) + "]"


def _parse(spec: ir.Spec, declarations: list[str]) -> ir.Spec:
    """`spec` (whose declarations are `declarations`) printed as spec text and checked."""
    lines = [f"attention {spec.name} {{"]
    if spec.heads is not None:
        lines.append(f"heads {spec.heads}")
    if spec.kv_heads is not None:
        lines.append(f"kv_heads {spec.kv_heads}")
    lines += declarations
    for clause in ("score", "scale", "bias", "softcap", "mask"):
        e = getattr(spec, clause)
        if e is not None:
            lines.append(f"{clause} {ir.to_text(e)}")
    lines.append(f"normalize {_normalize_text(spec.normalize)}")
    lines.append("}")
    return attndsl.parse("\n".join(lines))


def _normalize_text(norm: ir.Normalize) -> str:
    if norm.kind is NormKind.ELEMENTWISE:
        assert norm.expr is not None
        return ir.to_text(norm.expr)
    if norm.sink is not None:
        return f"softmax(sink = {ir.to_text(norm.sink)})"
    return norm.kind.value
