"""The normalizer strategies prove themselves: P against the naive weights, and dS against the
derivative of the naive loss, for a row of symbolic logits (no kernel, no printer)."""

from __future__ import annotations

import pytest
import sympy as sp

import attndsl
from attndsl import normalizers
from attndsl.ir import NormKind
from attndsl.normalizers import DELTA, DP, SAVED, WEIGHT, X
from attndsl.symbolic import derive

ROW = 3  # keys in the row


def _strategy(normalize: str) -> normalizers.Normalizer:
    return normalizers.of(derive(attndsl.parse(
        f"attention a {{\n  score q . k\n  normalize {normalize}\n}}")))


NORMALIZE = ["softmax", "sum", "none", "sigmoid(s - 1)", "exp(s) * s"]


def _saved(norm: normalizers.Normalizer, x: list[sp.Symbol]) -> sp.Expr:
    if norm.saved == "lse":
        return sp.log(sum(sp.exp(e) for e in x))
    if norm.saved == "z":
        return sum(x, sp.S.Zero)
    return sp.S.Zero


def _generic(e: sp.Expr) -> sp.Expr:
    """The expression for a row whose sum is not 0 (`sum` guards that case; tested below)."""
    return e.rewrite(sp.Piecewise).xreplace({sp.Ne(SAVED, 0): sp.true})


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_weight_is_the_naive_weight(normalize: str) -> None:
    norm = _strategy(normalize)
    x = sp.symbols(f"x0:{ROW}", real=True)
    saved = _saved(norm, list(x))
    for xj, naive in zip(x, norm.naive(list(x))):
        assert sp.simplify(_generic(norm.weight).xreplace({X: xj, SAVED: saved}) - naive) == 0


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_dscore_is_the_derivative_of_the_naive_loss(normalize: str) -> None:
    """L = g * sum_j P_j v_j (one output feature): dL/dx_j = dS with dP = g v_j, D = g out."""
    norm = _strategy(normalize)
    x = sp.symbols(f"x0:{ROW}", real=True)
    v = sp.symbols(f"v0:{ROW}", real=True)
    g = sp.Symbol("g", real=True)
    weights = norm.naive(list(x))
    out = sum((p * vj for p, vj in zip(weights, v)), sp.S.Zero)
    saved = _saved(norm, list(x))
    for j, xj in enumerate(x):
        want = sp.diff(g * out, xj)
        got = _generic(norm.dscore).xreplace({WEIGHT: weights[j], X: xj, SAVED: saved,
                                              DP: g * v[j], DELTA: g * out})
        assert sp.simplify(got - want) == 0, (normalize, j)


def test_a_rule_for_every_kind() -> None:
    assert set(normalizers.RULES) == set(NormKind)
    assert _strategy("softmax").uses_delta and not _strategy("none").uses_delta


def test_a_sum_row_that_adds_up_to_zero_weighs_nothing() -> None:
    norm = _strategy("sum")
    at_zero = {X: sp.Integer(2), SAVED: sp.S.Zero, DP: sp.Integer(3), DELTA: sp.Integer(1)}
    assert norm.weight.xreplace(at_zero) == 0
    assert norm.dscore.xreplace(at_zero) == 0


def _running(norm: normalizers.Normalizer, x: list[sp.Expr]) -> tuple[dict, list[sp.Expr]]:
    """The running state a forward folds over a row, and each key's w_j in acc = sum w_j v_j."""
    if norm.running == (normalizers.M, normalizers.L):
        m = sp.Max(*x)
        return {normalizers.M: m, normalizers.L: sum(sp.exp(e - m) for e in x)}, \
            [sp.exp(e - m) for e in x]
    if norm.running == (normalizers.Z,):
        return {normalizers.Z: sum(x, sp.S.Zero)}, list(x)
    return {}, [norm.weight.xreplace({X: e}) for e in x]


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_finish_gives_the_naive_output_and_the_saved_state(normalize: str) -> None:
    norm = _strategy(normalize)
    x = [sp.Rational(3, 10), sp.Rational(-6, 5), sp.Integer(2)]
    v = sp.symbols(f"v0:{len(x)}", real=True)
    state, w = _running(norm, x)
    finish = {target: expr.xreplace(state) for target, expr in norm.finish}
    out = finish[normalizers.SCALE] * sum(wj * vj for wj, vj in zip(w, v))
    want = sum(p * vj for p, vj in zip(norm.naive(x), v))
    assert sp.simplify(out - want) == 0
    if norm.saved == "lse":
        # sympy does not see log(a / b) = log a - log b here: compare at 30 digits
        assert abs(sp.N(finish[SAVED] - sp.log(sum(sp.exp(e) for e in x)), 30)) < 1e-25
    elif norm.saved == "z":
        assert finish[SAVED] == sum(x)


