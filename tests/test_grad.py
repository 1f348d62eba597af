"""Gradients (attndsl/grad.py) and the local derivatives of the spec functions (functions.py).

Each custom function's `fdiff` is checked against a central finite difference of its
`elementary` form (exp/log/erf/Piecewise), away from kinks, and at the kinks against the
conventions LANGUAGE.md 3 fixes (PyTorch's): relu'(0) = 0, clamp passes the gradient on the
closed interval [lo, hi], max/min split a tie 1/2-1/2, abs'(0) = 0, elu' continuous at 0.
The generated NumPy namespace (runtime/numpy_ops.py) follows the same conventions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mpmath
import numpy as np
import pytest
import sympy as sp

import attndsl
from attndsl import functions as fn
from attndsl.grad import MissingRule, derive_gradients
from attndsl.ir import NormKind
from attndsl.normalizers import RULES
from attndsl.runtime import numpy_ops
from attndsl.symbolic import S, derive

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
x, lo, hi, y = sp.symbols("x lo hi y", real=True)
POINTS = [-2.3, -0.7, -0.05, 0.05, 0.4, 1.9]


def _value(expr: sp.Expr, env: dict[sp.Symbol, float]) -> float:
    """The elementary form at `env`, in 40-digit arithmetic."""
    f = sp.lambdify(list(env), fn.elementary(expr), modules="mpmath")
    with mpmath.workdps(40):
        return float(f(*(mpmath.mpf(v) for v in env.values())))


def _central(expr: sp.Expr, wrt: sp.Symbol, env: dict[sp.Symbol, float], h: float = 1e-7
             ) -> float:
    """A central difference in 40-digit arithmetic of the elementary form."""
    f = sp.lambdify(list(env), fn.elementary(expr), modules="mpmath")
    with mpmath.workdps(40):
        args = {s: mpmath.mpf(v) for s, v in env.items()}
        plus = f(*[args[s] + (h if s == wrt else 0) for s in env])
        minus = f(*[args[s] - (h if s == wrt else 0) for s in env])
        return float((plus - minus) / (2 * h))


UNARY = [fn.Sigmoid, fn.Softplus, fn.Relu, fn.Elu, fn.EluGrad, fn.Gelu, fn.GeluGrad]


@pytest.mark.parametrize("f", UNARY, ids=lambda f: f.__name__)
@pytest.mark.parametrize("at", POINTS)
def test_unary_derivative_matches_finite_difference(f: type, at: float) -> None:
    derivative = sp.diff(f(x), x)
    assert not derivative.has(sp.Derivative)
    want = _central(f(x), x, {x: at})
    got = _value(derivative, {x: at})
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (f.__name__, at)


@pytest.mark.parametrize("at", [(-2.0, -1.0, 1.0), (0.3, -1.0, 1.0), (2.0, -1.0, 1.0),
                                (0.1, -0.5, 0.25)])
def test_clamp_derivatives_match_finite_difference(at: tuple[float, float, float]) -> None:
    env = dict(zip((x, lo, hi), at))
    for wrt in (x, lo, hi):
        got = _value(sp.diff(fn.Clamp(x, lo, hi), wrt), env)
        assert got == pytest.approx(_central(fn.Clamp(x, lo, hi), wrt, env), abs=1e-9), wrt


def test_kink_conventions() -> None:
    # relu'(0) = 0 (PyTorch), also step(0) = 0
    assert _value(sp.diff(fn.Relu(x), x), {x: 0.0}) == 0
    assert float(numpy_ops.step(np.array(0.0))) == 0
    # clamp passes the gradient at both bounds (closed interval), not the bounds' gradients
    clamp = fn.Clamp(x, lo, hi)
    for at in (-1.0, 1.0):
        env = {x: at, lo: -1.0, hi: 1.0}
        assert _value(sp.diff(clamp, x), env) == 1
        assert _value(sp.diff(clamp, lo), env) == 0
        assert _value(sp.diff(clamp, hi), env) == 0
        assert float(numpy_ops.in_range(np.array(at), -1.0, 1.0)) == 1
    assert _value(sp.diff(clamp, x), {x: 1.5, lo: -1.0, hi: 1.0}) == 0
    assert _value(sp.diff(clamp, hi), {x: 1.5, lo: -1.0, hi: 1.0}) == 1
    assert _value(sp.diff(clamp, lo), {x: -1.5, lo: -1.0, hi: 1.0}) == 1
    # max/min: a tie splits the gradient 1/2-1/2
    for f in (sp.Max, sp.Min):
        dx, dy = sp.diff(f(x, y), x), sp.diff(f(x, y), y)
        assert dx.subs({x: 0.5, y: 0.5}) == sp.Rational(1, 2)
        assert dy.subs({x: 0.5, y: 0.5}) == sp.Rational(1, 2)
    assert float(numpy_ops.heaviside(np.array(0.0))) == 0.5
    # abs'(0) = sign(0) = 0
    assert sp.diff(sp.Abs(x), x).subs(x, 0) == 0
    assert float(numpy_ops.sign(np.array(0.0))) == 0
    # elu' is continuous at 0: 1 from both sides, and the NumPy form agrees
    d_elu = sp.diff(fn.Elu(x), x)
    assert _value(d_elu, {x: 0.0}) == 1
    assert _value(d_elu, {x: -1e-12}) == pytest.approx(1, abs=1e-11)
    assert float(numpy_ops.elu_grad(np.array(0.0))) == 1
    # elu'' (needed through elu_grad) has the jump of exp at 0: 0 from the right, 1 from the left
    assert _value(sp.diff(fn.EluGrad(x), x), {x: 1e-9}) == 0
    assert _value(sp.diff(fn.EluGrad(x), x), {x: -1e-9}) == pytest.approx(1, abs=1e-8)


@pytest.mark.parametrize("name", ["sigmoid", "softplus", "elu", "gelu", "relu"])
def test_numpy_ops_agree_with_sympy_elementary(name: str) -> None:
    f = {"sigmoid": fn.Sigmoid, "softplus": fn.Softplus, "elu": fn.Elu, "gelu": fn.Gelu,
         "relu": fn.Relu}[name]
    grad = getattr(numpy_ops, name + "_grad", None)
    for at in POINTS + [30.0, -30.0]:
        assert float(getattr(numpy_ops, name)(np.array(at))) == pytest.approx(
            _value(f(x), {x: at}), rel=1e-12, abs=1e-15)  # gelu(-30) underflows to 0
        if grad is not None:
            assert float(grad(np.array(at))) == pytest.approx(
                _value(sp.diff(f(x), x), {x: at}), rel=1e-12)


# ---- derive_gradients -------------------------------------------------------------------------


def test_gradients_of_bahdanau_name_every_partial() -> None:
    grads = attndsl.derive(EXAMPLES / "bahdanau.attn")
    deriv = grads.deriv
    (r,) = deriv.reductions
    assert list(grads.dlogit) == [r.symbol]
    assert grads.dlogit[r.symbol] == 1
    partials = dict(grads.partials[r.name])
    names = {deriv.node(s).name for s in partials}  # type: ignore[union-attr]
    assert names == {"w_v0", "proj2", "proj4"}
    w = next(v.symbol for v in deriv.vecs if v.kind == "param")
    proj2 = next(v.symbol for v in deriv.vecs if v.name == "proj2")
    proj4 = next(v.symbol for v in deriv.vecs if v.name == "proj4")
    assert sp.simplify(partials[w] - sp.tanh(proj2 + proj4)) == 0
    assert sp.simplify(partials[proj2] - w * (1 - sp.tanh(proj2 + proj4) ** 2)) == 0
    assert grads.dnorm is None


def test_gemm_reductions_have_no_partials_but_their_maps_do() -> None:
    grads = attndsl.derive(EXAMPLES / "linear.attn")
    gemm = grads.deriv.reductions[0]
    assert gemm.name not in grads.partials
    maps = [v for v in grads.deriv.vecs if v.kind == "map"]
    for m in maps:
        ((symbol, d),) = grads.partials[m.name]
        assert d == fn.EluGrad(symbol)


def test_cosine_partials_cover_the_scalar_param_and_row_norms() -> None:
    grads = attndsl.derive(EXAMPLES / "cosine.attn")
    names = {grads.deriv.node(s).name for s in grads.dlogit}  # type: ignore[union-attr]
    assert names == {"r2", "r3", "r4", "tau_5"}
    tau = next(lk.symbol for lk in grads.deriv.lookups)
    # Max(1/100, tau): the gradient flows to tau only above the floor (Heaviside)
    assert grads.dlogit[tau].has(sp.Heaviside)


def test_elementwise_normalizer_derivative() -> None:
    grads = attndsl.derive(EXAMPLES / "sigmoid.attn")
    assert grads.deriv.norm is NormKind.ELEMENTWISE
    assert grads.dnorm is not None
    n_k = next(s for s in grads.deriv.norm_expr.free_symbols if s != S)  # type: ignore[union-attr]
    want = fn.Sigmoid(S - sp.log(n_k)) * (1 - fn.Sigmoid(S - sp.log(n_k)))
    assert sp.simplify(grads.dnorm - want) == 0
    relu = attndsl.derive(EXAMPLES / "relu.attn")
    assert relu.dnorm is not None and relu.dnorm.has(fn.Step)


def test_index_lookups_get_no_gradient_param_lookups_do() -> None:
    doc = attndsl.derive(EXAMPLES / "document.attn")
    assert all(not lk.is_param for lk in doc.deriv.lookups)
    assert all(doc.deriv.node(s).name == "r2" for s in doc.dlogit)  # type: ignore[union-attr]
    alibi = attndsl.derive(EXAMPLES / "alibi.attn")
    slope = alibi.deriv.lookups[0].symbol
    i, j = sp.Symbol("i", integer=True, nonnegative=True), sp.Symbol("j", integer=True,
                                                                       nonnegative=True)
    assert alibi.dlogit[slope] == j - i


def test_every_normalizer_has_a_rule() -> None:
    assert set(RULES) == set(NormKind)


def test_missing_rule_names_the_symbol() -> None:
    deriv = derive(attndsl.load(EXAMPLES / "scaled_dot_product.attn"))
    mystery = sp.Symbol("mystery", real=True)
    broken = dataclasses.replace(deriv, logit=deriv.logit + mystery)
    with pytest.raises(MissingRule, match="'mystery'"):
        derive_gradients(broken)
    broken = dataclasses.replace(deriv, norm=NormKind.ELEMENTWISE,
                                 norm_expr=fn.Sigmoid(S) * sp.Symbol("stray", real=True))
    with pytest.raises(MissingRule, match="'stray'"):
        derive_gradients(broken)


def test_pretty_shows_the_rule_table_entry() -> None:
    text = attndsl.derive(EXAMPLES / "linear.attn").pretty()
    assert RULES[NormKind.SUM] in text
    assert "GEMM" in text
    assert "dvec2/dq = EluGrad(q)" in text.replace("_f", "")


# ---- item 1: a param gets its gradient from whichever clause reads it -----------------------

PARAM_SPECS = {
    # the spec: a param inside an element-wise normalizer got d sb = 0
    "normalize_issue": """attention sb {
    param sb[heads]
    score q . k
    normalize sigmoid(s + sb[h])
}""",
    "normalize_gqa": """attention sbg {
    heads 4
    kv_heads 2
    param sb[heads]
    param gamma
    score q . k
    mask j <= i + 2
    normalize relu(s + sb[h]) * gamma + softplus(s) * sb[h] ^ 2
}""",
    "every_clause": """attention every {
    heads 4
    kv_heads 2
    param w[d]
    param tau
    param slope[heads]
    param cap
    score sum(w * q * k)
    scale 1 / tau
    bias slope[h] * (j - i)
    softcap cap
    mask j <= i + 2
}""",
}
PARAM_VALUES = {"sb": [0.3, -0.4, 0.2, 0.1], "gamma": 1.3, "w": [0.8, -0.5, 1.1], "tau": 1.7,
                "slope": [0.25, -0.5, 0.125, 0.3], "cap": 2.5}


def _param_case(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """q, k, v, dout [1|2, H, 5 or 6, 3 or 4] (odd, GQA where the spec has it) and params."""
    spec = attndsl.parse(PARAM_SPECS[name])
    rng = np.random.default_rng(8)
    heads, kv = (spec.heads, spec.kv_heads) if spec.heads else (2, 2)
    shape = (1, heads, 6, 4) if name == "normalize_issue" else (2, heads, 5, 3)
    kv_shape = (shape[0], kv, 7 if shape[2] == 5 else 6, shape[3])
    arrays = {"q": rng.standard_normal(shape), "k": rng.standard_normal(kv_shape),
              "v": rng.standard_normal(kv_shape), "dout": rng.standard_normal(shape)}
    params = {}
    for p in spec.params:
        value = np.array(PARAM_VALUES[p.name], dtype=np.float64)
        params[p.name] = value[:heads] if p.dims == ("heads",) else value
    return arrays, params


@pytest.fixture(scope="module", params=["numpy", "cpu"])
def param_kernels(request: pytest.FixtureRequest) -> dict[str, object]:
    return {name: attndsl.compile(text, target=request.param)
            for name, text in PARAM_SPECS.items()}


@pytest.mark.parametrize("name", list(PARAM_SPECS))
def test_item1_param_gradients_match_finite_differences(param_kernels: dict, name: str) -> None:
    kernel = param_kernels[name]
    arrays, params = _param_case(name)
    q, k, v, dout = arrays["q"], arrays["k"], arrays["v"], arrays["dout"]
    grads = kernel.backward(q, k, v, dout, **params)

    def loss(pname: str, value: np.ndarray) -> float:
        return float(np.sum(kernel(q, k, v, **{**params, pname: value}) * dout))

    eps = 1e-6
    for pname, base in params.items():
        fd = np.zeros_like(base)
        for idx in np.ndindex(*base.shape):
            step = np.zeros_like(base)
            step[idx] = eps
            fd[idx] = (loss(pname, base + step) - loss(pname, base - step)) / (2 * eps)
        assert np.abs(fd).max() > 1e-3, (pname, "the check must see a gradient")
        np.testing.assert_allclose(grads[pname], fd, rtol=1e-6, atol=1e-7, err_msg=pname)


def test_item1_normalizer_reading_a_param_is_folded_into_the_logit() -> None:
    grads = attndsl.derive(PARAM_SPECS["normalize_issue"])
    sb = next(lk.symbol for lk in grads.deriv.lookups if lk.array == "sb")
    assert grads.deriv.norm is NormKind.NONE and grads.deriv.norm_expr is None
    assert sb in grads.dlogit
    # a normalizer of s and sizes alone keeps its own rule
    assert attndsl.derive(EXAMPLES / "sigmoid.attn").deriv.norm is NormKind.ELEMENTWISE
