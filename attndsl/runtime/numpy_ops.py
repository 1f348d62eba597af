"""The array operations generated NumPy references call (`xp.*`), on float NumPy arrays.

Layout: every value is broadcastable to [B, heads, n_q, n_k, features]; a query-row value has
n_k = 1, a key-row value n_q = 1, a scalar features = 1. verification.py runs the same generated code
with a SymPy implementation of this namespace (object arrays) to prove the gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numba import njit

from .cpu_intrinsics import FASTMATH, elu_f32

inf = np.inf
nan = np.nan  # SymPy's 1/0 in a `where` branch not taken
arange = np.arange
exp, log, sqrt, tanh, sin, cos, sign = np.exp, np.log, np.sqrt, np.tanh, np.sin, np.cos, np.sign
abs = np.abs
maximum, minimum, where, floor = np.maximum, np.minimum, np.where, np.floor
ceil, round = np.ceil, np.rint
less, less_equal, greater, greater_equal = np.less, np.less_equal, np.greater, np.greater_equal
equal, not_equal = np.equal, np.not_equal
logical_and, logical_or, logical_not = np.logical_and, np.logical_or, np.logical_not
pi = np.pi


def to_float(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def rational(p: int, q: int) -> float:
    return p / q


def heaviside(x: np.ndarray) -> np.ndarray:
    """d max(x, 0)/dx for max/min ties: 1/2 at 0, as PyTorch's maximum."""
    return np.heaviside(x, 0.5)


def step(x: np.ndarray) -> np.ndarray:
    # asarray: x may be a plain number (clamp(tau, -2, tau): step(tau - tau), folded to 0)
    return np.asarray(x > 0).astype(np.result_type(x, np.float32))


def in_range(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.asarray((x >= lo) & (x <= hi)).astype(np.result_type(x, np.float32))


PARALLEL_ELEMENTS = 1 << 20  # an array this large is computed in pieces on every thread
PIECE = 1 << 15  # elements of one piece: a few of its temporaries stay in a core's caches


def on_threads(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`f`, an element-wise function of one array, computed on attndsl's threads in pieces
    of the flat array when the array is large. NumPy's loops release the GIL, and the
    transcendental ones are not all vectorized (float32 expm1 is a libm call per element:
    the cpu target's prologue spent about 70 ms per `elu` of an 8 x 8192 x 64 array on one
    thread). Each element is computed alone, so the values are the same bit for bit. A small
    array, a scalar or the proof's object arrays go to `f` as they are."""

    @functools.wraps(f)
    def apply(x: Any) -> Any:
        if not (isinstance(x, np.ndarray) and x.dtype.kind == "f"
                and x.size >= PARALLEL_ELEMENTS):
            return f(x)
        from . import threads

        flat = np.ascontiguousarray(x).reshape(-1)
        first = f(flat[:PIECE])
        out = np.empty(flat.shape, first.dtype)
        out[:PIECE] = first

        caller = np.geterr()  # errstate is per thread: the helpers take the caller's

        def pieces(lo: int, hi: int) -> None:
            with np.errstate(**caller):
                for n in range(lo, hi):
                    a = PIECE * n
                    out[a:a + PIECE] = f(flat[a:a + PIECE])

        count = -(-flat.size // PIECE)  # the first piece is done: its dtype is the result's
        threads.run(lambda lo, hi: pieces(lo + 1, hi + 1), count - 1)
        return out.reshape(x.shape)

    return apply


@functools.cache
def _special() -> Any:
    """scipy.special, imported on first use: it takes 0.6 s, a third of a warm start, and
    only sigmoid and gelu need it."""
    from scipy import special

    return special


@on_threads
def sigmoid(x: np.ndarray) -> np.ndarray:
    return _special().expit(x)


@on_threads
def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0, x)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def _in_place(y: Any) -> dict[str, Any]:
    """`out=y` for a float array (one temporary fewer: at N x d each is a fresh mapping whose
    page faults cost more than the arithmetic), nothing for a scalar or an integer array."""
    return {"out": y} if isinstance(y, np.ndarray) and y.dtype.kind == "f" else {}


@on_threads
def elu(x: np.ndarray) -> np.ndarray:
    """where(x > 0, x, expm1(x)) (NaN, inf too). float64: NumPy's expm1, bit for bit, without
    np.where (its scattered mask made it ~20x slower than the arithmetic). float32: a
    vectorized loop (_elu_float32), within 3e-7 of expm1: NumPy's float32 expm1 is a libm
    call per element, and linear attention's feature maps spent ~40% of a causal forward +
    backward at N = 8192 in it."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim:
        flat = np.ascontiguousarray(x).reshape(-1)
        y = np.empty_like(flat)
        _elu_float32(flat, y)
        return y.reshape(x.shape)
    y = np.minimum(x, 0)
    y = np.expm1(y, **_in_place(y))
    y += np.maximum(x, 0)  # x + 0 = x above 0, 0 + expm1(x) = expm1(x) below
    return y


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
def _elu_float32(x, out):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """out = elu(x) for flat float32 arrays, element by element with cpu_intrinsics.elu_f32
    (it vectorizes; the cpu kernels' fx.elu computes the same bits)."""
    for p in range(np.uint64(x.size)):
        out[p] = elu_f32(x[p])


@on_threads
def elu_grad(x: np.ndarray) -> np.ndarray:
    """where(x > 0, 1, exp(x)), bit for bit: exp(min(x, 0)) is exactly 1 above 0."""
    y = np.minimum(x, 0)
    return np.exp(y, **_in_place(y))


@on_threads
def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + _special().erf(x / np.sqrt(2)))


@on_threads
def gelu_grad(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + _special().erf(x / np.sqrt(2))) + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)


def norm(r: np.ndarray) -> np.ndarray:
    """norm(u) from r = sum_f u_f^2."""
    return np.sqrt(r)


def norm_grad(r: np.ndarray) -> np.ndarray:
    """d sqrt(r)/dr, 0 at r = 0 so that norm'(0) = 0."""
    positive = r > 0
    return np.where(positive, 0.5 / np.sqrt(np.where(positive, r, 1)), 0)


def clamp(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, lo), hi)