def test_finish_of_an_empty_row() -> None:
    """No allowed key: out = 0 and lse = -inf (softmax), z = 0 (sum)."""
    empty = {normalizers.M: sp.S.NegativeInfinity, normalizers.L: sp.S.Zero,
             normalizers.Z: sp.S.Zero}
    softmax = {t: e.xreplace(empty) for t, e in normalizers.SOFTMAX.finish}
    assert softmax == {normalizers.SCALE: 0, SAVED: sp.S.NegativeInfinity}
    total = {t: e.xreplace(empty) for t, e in normalizers.SUM.finish}
    assert total == {normalizers.SCALE: 0, SAVED: 0}


# ---- softmax(sink = e) -----------------------------------------------------------------------


def _finish(norm: normalizers.Normalizer, state: dict) -> dict:
    """The finish's assignments in order: intermediates (m_sink, l_sink) feed the later ones."""
    values = dict(state)
    for target, expr in norm.finish:
        values[target] = expr.xreplace(values)
    return values


def test_sink_finish_gives_the_naive_output_and_lse() -> None:
    norm = _strategy("softmax(sink = 0.5)")
    assert norm is normalizers.SOFTMAX_SINK
    x = [sp.Rational(3, 10), sp.Rational(-6, 5), sp.Integer(2)]
    v = sp.symbols(f"v0:{len(x)}", real=True)
    for sink in (sp.Rational(1, 2), sp.Integer(5)):  # below and above the row's max
        state, w = _running(norm, x)
        done = _finish(norm, {**state, normalizers.SINK: sink})
        out = done[normalizers.SCALE] * sum(wj * vj for wj, vj in zip(w, v))
        want = sum(p * vj for p, vj in zip(norm.naive(x, sink), v))
        assert sp.simplify(out - want) == 0
        lse = sp.log(sp.exp(sink) + sum(sp.exp(e) for e in x))
        assert abs(sp.N(done[SAVED] - lse, 30)) < 1e-25
        # the proof's exact arithmetic shifts by nothing: the same output
        exact = dict(norm.shifts)
        unshifted = dict(state)
        for target, expr in norm.finish:
            unshifted[target] = exact.get(target, expr).xreplace(
                {**unshifted, normalizers.SINK: sink})
        assert sp.simplify(unshifted[normalizers.SCALE] * sum(wj * vj for wj, vj in zip(w, v))
                           - want) == 0


def test_sink_finish_of_an_empty_row_gives_out_0_and_lse_sink() -> None:
    empty = {normalizers.M: sp.S.NegativeInfinity, normalizers.L: sp.S.Zero,
             normalizers.SINK: sp.Rational(-3, 4)}
    done = _finish(normalizers.SOFTMAX_SINK, empty)
    assert done[normalizers.SCALE] == 0 and done[SAVED] == sp.Rational(-3, 4)


def test_dsink_is_the_derivative_of_the_naive_loss() -> None:
    """L = g * sum_j P_j v_j with P_j = exp(x_j) / (exp(sink) + sum exp(x)): dL/dsink."""
    x = sp.symbols(f"x0:{ROW}", real=True)
    v = sp.symbols(f"v0:{ROW}", real=True)
    g, sink = sp.symbols("g sink", real=True)
    weights = normalizers.SOFTMAX_SINK.naive(list(x), sink)
    out = sum((p * vj for p, vj in zip(weights, v)), sp.S.Zero)
    lse = sp.log(sp.exp(sink) + sum(sp.exp(e) for e in x))
    got = normalizers.DSINK.xreplace({normalizers.SINK: sink, SAVED: lse, DELTA: g * out})
    assert sp.simplify(got - sp.diff(g * out, sink)) == 0
    # P and dS keep softmax's form: lse includes the sink
    for j, xj in enumerate(x):
        dscore = normalizers.SOFTMAX_SINK.dscore.xreplace(
            {WEIGHT: weights[j], DP: g * v[j], DELTA: g * out})
        assert sp.simplify(dscore - sp.diff(g * out, xj)) == 0
        assert sp.simplify(normalizers.SOFTMAX_SINK.weight.xreplace({X: xj, SAVED: lse})
                           - weights[j]) == 0
