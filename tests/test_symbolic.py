"""The forward derivation (attndsl/symbolic.py): node graph, sides, GEMM vs loop reductions."""

from __future__ import annotations

from pathlib import Path

import pytest
import sympy as sp

import attndsl
from attndsl import functions as fn
from attndsl.ir import NormKind, Side
from attndsl.symbolic import POSITIONS, SIZES, Derivation, Lookup, Reduction, Vec, derive

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.attn"))


def of(name: str) -> Derivation:
    return derive(attndsl.load(EXAMPLES / f"{name}.attn"))


def shape(d: Derivation) -> list[tuple[str, str, Side, str]]:
    """(type, kind, side, gemm?) of every node, in order."""
    out = []
    for n in d.nodes:
        if isinstance(n, Vec):
            out.append(("Vec", n.kind, n.side, ""))
        elif isinstance(n, Reduction):
            out.append(("Reduction", "gemm" if n.gemm else "loop", n.side, n.size))
        else:
            out.append(("Lookup", "param" if n.is_param else "index", n.side, n.array))
    return out


def test_scaled_dot_product_is_one_gemm() -> None:
    d = of("scaled_dot_product")
    assert shape(d) == [("Vec", "input", Side.QUERY, ""), ("Vec", "input", Side.KEY, ""),
                        ("Reduction", "gemm", Side.PAIR, "d")]
    (r,) = d.reductions
    assert d.logit == r.symbol / sp.sqrt(SIZES["d"])
    assert d.mask is None and d.norm is NormKind.SOFTMAX and d.norm_expr is None
    a, b = r.gemm  # type: ignore[misc]
    assert (a.name, b.name) == ("q", "k")


def test_bahdanau_has_one_pair_loop_and_projections_on_both_sides() -> None:
    d = of("bahdanau")
    (r,) = d.reductions
    assert r.side is Side.PAIR and r.gemm is None and r.size == "r"
    assert r.body.has(sp.tanh)
    projections = {v.param: v.side for v in d.vecs if v.kind == "proj"}
    assert projections == {"Wq": Side.QUERY, "Wk": Side.KEY}
    (w,) = [v for v in d.vecs if v.kind == "param"]
    assert w.param == "w" and w.side is Side.CONST and w.size == "r"
    assert d.logit == r.symbol


def test_luong_general_projects_the_query_side_into_a_gemm() -> None:
    d = of("luong_general")
    (proj,) = [v for v in d.vecs if v.kind == "proj"]
    assert proj.param == "Wa" and proj.side is Side.QUERY
    assert d.node(proj.expr).name == "q"  # type: ignore[arg-type,union-attr]
    (r,) = d.reductions
    assert r.gemm is not None and r.side is Side.PAIR
    a, b = r.gemm
    assert (a.symbol, b.name) == (proj.symbol, "k")


def test_cosine_has_query_and_key_row_reductions() -> None:
    d = of("cosine")
    sides = {(r.side, bool(r.gemm)) for r in d.reductions}
    assert sides == {(Side.PAIR, True), (Side.QUERY, False), (Side.KEY, False)}
    (tau,) = d.lookups
    assert tau.is_param and tau.array == "tau" and tau.side is Side.CONST
    assert d.logit.has(sp.Max)
    r2, r3, r4 = (r.symbol for r in d.reductions)
    norm = fn.Norm  # norm(u) = Norm(sum_f u_f^2): sqrt with norm'(0) = 0
    assert d.logit == r2 / (norm(r3) * norm(r4) * fn.Max(sp.Rational(1, 100), tau.symbol))


def test_linear_hoists_feature_maps_per_side() -> None:
    d = of("linear")
    maps = [v for v in d.vecs if v.kind == "map"]
    assert [m.side for m in maps] == [Side.QUERY, Side.KEY]
    (r,) = d.reductions
    assert r.gemm == (maps[0], maps[1])
    assert d.norm is NormKind.SUM


def test_decomposable_maps_of_projections_are_gemm_operands() -> None:
    d = of("decomposable")
    assert [v.param for v in d.vecs if v.kind == "proj"] == ["F", "F"]
    (r,) = d.reductions
    assert r.gemm is not None and r.size == "r"


def test_lookups_and_masks() -> None:
    alibi = of("alibi")
    (slope,) = alibi.lookups
    assert slope.is_param and slope.subscripts == (POSITIONS["h"],)
    i, j = POSITIONS["i"], POSITIONS["j"]
    assert alibi.mask == sp.Le(j, i)
    doc = of("document")
    assert {(lk.array, lk.is_param, lk.side) for lk in doc.lookups} == {
        ("doc", False, Side.QUERY), ("doc", False, Side.KEY)}
    assert doc.uses_n
    rel = of("relative_bias")
    (table,) = rel.lookups
    assert table.side is Side.PAIR and table.subscripts[0] == POSITIONS["h"]
    # integer clamps of subscripts stay exact integers (Min/Max, not the opaque Clamp)
    assert table.subscripts[1].has(sp.Min) and table.subscripts[1].has(sp.Max)
    assert not of("causal").uses_n


def test_elementwise_normalizer_is_an_expression_in_s() -> None:
    from attndsl.symbolic import S

    sig = of("sigmoid")
    assert sig.norm is NormKind.ELEMENTWISE and sig.norm_expr is not None
    assert sig.norm_expr.free_symbols == {S, SIZES["n_k"]}
    relu = of("relu")
    assert relu.weights_expr().free_symbols == {relu.reductions[0].symbol, SIZES["d"],
                                                 SIZES["n_k"]}


def test_shared_subexpressions_become_one_node() -> None:
    spec = """attention twice {
        param W[d, d]
        score (q @ W) . k + (q @ W) . k
    }"""
    d = derive(attndsl.parse(spec))
    assert len([v for v in d.vecs if v.kind == "proj"]) == 1
    assert len(d.reductions) == 1
    assert d.logit == 2 * d.reductions[0].symbol


@pytest.mark.parametrize("name", NAMES)
def test_nodes_are_topologically_ordered_and_typed(name: str) -> None:
    d = of(name)
    seen: set[sp.Symbol] = set(POSITIONS.values()) | set(SIZES.values())
    for node in d.nodes:
        if isinstance(node, Vec) and node.kind in ("map", "proj"):
            assert node.expr is not None and set(node.expr.free_symbols) <= seen, node
        if isinstance(node, Reduction):
            assert {s for s in node.body.free_symbols} <= seen, node
            if node.gemm:
                a, b = node.gemm
                assert (a.side, b.side) == (Side.QUERY, Side.KEY)
                assert node.body == a.symbol * b.symbol
        if isinstance(node, Lookup):
            for sub in node.subscripts:
                assert sub.free_symbols <= seen, node
        seen.add(node.symbol)
    for symbol in d.logit.free_symbols:
        assert symbol in seen, (name, symbol)
    assert len({n.name for n in d.nodes}) == len(d.nodes)


def test_pretty_and_latex() -> None:
    grads = attndsl.derive(EXAMPLES / "bahdanau.attn")
    text = grads.pretty()
    assert "forward:" in text and "backward:" in text
    assert "(pair)" in text or "pair" in text
    assert "dS = P * (dP - D), D = rowsum(dO * O)" in text
    latex = grads.latex()
    assert "\\tanh" in latex
