"""The `xp` namespace of runtime/numpy_ops.py over NumPy object arrays of SymPy expressions.

verification.py runs the generated NumPy reference with it, at small sizes, to obtain the derived
gradients as exact SymPy expressions. Positions, masks and index arrays stay concrete integers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import sympy as sp

from .. import functions as fn
from . import numpy_ops as _numeric

inf = sp.oo
nan = sp.nan
pi = sp.pi

# Layout, lookups, scatters and reductions work unchanged on object arrays.
positions, kv_head_of = _numeric.positions, _numeric.kv_head_of
query_rows, key_rows, full, lookup = (_numeric.query_rows, _numeric.key_rows, _numeric.full,
                                      _numeric.lookup)
reduce, gemm = _numeric.reduce, _numeric.gemm
project = _numeric.project


def gemm_da(dr: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(dr[..., 0], b[:, :, 0, :, :])[:, :, :, None, :]


def gemm_db(dr: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.matmul(np.swapaxes(dr[..., 0], -1, -2), a[:, :, :, 0, :])[:, :, None, :, :]


def project_dx(dp: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.matmul(dp, w.T)


def project_dw(x: np.ndarray, dp: np.ndarray) -> np.ndarray:
    shape = np.broadcast_shapes(x.shape[:-1], dp.shape[:-1])
    xs = np.broadcast_to(x, shape + x.shape[-1:]).reshape(-1, x.shape[-1])
    ds = np.broadcast_to(dp, shape + dp.shape[-1:]).reshape(-1, dp.shape[-1])
    return xs.T @ ds
sum_to, group_heads, keysum, rowsum = (_numeric.sum_to, _numeric.group_heads, _numeric.keysum,
                                       _numeric.rowsum)
matmul, transpose = _numeric.matmul, _numeric.transpose
pair_matmul = np.matmul  # symbols are never NaN: the plain products


def chain(adjoint: np.ndarray, partial: np.ndarray) -> np.ndarray:
    return adjoint * partial


def _elementwise(f: Callable[..., sp.Basic]) -> Callable[..., np.ndarray]:
    vectorized = np.vectorize(f, otypes=[object])
    return lambda *args: vectorized(*args)


_SYMPIFY = np.frompyfunc(sp.sympify, 1, 1)


def to_float(x: object) -> object:
    """Exact: an integer base of a power becomes a SymPy Integer, so 2 ** (-h - 1) is a
    Rational (a NumPy integer to a negative integer power raises)."""
    return _SYMPIFY(x)


def rational(p: int, q: int) -> sp.Rational:
    return sp.Rational(p, q)


exp, log, sqrt, tanh, sin, cos = (_elementwise(f) for f in (sp.exp, sp.log, sp.sqrt, sp.tanh,
                                                            sp.sin, sp.cos))
sign, abs, floor = _elementwise(sp.sign), _elementwise(fn.Abs), _elementwise(fn.Floor)
ceil, round = _elementwise(fn.Ceil), _elementwise(fn.Round)
heaviside = _elementwise(sp.Heaviside)
sigmoid, softplus, relu, step = (_elementwise(f) for f in (fn.Sigmoid, fn.Softplus, fn.Relu,
                                                           fn.Step))
elu, elu_grad, gelu, gelu_grad = (_elementwise(f) for f in (fn.Elu, fn.EluGrad, fn.Gelu,
                                                            fn.GeluGrad))
clamp, in_range = _elementwise(fn.Clamp), _elementwise(fn.InRange)
norm, norm_grad = _elementwise(fn.Norm), _elementwise(fn.NormGrad)


def _concrete(*arrays: object) -> bool:
    return all(np.asarray(a).dtype != object for a in arrays)


def _relation(numeric: Callable[..., np.ndarray], symbolic: type) -> Callable[..., np.ndarray]:
    vectorized = np.vectorize(lambda a, b: symbolic(a, b), otypes=[object])

    def relation(a: object, b: object) -> np.ndarray:
        return numeric(a, b) if _concrete(a, b) else vectorized(a, b)

    return relation


less, less_equal = _relation(np.less, sp.Lt), _relation(np.less_equal, sp.Le)
greater, greater_equal = _relation(np.greater, sp.Gt), _relation(np.greater_equal, sp.Ge)
equal, not_equal = _relation(np.equal, sp.Eq), _relation(np.not_equal, sp.Ne)
logical_and = _relation(np.logical_and, sp.And)
logical_or = _relation(np.logical_or, sp.Or)
# Integer clamps of subscripts print as maximum/minimum: concrete operands stay integer arrays.
maximum, minimum = _relation(np.maximum, fn.Max), _relation(np.minimum, fn.Min)


def logical_not(a: object) -> np.ndarray:
    return np.logical_not(a) if _concrete(a) else np.vectorize(sp.Not, otypes=[object])(a)


def _pick(cond: object, a: object, b: object) -> object:
    cond = sp.sympify(cond)
    if cond == sp.true:
        return a
    if cond == sp.false:
        return b
    return sp.Piecewise((a, cond), (b, True))


def where(cond: object, a: object, b: object) -> np.ndarray:
    if _concrete(cond):
        return np.where(cond, a, b)
    return np.vectorize(_pick, otypes=[object])(cond, a, b)


def at_allowed(allowed: np.ndarray, term: np.ndarray, value: np.ndarray) -> np.ndarray:
    return _numeric.at_allowed(allowed, term, value, where=where)


def keymax(x: np.ndarray) -> np.ndarray:
    """Any constant row shift leaves softmax unchanged; the proof uses none."""
    return np.zeros(x.shape[:-2] + (1, x.shape[-1]), dtype=object)


def _is_zero(z: object) -> bool:
    return sp.sympify(z) == 0


def safe_div(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda a, c: sp.S.Zero if _is_zero(c) else a / c, otypes=[object])(x, z)


def log_sum(m: np.ndarray, l: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda a, c: -sp.oo if _is_zero(c) else a + sp.log(c),
                        otypes=[object])(m, l)


def zeros_like(x: np.ndarray) -> np.ndarray:
    return np.zeros(np.shape(x), dtype=object)


def as_grad(d: object, like: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.asarray(d, dtype=object), np.shape(like)).copy()


def scatter(shape: tuple[int, ...], subscripts: tuple[np.ndarray, ...], values: np.ndarray,
            vector: bool = False) -> np.ndarray:
    out = _numeric.scatter(shape, subscripts, np.asarray(values, dtype=object), vector)
    return np.asarray(out, dtype=object)
