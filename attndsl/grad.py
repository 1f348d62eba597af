"""Gradients in the FlashAttention form: the normalizer's dS, then the chain rule node by node.

SymPy differentiates the element-wise parts (the logit in its inputs, reduction bodies and
hoisted maps in their features); a small rule table covers what SymPy cannot see:

  normalizer  softmax   dS = P * (dP - D),  D = rowsum(dO * O)
              sum       dS = (dP - rowsum(P * dP)) / rowsum(x)
              none      dS = dP
              f(s)      dS = f'(x) * dP   (an f reading params is folded into the logit
                                               by derive, so it takes the `none` rule)
  reduction   R = sum_f body_f       d(input_f) += dR * d body_f / d input_f
              GEMM R = A . B         dA = dR @ B,   dB = dR^T @ A
  projection  P = X @ W              dX = dP @ W^T, dW = X^T dP
  lookup      y = T[idx]             dT[idx] += dy        (scatter-add)
Nothing flows through masks, comparisons, `//`, `%` or subscripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from . import normalizers
from .symbolic import POSITIONS, SIZES, Derivation, Lookup, Node, Reduction, S, Vec


class MissingRule(Exception):
    """A symbol the gradient cannot flow through: a bug in the derivation, named loudly."""


@dataclass
class Gradients:
    deriv: Derivation
    # d logit / d symbol, for every node symbol the logit uses
    dlogit: dict[sp.Symbol, sp.Expr] = field(default_factory=dict)
    # element-wise normalizers: f'(s)
    dnorm: sp.Expr | None = None
    # softmax(sink = e): d sink / d symbol, for every node symbol the sink uses
    dsink: dict[sp.Symbol, sp.Expr] = field(default_factory=dict)
    # Vec maps and reduction bodies: node name -> [(input symbol, d expr / d input)]
    partials: dict[str, list[tuple[sp.Symbol, sp.Expr]]] = field(default_factory=dict)

    def latex(self) -> str:
        """An amsmath align* block: every label, name and rule in LaTeX."""
        from .latex import render

        return render(self)

    def pretty(self, latex: bool = False) -> str:
        if latex:
            return self.latex()
        show = sp.sstr
        d = self.deriv
        lines = ["forward:", f"  x = {show(d.logit)}"]
        if d.mask is not None:
            lines.append(f"  allowed = {show(d.mask)}")
        for node in d.nodes:
            lines.append(f"  {_describe(node, show)}")
        norm = d.norm.value if d.norm_expr is None else f"f(s) = {show(d.norm_expr)}"
        if d.sink is not None:
            norm = f"softmax with sink = {show(d.sink)}"
        lines += [f"  weights = {norm} over allowed keys", "backward:",
                  f"  {normalizers.of(d).rule}"]
        if self.dnorm is not None:
            lines.append(f"  f'(s) = {show(self.dnorm)}")
        for symbol, expr in self.dlogit.items():
            lines.append(f"  dx/d{symbol} = {show(expr)}")
        for symbol, expr in self.dsink.items():
            lines.append(f"  dsink/d{symbol} = {show(expr)}")
        for name, items in self.partials.items():
            for symbol, expr in items:
                lines.append(f"  d{name}/d{symbol} = {show(expr)}")
        return "\n".join(lines)


def _describe(node: Node, show) -> str:  # type: ignore[no-untyped-def]
    if isinstance(node, Vec):
        what = {"input": node.name, "param": f"{node.param}{list(node.subscripts) or ''}",
                "proj": f"{node.expr} @ {node.param}", "map": show(node.expr)}[node.kind]
        return f"{node.symbol} = {what}   ({node.side.value} vector over {node.size})"
    if isinstance(node, Reduction):
        how = "GEMM" if node.gemm else node.side.value
        return f"{node.symbol} = sum_f {show(node.body)}   ({how})"
    return f"{node.symbol} = {node.array}[{', '.join(map(show, node.subscripts))}]"


def _inputs(expr: sp.Expr, deriv: Derivation) -> list[sp.Symbol]:
    """The node symbols `expr` depends on, in node order; an unknown symbol is a missing rule."""
    known = {n.symbol: n for n in deriv.nodes}
    passive = set(POSITIONS.values()) | set(SIZES.values()) | {S}
    for symbol in expr.free_symbols:
        if symbol not in known and symbol not in passive:
            raise MissingRule(f"no gradient rule for symbol '{symbol}' in {expr}")
    return [n.symbol for n in deriv.nodes if n.symbol in expr.free_symbols
            and _differentiable(n)]


def _differentiable(node: Node) -> bool:
    return not (isinstance(node, Lookup) and not node.is_param)


def derive_gradients(deriv: Derivation) -> Gradients:
    grads = Gradients(deriv)
    for symbol in _inputs(deriv.logit, deriv):
        grads.dlogit[symbol] = sp.diff(deriv.logit, symbol)
    if deriv.norm_expr is not None:
        grads.dnorm = sp.diff(deriv.norm_expr, S)
        if _inputs(deriv.norm_expr, deriv):  # derive() folds such normalizers into the logit
            raise MissingRule(f"the normalizer {deriv.norm_expr} reads nodes besides s")
    if deriv.sink is not None:
        grads.dsink = {s: sp.diff(deriv.sink, s) for s in _inputs(deriv.sink, deriv)}
    for node in deriv.nodes:
        expr = node.body if isinstance(node, Reduction) else (
            node.expr if isinstance(node, Vec) and node.kind == "map" else None)
        if expr is None or (isinstance(node, Reduction) and node.gemm):
            continue
        grads.partials[node.name] = [(s, sp.diff(expr, s)) for s in _inputs(expr, deriv)]
    return grads