# ---- layout ----


def positions(B: int, heads: int, n_q: int, n_k: int, q_offset: Any = 0, k_offset: Any = 0
              ) -> tuple[np.ndarray, ...]:
    """b, h, i, j as integer arrays on their own axis of the 5-D layout, then the offsets
    [B, 1, 1, 1, 1]: i = q_offset[b] + query row, j = k_offset[b] + key column."""
    q_off = np.broadcast_to(np.asarray(q_offset, np.int64), (B,)).reshape(B, 1, 1, 1, 1)
    k_off = np.broadcast_to(np.asarray(k_offset, np.int64), (B,)).reshape(B, 1, 1, 1, 1)
    return (np.arange(B).reshape(B, 1, 1, 1, 1), np.arange(heads).reshape(1, heads, 1, 1, 1),
            q_off + np.arange(n_q).reshape(1, 1, n_q, 1, 1),
            k_off + np.arange(n_k).reshape(1, 1, 1, n_k, 1), q_off, k_off)


def kv_head_of(heads: int, kv_heads: int) -> np.ndarray:
    """g(h) = h // (heads // kv_heads): the key/value head each query head reads."""
    return np.arange(heads) // (heads // kv_heads)


def query_rows(x: np.ndarray) -> np.ndarray:
    return x[:, :, :, None, :]


