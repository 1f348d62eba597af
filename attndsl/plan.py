"""KernelPlan: what a fused kernel computes per pair, and what is hoisted per row.

Row-level nodes (q, k, projections, feature maps, norms: anything without both a query and a
key side) are computed once per call, before the pair kernel (`rows` in the generated NumPy
module), and their gradients are chained after it (`rows_backward`). The pair kernel reads the
row-level nodes it needs (`inputs`), computes every pair reduction (GEMM tiles or explicit
feature loops), the logit, the mask and the normalizer, and never stores an n_q x n_k matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from . import ir
from .grad import Gradients, derive_gradients
from .ir import NormKind, Side
from .symbolic import POSITIONS, Derivation, Lookup, Reduction, Vec, derive


@dataclass(frozen=True)
class PairInput:
    """A row-level node the pair kernel reads, and the layout it is passed in."""

    node: Vec | Reduction
    side: Side  # QUERY: [B, H, n_q(, F)], KEY: [B, H, n_k(, F)], CONST: [B, H(, F)]

    @property
    def is_vector(self) -> bool:
        return isinstance(self.node, Vec)

    @property
    def is_raw_key(self) -> bool:
        """The input k itself: passed as [B, kv_heads, n_k, d] and read at g(h)."""
        return isinstance(self.node, Vec) and self.node.kind == "input" and self.node.name == "k"

    @property
    def is_raw_query(self) -> bool:
        return isinstance(self.node, Vec) and self.node.kind == "input" and self.node.name == "q"


# A tile's first and last query row and key column (inclusive), for the corners of a mask atom.
TILE = {name: sp.Symbol(name, integer=True) for name in ("i_first", "i_last", "j_first",
                                                          "j_last")}


@dataclass(frozen=True)
class MaskAtom:
    """One relation of the mask. How every backend decides a tile's status from the atoms
    (0: the mask allows no pair of the tile, 1: some, 2: every pair):

      linear atom   from the tile's four corners (all true: 2, none: 0, else 1)
      other atoms   (doc[i] == doc[j], i // w) by scanning the tile's pairs, only when the
                    linear atoms leave the tile open (`tile_status_text` with the others at 1)
      the mask      And -> min, Or -> max, Not -> 2 - status of the atoms (`tile_status_text`)
    """

    relation: sp.Basic
    linear: bool  # a linear inequality in i and j: a tile's status follows from its corners

    def corners(self) -> list[sp.Basic]:
        """The relation at the four corners of a tile (over the TILE symbols)."""
        i, j = POSITIONS["i"], POSITIONS["j"]
        return [self.relation.xreplace({i: TILE[a], j: TILE[b]})
                for a in ("i_first", "i_last") for b in ("j_first", "j_last")]


def corner_status_text(true_corners: str) -> str:
    """A linear atom's status, from how many of the tile's four corners satisfy it."""
    return f"2 if {true_corners} == 4 else (0 if {true_corners} == 0 else 1)"


def scan_status_text(any_true: str, any_false: str) -> str:
    """An atom's status, from a scan of the tile's pairs: whether any satisfied it, any not."""
    return f"2 if {any_false} == 0 else (0 if {any_true} == 0 else 1)"


def tile_status_text(mask: sp.Basic, states: dict[sp.Basic, str]) -> str:
    """The mask's status over a tile as a Python expression (Numba CPU and CUDA alike) of its
    atoms' statuses, named in `states` (an atom missing there counts as open: 1)."""
    if mask in states:
        return states[mask]
    if isinstance(mask, (sp.And, sp.Or)):
        parts = ", ".join(tile_status_text(a, states) for a in mask.args)
        return f"{'min' if isinstance(mask, sp.And) else 'max'}({parts})"
    if isinstance(mask, sp.Not):
        return f"(2 - {tile_status_text(mask.args[0], states)})"
    if mask == sp.true:
        return "2"
    if mask == sp.false:
        return "0"
    return "1"


@dataclass(frozen=True)
class LinearPath:
    """phi(q) . psi(k) with `sum` or `none` normalization: the associative form, O(n F dv),
    which every backend runs instead of tiles (`attndsl show`: "path: linear attention").
    With A_i = phi(q_i), B_j = psi(k_j), rows i seeing keys j <= i (causal) or every key:

      forward    S_i = sum_{j seen by i} B_j v_j^T      z_i = sum_{j seen by i} B_j
                 den_i = A_i . z_i  (saved as the row state)
                 out_i = A_i S_i / den_i  (sum; 0 where den_i = 0)   or   A_i S_i  (none)
      backward   gnum_i = dO_i / den_i     gden_i = -(dO_i . out_i) / den_i   (none: dO_i, 0)
                 dA_i = S_i gnum_i + z_i gden_i
                 U_j = sum_{i seeing j} A_i gnum_i^T     u_j = sum_{i seeing j} A_i gden_i
                 dB_j = U_j v_j + u_j                    dv_j = U_j^T B_j

    Causal: S, z are running prefix sums over the keys (row i adds keys up to i), U, u running
    suffix sums over the rows (key j adds rows down to j). Nothing is n x n."""

    a: PairInput  # the query-side factor A_i
    b: PairInput  # the key-side factor B_j
    causal: bool  # mask j <= i
    normalized: bool  # `sum` (else `none`)


@dataclass(frozen=True)
class FeatureMap:
    """A row-level input that is an element-wise function of q alone or of k alone (phi(q) =
    elu(q) + 1 of linear attention). When every row-level node is q, k or such a map, the cpu
    target computes the maps and chains their adjoints in one fused pass each (`_maps_fwd`,
    `_maps_bwd`) instead of the NumPy reference's `rows` and `rows_backward`."""

    item: PairInput
    source: Vec  # the input q or k
    value: sp.Expr  # of source.symbol, per feature
    partial: sp.Expr  # d value / d source.symbol


@dataclass
class KernelPlan:
    deriv: Derivation
    grads: Gradients
    inputs: list[PairInput] = field(default_factory=list)
    gemms: list[Reduction] = field(default_factory=list)
    loops: list[Reduction] = field(default_factory=list)
    lookups: list[Lookup] = field(default_factory=list)  # read inside the pair kernel
    mask_atoms: list[MaskAtom] = field(default_factory=list)
    linear: LinearPath | None = None  # the associative form, when the spec allows it
    feature_maps: list[FeatureMap] | None = None  # every row-level node q, k or a FeatureMap
    # pair-kernel nodes (GEMMs, loops, lookups) that explicit loops read in their bodies:
    # symbol -> [(loop, d body / d symbol)]; their adjoint gathers sum_f dloop * partial
    nested: dict[sp.Symbol, list[tuple[Reduction, sp.Expr]]] = field(default_factory=dict)

    @property
    def spec(self) -> ir.Spec:
        return self.deriv.spec

    def input_for(self, symbol: sp.Symbol) -> PairInput | None:
        return next((p for p in self.inputs if p.node.symbol == symbol), None)

    def inputs_of_gemm(self, r: Reduction) -> tuple[PairInput, PairInput]:
        assert r.gemm is not None
        a, b = self.input_for(r.gemm[0].symbol), self.input_for(r.gemm[1].symbol)
        assert a is not None and b is not None
        return a, b

    @property
    def raw_inputs(self) -> set[str]:
        """Which of "q" and "k" the pair kernel reads as they are (not only through maps)."""
        return {name for name, raw in (("q", any(i.is_raw_query for i in self.inputs)),
                                       ("k", any(i.is_raw_key for i in self.inputs))) if raw}

    @property
    def linear_path(self) -> bool:
        return self.linear is not None

    @property
    def convex_rows(self) -> bool:
        """Whether the keys the mask allows a query row form one run [lo, hi) of every tile:
        the mask is one linear atom or an And of them (each holds on a half-line of j, or on
        all or none of it, for a fixed i; the intersection is an interval). The cpu forward then
        finds each run of a partly allowed tile (`row_band`: a scan, then a binary search) and
        computes its pairs without a mask test (issue 12 item 5)."""
        mask = self.deriv.mask
        atoms = {a.relation: a.linear for a in self.mask_atoms}
        parts = mask.args if isinstance(mask, sp.And) else (mask,)
        return mask is not None and all(atoms.get(p, False) for p in parts)

    @property
    def param_lookups(self) -> list[Lookup]:
        return [x for x in self.lookups if x.is_param]

    @property
    def nested_reductions(self) -> list[Reduction]:
        """GEMMs and loops read inside a loop's body, in node order."""
        return [r for r in self.gemms + self.loops if r.symbol in self.nested]


def _nested_reads(plan: KernelPlan) -> dict[sp.Symbol, list[tuple[Reduction, sp.Expr]]]:
    """Which loops read which pair-kernel nodes: the adjoint of such a node is not only
    dS * d logit / d node but also, per pair, sum over the reader's features of the reader's
    adjoint times d body / d node (readers come later in node order: sweep them in reverse)."""
    kernel = {r.symbol for r in plan.gemms + plan.loops} | {x.symbol for x in plan.lookups}
    reads: dict[sp.Symbol, list[tuple[Reduction, sp.Expr]]] = {}
    for loop in plan.loops:
        for symbol, expr in plan.grads.partials[loop.name]:
            if symbol in kernel:
                reads.setdefault(symbol, []).append((loop, expr))
    return reads


def _pair_expressions(deriv: Derivation) -> list[sp.Basic]:
    exprs: list[sp.Basic] = [deriv.logit]
    if deriv.mask is not None:
        exprs.append(deriv.mask)
    if deriv.norm_expr is not None:
        exprs.append(deriv.norm_expr)
    for r in deriv.reductions:
        if r.side is Side.PAIR:
            exprs += [r.gemm[0].symbol, r.gemm[1].symbol] if r.gemm else [r.body]
    return exprs


def _is_linear(relation: sp.Basic, deriv: Derivation) -> bool:
    """An inequality a*i + b*j + c (op) 0 whose a, b, c are constant over a tile."""
    if relation.rel_op in ("==", "!="):  # corners cannot show that a line misses a tile
        return False
    i, j = POSITIONS["i"], POSITIONS["j"]
    difference = relation.lhs - relation.rhs
    for symbol in difference.free_symbols - {i, j}:
        node = deriv.node(symbol)
        if node is not None and node.side is not Side.CONST:
            return False
    try:
        poly = sp.Poly(difference, i, j)
    except sp.PolynomialError:
        return False
    return poly.total_degree() <= 1


def _linear_path(deriv: Derivation, plan: KernelPlan) -> bool:
    """phi(q) . psi(k) with sum/none normalization, no position or pair terms but a causal mask."""
    if deriv.norm not in (NormKind.SUM, NormKind.NONE) or deriv.spec.softcap is not None:
        return False
    if len(plan.gemms) != 1 or plan.loops or plan.lookups:
        return False
    if deriv.logit != plan.gemms[0].symbol:
        return False
    i, j = POSITIONS["i"], POSITIONS["j"]
    return deriv.mask is None or deriv.mask in (sp.Le(j, i), sp.Ge(i, j))


def _feature_maps(deriv: Derivation, plan: KernelPlan) -> list[FeatureMap] | None:
    """The row-level inputs as FeatureMaps, or None unless every row-level node is the input
    q, the input k or an element-wise map of one of them that the pair kernel reads."""
    if deriv.sink is not None:
        return None
    inputs = {n.symbol: n for n in deriv.of(Vec) if n.kind == "input"}
    read = {item.node.symbol: item for item in plan.inputs}
    maps = []
    for node in deriv.nodes:
        if (isinstance(node, Vec) and node.kind == "input") or \
                (not isinstance(node, Vec) and node.side is Side.PAIR):
            continue  # the pair kernel computes pair-level nodes itself
        if not (isinstance(node, Vec) and node.kind == "map" and node.symbol in read):
            return None
        assert node.expr is not None
        sources = node.expr.free_symbols
        if len(sources) != 1 or not sources <= inputs.keys():
            return None  # positions, params, other nodes: the reference's rows compute it
        (symbol,) = sources
        partials = plan.grads.partials.get(node.name, [])
        partial = sum((e for s, e in partials if s == symbol), sp.S.Zero)
        if not partial.free_symbols <= {symbol}:
            return None
        maps.append(FeatureMap(read[node.symbol], inputs[symbol], node.expr, partial))
    return maps or None


def make_plan(spec_or_deriv: ir.Spec | Derivation) -> KernelPlan:
    deriv = spec_or_deriv if isinstance(spec_or_deriv, Derivation) else derive(spec_or_deriv)
    plan = KernelPlan(deriv, derive_gradients(deriv))
    used: set[sp.Symbol] = set()
    for e in _pair_expressions(deriv):
        used |= e.free_symbols
    # lookups inside pair lookups' subscripts (doc[i] inside table[doc[i], j]) are read too
    for node in deriv.nodes:
        if isinstance(node, Lookup) and node.symbol in used:
            for s in node.subscripts:
                used |= s.free_symbols
    for node in deriv.nodes:
        if node.symbol not in used:
            continue
        if isinstance(node, Lookup):
            plan.lookups.append(node)
        elif isinstance(node, Reduction) and node.side is Side.PAIR:
            (plan.gemms if node.gemm else plan.loops).append(node)
        else:
            plan.inputs.append(PairInput(node, node.side))  # type: ignore[arg-type]
    if deriv.mask is not None:
        atoms = sorted(deriv.mask.atoms(sp.core.relational.Relational), key=sp.default_sort_key)
        plan.mask_atoms = [MaskAtom(a, _is_linear(a, deriv)) for a in atoms]
    if _linear_path(deriv, plan):
        a, b = plan.inputs_of_gemm(plan.gemms[0])
        plan.linear = LinearPath(a, b, causal=deriv.mask is not None,
                                 normalized=deriv.norm is NormKind.SUM)
    plan.nested = _nested_reads(plan)
    plan.feature_maps = _feature_maps(deriv, plan)
    return plan


def describe_path(spec: ir.Spec) -> str:
    """One line for `attndsl show`: which kernel path the spec takes."""
    plan = make_plan(spec)
    if plan.linear_path:
        how = "causal prefix sums" if plan.deriv.mask is not None else "associative form"
        return f"path: linear attention ({how}, O(n d dv))"
    parts = [f"{len(plan.gemms)} GEMM pair reduction(s)"]
    if plan.loops:
        parts.append(f"{len(plan.loops)} explicit pair loop(s)")
    if plan.mask_atoms:
        linear = sum(a.linear for a in plan.mask_atoms)
        parts.append(f"mask: {linear} linear atom(s) bounded from tile corners, "
                     f"{len(plan.mask_atoms) - linear} checked per tile")
    return "path: fused tiles (" + ", ".join(parts) + ")"
