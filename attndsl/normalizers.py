"""Row normalizers as strategies: what each `normalize` kind means, in one place for every target.

A strategy states, as SymPy expressions over the symbols below, what a target computes; a
target maps the symbols to its own storage and prints the expressions with its table-driven
printer:

  accumulate  per allowed pair, the weight ACC of v_j in the row's sum acc = sum_j ACC_j v_j
  update      per allowed pair, the running state's new values, in X and ACC (sum: Z + X)
  rescale     softmax only (online): when a key tile raises the running max M to M_NEW, acc
              and L are first multiplied by it, so that ACC = exp(X - M) stays below 1
  finish  once per row, from the running state the forward folded over the allowed keys
          (softmax: the max M and L = sum exp(x - M); sum: Z = sum x): SCALE, the factor
          that turns the accumulated sum_j w_j v_j into the row's output, and SAVED
  P       the pair's weight, from its logit X and the row's saved state SAVED
  dS      the adjoint of the logit, from P, dP = dO . v_j and D = rowsum(dO * O)

How a target orders the fold (key by key, or a whole tile's max first, then its weights) is
its own business; what the state means and how it is updated is fixed here.

It also owns the rule text `show` and the generated code print, what the forward saves per row
(lse for softmax, the row sum z for `sum`, nothing otherwise) and the naive weights the proof
differentiates. A row with no allowed key saves lse = -inf (softmax) or z = 0 (sum); its pairs
are never evaluated. A `sum` row whose allowed logits add up to exactly 0 gets weight 0, as an
empty row does, on every target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sympy as sp

from .functions import SafeDiv
from .ir import NormKind
from .symbolic import Derivation, S

# '@' keeps them apart from every symbol a spec derives (spec names are identifiers)
X = sp.Symbol("@x", real=True)  # the pair's logit
SAVED = sp.Symbol("@saved", real=True)  # the row's saved state: lse or z
WEIGHT = sp.Symbol("@P", real=True)  # the pair's weight, once computed
DP = sp.Symbol("@dP", real=True)  # dO . v_j
DELTA = sp.Symbol("@D", real=True)  # rowsum(dO * O)
M = sp.Symbol("@M", real=True)  # softmax: the running max of the allowed logits (-inf: none)
L = sp.Symbol("@L", real=True)  # softmax: sum of exp(x - M) over the allowed keys
Z = sp.Symbol("@Z", real=True)  # sum: the sum of the allowed logits
SCALE = sp.Symbol("@scale", real=True)  # out = SCALE * sum_j w_j v_j
SINK = sp.Symbol("@sink", real=True)  # softmax(sink = e): the row's sink logit
ACC = sp.Symbol("@acc", real=True)  # the pair's accumulated weight, once computed
M_NEW = sp.Symbol("@m_new", real=True)  # softmax: the running max once a tile joined


@dataclass(frozen=True)
class Normalizer:
    """One row normalization; see the module docstring."""

    kind: NormKind
    rule: str  # the backward's rule, as `show` prints it
    saved: str | None  # what the forward saves per row: "lse", "z" or None
    weight: sp.Expr  # P in X and SAVED
    dscore: sp.Expr  # dS in WEIGHT, X, SAVED, DP and DELTA
    # a row's allowed logits (and its sink logit, softmax(sink = e)) -> their weights
    naive: Callable[[Sequence[sp.Expr], sp.Expr | None], list[sp.Expr]]
    accumulate: sp.Expr = X  # ACC in X (and M)
    running: tuple[sp.Symbol, ...] = ()  # the state the forward folds: (M, L), (Z,) or ()
    update: tuple[tuple[sp.Symbol, sp.Expr], ...] = ()  # (running symbol, its new value)
    rescale: sp.Expr | None = None  # online: the factor when M rises to M_NEW
    # SAVED of a row with no allowed key (None: nothing saved); the backward skips such rows
    empty: sp.Expr | None = None
    # SCALE and SAVED, in order after any intermediate (a target's local, see `local`)
    finish: tuple[tuple[sp.Symbol, sp.Expr], ...] = ((SCALE, sp.S.One),)
    # finish intermediates that only shift for stability, and what exact arithmetic (the proof)
    # takes instead: the result does not depend on them
    shifts: tuple[tuple[sp.Symbol, sp.Expr], ...] = ()

    @property
    def uses_delta(self) -> bool:
        """dS reads D = rowsum(dO * O): the backward computes it first."""
        return DELTA in self.dscore.free_symbols


def _nonzero(value: sp.Expr, by: sp.Symbol, otherwise: sp.Expr) -> sp.Expr:
    """`value` where `by` != 0, else `otherwise` (a row with no allowed key); a NaN `by` takes
    `value`, so a NaN row stays NaN. Quotients use SafeDiv (see functions.SafeDiv)."""
    return sp.Piecewise((value, sp.Ne(by, 0)), (otherwise, True))


def _softmax_naive(logits: Sequence[sp.Expr], sink: sp.Expr | None = None) -> list[sp.Expr]:
    z = sum((sp.exp(x) for x in logits), sp.S.Zero if sink is None else sp.exp(sink))
    return [sp.exp(x) / z for x in logits]


def _sum_naive(logits: Sequence[sp.Expr], sink: sp.Expr | None = None) -> list[sp.Expr]:
    z = sum(logits, sp.S.Zero)
    return [x / z for x in logits]


SOFTMAX = Normalizer(
    NormKind.SOFTMAX, "dS = P * (dP - D), D = rowsum(dO * O)", "lse",
    weight=sp.exp(X - SAVED), dscore=WEIGHT * (DP - DELTA), naive=_softmax_naive,
    accumulate=sp.exp(X - M), running=(M, L), update=((L, L + ACC),),
    rescale=sp.exp(M - M_NEW), empty=sp.S.NegativeInfinity,
    finish=((SCALE, SafeDiv(1, L)),
            (SAVED, _nonzero(M + sp.log(L), L, sp.S.NegativeInfinity))))
SUM = Normalizer(
    NormKind.SUM, "dS = (dP - rowsum(P * dP)) / rowsum(x)", "z",
    # rowsum(P * dP) = rowsum(dO * O) = D
    weight=SafeDiv(X, SAVED), dscore=SafeDiv(DP - DELTA, SAVED), naive=_sum_naive,
    running=(Z,), update=((Z, Z + X),), empty=sp.S.Zero,
    finish=((SCALE, SafeDiv(1, Z)), (SAVED, Z)))
NONE = Normalizer(NormKind.NONE, "dS = dP", None, weight=X, dscore=DP,
                  naive=lambda logits, sink=None: list(logits))
# softmax(sink = e): the sink is one more key, with no value. Its term joins the running
# (M, L) at the finish, so an empty row (M = -inf, L = 0) saves lse = sink and outputs 0; P and
# dS keep softmax's form (lse includes the sink), and d sink = -exp(sink - lse) * D per row.
M_SINK = sp.Symbol("@m_sink", real=True)  # max(M, SINK)
L_SINK = sp.Symbol("@l_sink", real=True)  # L rescaled to M_SINK, plus the sink's term
SOFTMAX_SINK = Normalizer(
    NormKind.SOFTMAX, SOFTMAX.rule + "; d sink = -exp(sink - lse) * D", "lse",
    weight=SOFTMAX.weight, dscore=SOFTMAX.dscore, naive=_softmax_naive,
    accumulate=SOFTMAX.accumulate, running=SOFTMAX.running, update=SOFTMAX.update,
    rescale=SOFTMAX.rescale, empty=SOFTMAX.empty,
    finish=((M_SINK, sp.Max(M, SINK)),
            (L_SINK, L * sp.exp(M - M_SINK) + sp.exp(SINK - M_SINK)),
            (SCALE, sp.exp(M - M_SINK) / L_SINK), (SAVED, M_SINK + sp.log(L_SINK))),
    shifts=((M_SINK, M),))
DSINK = -sp.exp(SINK - SAVED) * DELTA  # the adjoint of a row's sink logit
_BY_KIND = {n.kind: n for n in (SOFTMAX, SUM, NONE)}
ELEMENTWISE_RULE = "dS = f'(x) * dP"
RULES = {**{kind: n.rule for kind, n in _BY_KIND.items()}, NormKind.ELEMENTWISE: ELEMENTWISE_RULE}


def local(symbol: sp.Symbol) -> str:
    """The name a target gives an intermediate of `finish` (a local of its row loop)."""
    return symbol.name.lstrip("@")


def elementwise(f: sp.Expr) -> Normalizer:
    """P = f(x) per pair, no row state: dS = f'(x) * dP."""
    at_x = f.xreplace({S: X})
    return Normalizer(NormKind.ELEMENTWISE, ELEMENTWISE_RULE, None, weight=at_x,
                      dscore=sp.diff(at_x, X) * DP, accumulate=at_x,
                      naive=lambda logits, sink=None: [at_x.xreplace({X: x}) for x in logits])


def of(deriv: Derivation) -> Normalizer:
    """The strategy of a derivation's `normalize` clause."""
    if deriv.norm is NormKind.ELEMENTWISE:
        assert deriv.norm_expr is not None
        return elementwise(deriv.norm_expr)
    if deriv.sink is not None:
        return SOFTMAX_SINK
    return _BY_KIND[deriv.norm]