def key_rows(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    if g.size == x.shape[1]:  # one query head per key head: a view, not a copy of k
        return x[:, :, None, :, :]
    return x[:, g][:, :, None, :, :]


def full(x: np.ndarray | bool | float, shape: Sequence[int]) -> np.ndarray:
    return np.broadcast_to(x, tuple(shape))


def lookup(array: np.ndarray, name: str, subscripts: Sequence[np.ndarray],
           vector: bool = False, batched: bool = False) -> np.ndarray:
    """array[subscripts] with a ValueError naming the array when a subscript is out of range
    (`batched`: the first subscript is the batch axis b, which the spec does not write)."""
    subs = [_integers(s, name, axis) for axis, s in enumerate(subscripts)]
    if vector:  # a row of the array: drop the feature axis of the subscripts
        subs = [s[..., 0] if s.ndim == 5 else s for s in subs]
    for axis, s in enumerate(subs):
        size = array.shape[axis]
        if s.size and (s.min() < 0 or s.max() >= size):
            bad = s.min() if s.min() < 0 else s.max()
            raise ValueError(f"subscript {axis - batched} of '{name}' is out of range: got "
                             f"{int(bad)}, the array has size {size} on that axis")
    if not subs:
        return array
    return array[tuple(subs)]


def _integers(s: object, name: str, axis: int) -> np.ndarray:
    """A subscript as an integer array: floor/ceil/round give floats of integer values (SymPy
    integers in the proof); a NaN or infinite one is an error naming the array."""
    s = np.asarray(s)
    if s.dtype.kind in "iub":
        return s
    if s.dtype == object:
        try:
            return s.astype(np.int64)
        except TypeError:  # a symbolic subscript: the proof indexes with concrete ones only
            return s
    if not np.all(np.isfinite(s)):
        raise ValueError(f"subscript {axis} of '{name}' is not finite (a NaN or infinite "
                         "value reached floor, ceil or round)")
    return s.astype(np.int64)


def reduce(body: np.ndarray) -> np.ndarray:
    return np.sum(body, axis=-1, keepdims=True)


def gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_f a_f * b_f for query rows a [.., n_q, 1, F] and key rows b [.., 1, n_k, F]."""
    return np.matmul(a[:, :, :, 0, :], np.swapaxes(b[:, :, 0, :, :], -1, -2))[..., None]


def pair_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b where a holds pair weights or adjoints (exactly 0 for masked pairs and untaken
    `where` branches) and b rows: a zero term stays 0 even when b holds NaN or inf there.

    Finite b (the common case, an O(size) check): one matmul. Otherwise the finite entries of b
    by matmul, then each row of b with a NaN or inf added only where a is nonzero.
    """
    b = np.asarray(b)
    if b.dtype.kind != "f" or np.isfinite(b).all():
        return np.matmul(a, b)
    ok = np.isfinite(b)
    out = np.matmul(a, np.where(ok, b, 0))
    bad = np.where(ok, 0, b)
    rows = np.nonzero((~ok).any(axis=-1).reshape(-1, b.shape[-2]).any(axis=0))[0]
    with np.errstate(invalid="ignore"):
        for r in rows:  # one row of b at a time: [..., m, 1] * [..., 1, n]
            col, row = a[..., :, r:r + 1], bad[..., r:r + 1, :]
            out = out + np.where(col != 0, col * row, 0)
    return out


def gemm_da(dr: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pair_matmul(dr[..., 0], b[:, :, 0, :, :])[:, :, :, None, :]


def gemm_db(dr: np.ndarray, a: np.ndarray) -> np.ndarray:
    return pair_matmul(np.swapaxes(dr[..., 0], -1, -2), a[:, :, :, 0, :])[:, :, None, :, :]


def project(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.matmul(x, w)


def project_dx(dp: np.ndarray, w: np.ndarray) -> np.ndarray:
    return pair_matmul(dp, w.T)


def project_dw(x: np.ndarray, dp: np.ndarray) -> np.ndarray:
    """X^T dP summed over every row (a row whose dP is 0 adds nothing, even a NaN X row)."""
    shape = np.broadcast_shapes(x.shape[:-1], dp.shape[:-1])
    xs = np.broadcast_to(x, shape + x.shape[-1:]).reshape(-1, x.shape[-1])
    ds = np.broadcast_to(dp, shape + dp.shape[-1:]).reshape(-1, dp.shape[-1])
    return pair_matmul(ds.T, xs).T


def chain(adjoint: np.ndarray, partial: np.ndarray) -> np.ndarray:
    """adjoint * partial, 0 where the adjoint is 0: an untaken `where` branch or a masked pair
    may have an inf or NaN partial (0 * inf = NaN)."""
    with np.errstate(invalid="ignore"):
        product = adjoint * partial
    if np.asarray(partial).dtype.kind != "f" or np.isfinite(partial).all():
        return product
    return np.where(adjoint == 0, 0, product)


def at_allowed(allowed: np.ndarray, term: np.ndarray, value: np.ndarray, where=np.where
               ) -> np.ndarray:
    """A pair node's chain-rule term, 0 at pairs not allowed (its partial may be NaN there).

    A node without some axis of the pairs (`sum(where(c, k, k))` is `sum(k)`, a key row;
    `norm(wr / max(j - i, 0.5))` has no b or h) has its adjoint summed over that axis, allowed
    pairs only, already: masking it again would count it once per allowed row (or b, h)."""
    if np.shape(value)[:4] != np.shape(allowed)[:4]:
        return term
    return where(allowed, term, 0)


def sum_to(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Sum `x` over the axes `like` broadcasts along (the adjoint of broadcasting)."""
    x = np.asarray(x)
    like_shape = np.shape(like)
    while x.ndim > len(like_shape):
        x = np.asarray(x.sum(axis=0))
    axes = tuple(a for a, n in enumerate(like_shape) if n == 1 and x.shape[a] != 1)
    x = x.sum(axis=axes, keepdims=True) if axes else x
    shape = np.broadcast_shapes(x.shape, like_shape)
    if x.shape == shape:  # nothing to broadcast: x itself, writeable (a gradient users keep)
        return x
    # a partial free of the feature (d body_f / d wd_f = exp(q . k)): the same for every f
    return np.broadcast_to(x, shape)


def scatter(shape: Sequence[int], subscripts: Sequence[np.ndarray], values: np.ndarray,
            vector: bool = False) -> np.ndarray:
    """The adjoint of `lookup`: add each value at its subscripts."""
    out = np.zeros(tuple(shape), dtype=np.result_type(values, np.float32))
    subs = [_integers(s, "scatter", axis) for axis, s in enumerate(subscripts)]
    if vector:
        subs = [s[..., 0] if s.ndim == 5 else s for s in subs]
        lead = np.broadcast_shapes(*(s.shape for s in subs), values.shape[:-1])
        # a feature axis of 1: the same adjoint for every feature (d sum(w - q) / d w_f = 1)
        vals = np.broadcast_to(values, lead + tuple(shape[len(subs):]))
        subs = [np.broadcast_to(s, lead) for s in subs]
    else:
        lead = np.broadcast_shapes(*(s.shape for s in subs), values.shape)
        vals = np.broadcast_to(values, lead)
        subs = [np.broadcast_to(s, lead) for s in subs]
    if not subs:
        return out + (vals.reshape(-1, *shape).sum(axis=0) if shape else vals.sum())
    np.add.at(out, tuple(subs), vals)
    return out


def group_heads(x: np.ndarray, kv_heads: int) -> np.ndarray:
    """Sum query heads' contributions into their key/value head: [B, H, ...] -> [B, kv_heads, ...]."""
    B, heads = x.shape[:2]
    return x.reshape(B, kv_heads, heads // kv_heads, *x.shape[2:]).sum(axis=2)


# ---- normalizers ----


def rowsum(x: np.ndarray) -> np.ndarray:
    return np.sum(x, axis=-1, keepdims=True)


def safe_div(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x / z, and 0 where z == 0 (a row with no allowed key)."""
    zero = z == 0
    return np.where(zero, 0, x / np.where(zero, 1, z))


def log_sum(m: np.ndarray, l: np.ndarray) -> np.ndarray:
    """lse = m + log(l); -inf for an empty row (l == 0), NaN when l is (a NaN or +inf logit)."""
    return np.where(l == 0, -np.inf, m + np.log(np.where(l == 0, 1, l)))


def weights_from_lse(x: np.ndarray, allowed: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """Softmax weights [B, heads, n_q, n_k] from a given lse [B, heads, n_q] (backward's lse=):
    exp(x - lse) on allowed pairs, 0 elsewhere and in empty rows (lse = -inf)."""
    lse = np.asarray(lse)[..., None, None]
    empty = lse == -np.inf
    return np.where(allowed & ~empty, np.exp(x - np.where(empty, 0, lse)), 0)[..., 0]


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(a, b)


def transpose(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def keymax(x: np.ndarray) -> np.ndarray:
    """The max over keys (axis -2 of the 5-D layout) for a stable softmax; 0 for an empty row.

    NaN and +inf stay: exp(x - m) is then NaN for the row, so out and lse are NaN, as on cpu.
    """
    m = np.max(x, axis=-2, keepdims=True)
    return np.where(m == -np.inf, 0, m)


def keysum(x: np.ndarray) -> np.ndarray:
    return np.sum(x, axis=-2, keepdims=True)


def zeros_like(x: np.ndarray) -> np.ndarray:
    return np.zeros_like(x)


def as_grad(d: np.ndarray | int, like: np.ndarray) -> np.ndarray:
    """A param's gradient with the param's shape (0 when nothing flowed into it)."""
    return np.broadcast_to(np.asarray(d, dtype=np.result_type(like, np.float32)),
                           np.shape(like)).copy()
