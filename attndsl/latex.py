"""The derivation as LaTeX (`attndsl show --latex`): one amsmath `align*` block.

Every line is LaTeX, labels included: node names become symbols with proper subscripts
(`slope_3` -> `\\mathrm{slope}_{3}`), never SymPy's reading of an underscore (`log_t_3` would
print as `log_{t 3}`), and the rule table is written in LaTeX too.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import sympy as sp

from .ir import NormKind
from .symbolic import POSITIONS, SIZES, Derivation, Lookup, Node, Reduction, S, Vec

if TYPE_CHECKING:
    from .grad import Gradients

RULES = {
    NormKind.SOFTMAX: r"P \circ (dP - D), \quad D = \operatorname{rowsum}(dO \circ O)",
    NormKind.SUM: r"\frac{dP - \operatorname{rowsum}(P \circ dP)}{\operatorname{rowsum}(x)}",
    NormKind.NONE: r"dP",
    NormKind.ELEMENTWISE: r"f'(x) \circ dP",
}
WEIGHTS = {
    NormKind.SOFTMAX: r"\operatorname{softmax}_{j}(x)",
    NormKind.SUM: r"x \,/\, \textstyle\sum_{j} x",
    NormKind.NONE: r"x",
    NormKind.ELEMENTWISE: r"f(x)",
}
SIZE_NAMES = {"d": "d", "dv": "d_{v}", "n_q": "n_{q}", "n_k": "n_{k}",
              "heads": r"\mathrm{heads}", "kv_heads": r"\mathrm{kv\_heads}"}


def ident(name: str) -> str:
    """A spec name as a LaTeX symbol: one letter or a Greek name as itself, else upright."""
    if len(name) == 1 or (name.isalpha() and sp.latex(sp.Symbol(name)).startswith("\\")):
        return sp.latex(sp.Symbol(name))
    return r"\mathrm{" + name.replace("_", r"\_") + "}"


def _base(node: Node) -> str:
    """The node's symbol without its feature index; n is its creation number."""
    n = re.search(r"\d*$", node.name).group()  # type: ignore[union-attr]
    if isinstance(node, Vec):
        return {"input": node.name, "param": f"{ident(node.param or '')}^{{({n})}}",
                "proj": f"p^{{({n})}}", "map": f"u^{{({n})}}"}[node.kind]
    if isinstance(node, Reduction):
        return f"r_{{{n}}}"
    return f"{ident(node.array)}_{{{n}}}"


def symbol_names(deriv: Derivation) -> dict[sp.Symbol, str]:
    names: dict[sp.Symbol, str] = {s: name for s, name in
                                   ((SIZES[k], v) for k, v in SIZE_NAMES.items())}
    names.update({s: k for k, s in POSITIONS.items()})
    names[S] = "s"
    for node in deriv.nodes:
        names[node.symbol] = _base(node) + ("_{f}" if isinstance(node, Vec) else "")
    return names


class Latex:
    def __init__(self, grads: Gradients) -> None:
        self.grads, self.deriv = grads, grads.deriv
        self.names = symbol_names(self.deriv)

    def show(self, e: sp.Basic) -> str:
        return sp.latex(e, symbol_names=self.names)

    def render(self) -> str:
        d, g = self.deriv, self.grads
        rows = [r"&\text{forward:}", f"x &= {self.show(d.logit)}"]
        if d.mask is not None:
            rows.append(rf"\text{{allowed}} &= {self.show(d.mask)}")
        rows += [self.node(n) for n in d.nodes]
        weights = WEIGHTS[d.norm]
        if d.norm_expr is not None:
            weights += rf", \quad f(s) = {self.show(d.norm_expr)}"
        if d.sink is not None:
            weights += rf", \quad \text{{sink}} = {self.show(d.sink)}"
        rows += [rf"\text{{weights}} &= {weights} && \text{{over allowed keys}}",
                 r"&\text{backward:}", f"dS &= {RULES[d.norm]}"]
        if d.sink is not None:
            rows.append(r"d\,\text{sink} &= -e^{\text{sink} - \mathrm{lse}} \, D")
            rows += [rf"\frac{{\partial\,\text{{sink}}}}{{\partial {self.names[s]}}} &= "
                     f"{self.show(e)}" for s, e in g.dsink.items()]
        if g.dnorm is not None:
            rows.append(f"f'(s) &= {self.show(g.dnorm)}")
        rows += [rf"\frac{{\partial x}}{{\partial {self.names[s]}}} &= {self.show(e)}"
                 for s, e in g.dlogit.items()]
        for name, items in g.partials.items():
            node = next(n for n in d.nodes if n.name == name)
            rows += [rf"\frac{{\partial {self.names[node.symbol]}}}{{\partial {self.names[s]}}}"
                     f" &= {self.show(e)}" for s, e in items]
        body = " \\\\\n".join(f"  {row}" for row in rows)
        return f"\\begin{{align*}}\n{body}\n\\end{{align*}}"

    def node(self, node: Node) -> str:
        me = self.names[node.symbol]
        if isinstance(node, Vec):
            return f"{me} &= {self.vec(node)} && {self.where(node)}"
        if isinstance(node, Reduction):
            how = "GEMM" if node.gemm else f"{node.side.value} reduction"
            return rf"{me} &= \sum_{{f}} {self.show(node.body)} && \text{{{how}}}"
        assert isinstance(node, Lookup)
        if not node.subscripts:
            return f"{me} &= {ident(node.array)}"
        subs = ", ".join(self.show(s) for s in node.subscripts)
        return rf"{me} &= {ident(node.array)}\left[{subs}\right]"

    def vec(self, node: Vec) -> str:
        if node.kind == "input":
            return r"q\left[b, h, i, f\right]" if node.name == "q" else r"k\left[b, g(h), j, f\right]"
        if node.kind == "param":
            subs = "".join(f"{self.show(s)}, " for s in node.subscripts)
            return rf"{ident(node.param or '')}\left[{subs}f\right]"
        if node.kind == "proj":
            x = _base(self.deriv.node(node.expr))  # type: ignore[arg-type]
            return rf"\sum_{{c}} {x}_{{c}} \, {ident(node.param or '')}_{{c,f}}"
        return self.show(node.expr)  # type: ignore[arg-type]

    def where(self, node: Vec) -> str:
        size = SIZE_NAMES.get(node.size, ident(node.size) if node.size else "")
        return rf"\text{{{node.side.value} vector over }} {size}"


def render(grads: Gradients) -> str:
    return Latex(grads).render()
