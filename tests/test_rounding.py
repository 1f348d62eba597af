"""Issue 8: `//` and `%` masks end to end (item 4), and floor/ceil/round (section 3) with T5's
relative-position buckets, on the numpy and cpu targets against direct NumPy computations.

The weights are read back through the output: with q = k = 0 and v = the identity, out[i, :]
is row i of the weights; with a table t[h, b] = b the log-ratio of two weights is a bucket.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import attndsl
from attndsl import functions as fn

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("numpy", "cpu")

# (mask, n_q, n_k, the mask in NumPy): the four masks of item 4, odd sizes, n_k - 4 = 5.
ITEM4_MASKS = [
    ("(i + 1) // 3 == (j + 1) // 3", 9, 9, lambda i, j, nk: (i + 1) // 3 == (j + 1) // 3),
    ("(i - 3) % 7 >= j % 7", 11, 13, lambda i, j, nk: (i - 3) % 7 >= j % 7),
    ("i % (n_k - 4) >= j % 3", 7, 9, lambda i, j, nk: i % (nk - 4) >= j % 3),
    ("i // (n_k - 4) == j // (n_k - 4)", 7, 9, lambda i, j, nk: i // (nk - 4) == j // (nk - 4)),
]


def weights_of(kernel: attndsl.Kernel, n_q: int, n_k: int, **extra: np.ndarray) -> np.ndarray:
    """The [heads, n_q, n_k] weights of a spec whose score is q . k, at q = k = 0."""
    heads = extra["table"].shape[0] if "table" in extra else 1
    q = np.zeros((1, heads, n_q, 4))
    k = np.zeros((1, heads, n_k, 4))
    v = np.broadcast_to(np.eye(n_k), (1, heads, n_k, n_k)).copy()
    return kernel(q, k, v, **extra)[0]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mask", ITEM4_MASKS, ids=[m[0] for m in ITEM4_MASKS])
def test_item4_floor_division_and_modulo_masks(mask: tuple, target: str) -> None:
    text, n_q, n_k, allowed = mask
    kernel = attndsl.compile(f"attention m {{\n score q . k\n mask {text}\n}}", target)
    i, j = np.arange(n_q)[:, None], np.arange(n_k)[None, :]
    m = allowed(i, j, n_k).astype(float)
    want = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    got = weights_of(kernel, n_q, n_k)[0]
    assert np.abs(got - want).max() < 1e-12, f"{text} on {target}"


def t5_bucket(relative_position: np.ndarray, num_buckets: int = 32,
              max_distance: int = 128) -> np.ndarray:
    """A NumPy port of T5's _relative_position_bucket (bidirectional=True), float32 like the
    original's `relative_position.float()`, truncation `.to(torch.long)` as astype."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int64) * num_buckets
    n = np.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    scaled = (np.log(np.maximum(n, 1).astype(np.float32) / max_exact)
              / np.float32(math.log(max_distance / max_exact)) * (num_buckets - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(is_small, n, large)


def test_t5_port_matches_published_buckets() -> None:
    """Spot values of T5's function, so the port itself is pinned."""
    rel = np.array([0, 1, 7, 8, 11, 12, 16, 32, 64, 127, 128, 300, -1, -8, -16, -300])
    assert t5_bucket(rel).tolist() == [0, 17, 23, 24, 24, 25, 26, 28, 30, 31, 31, 31, 1, 8,
                                       10, 15]


@pytest.mark.parametrize("target", TARGETS)
def test_t5_bucket_example_matches_t5_for_every_offset_up_to_300(target: str) -> None:
    kernel = attndsl.compile(ROOT / "examples" / "t5_bucket.attn", target)
    n = 301  # offsets j - i from -300 to 300
    table = np.tile(np.arange(32, dtype=np.float64), (2, 1))  # t[h, b] = b
    w = weights_of(kernel, n, n, table=table)
    # logit(i, j) = bucket(j - i), and bucket(0) = 0: log(w[i, j] / w[i, i]) = bucket
    got = np.rint(np.log(w / np.diagonal(w, axis1=1, axis2=2)[..., None])).astype(np.int64)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    assert np.array_equal(got[0], t5_bucket(j - i)) and np.array_equal(got[1], got[0])


def test_t5_bucket_example_verifies() -> None:
    report = attndsl.verify(ROOT / "examples" / "t5_bucket.attn", targets=("numpy", "cpu"))
    assert report.ok, str(report)


ROUNDING_SPEC = """attention r {
    param table[heads, 9]
    score q . k
    bias table[h, round(j / 2) + 1] + floor(q . k) * 0.5 + ceil(q . k / 3) - round(2 * q . k)
    mask ceil((i + 1) / 4) != floor(j / 5) + 1
}"""


@pytest.mark.parametrize("target", TARGETS)
def test_round_is_half_to_even_in_a_subscript(target: str) -> None:
    """round(j / 2) at the ties j = 1, 3, 5, 7, 9, 11: 0, 2, 2, 4, 4, 6 (Python, NumPy)."""
    spec = "attention r {\n param table[heads, 8]\n score q . k\n bias table[h, round(j / 2)]\n}"
    kernel = attndsl.compile(spec, target)
    table = np.arange(8, dtype=np.float64)[None]
    w = weights_of(kernel, 1, 13, table=table)[0, 0]
    got = np.rint(np.log(w / w[0])).astype(int)
    assert got.tolist() == [round(j / 2) for j in range(13)] == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4,
                                                                  5, 6, 6]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_floor_ceil_round_cpu_matches_numpy(dtype: type) -> None:
    """Roundings in subscripts, in the mask and in float math (gradient 0 through them)."""
    cpu, ref = attndsl.compile(ROUNDING_SPEC, "cpu"), attndsl.compile(ROUNDING_SPEC, "numpy")
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 15, 4)).astype(dtype) for _ in range(3))
    table = rng.standard_normal((2, 9))
    dout = rng.standard_normal((1, 2, 15, 4)).astype(dtype)
    tol = 1e-12 if dtype is np.float64 else 2e-5
    np.testing.assert_allclose(cpu(q, k, v, table=table), ref(q, k, v, table=table), atol=tol)
    g_cpu = cpu.backward(q, k, v, dout, table=table)
    g_ref = ref.backward(q, k, v, dout, table=table)
    for name in g_ref:
        np.testing.assert_allclose(g_cpu[name], g_ref[name], atol=10 * tol, err_msg=name)


def test_roundings_have_gradient_zero_and_verify() -> None:
    deriv = attndsl.derive(ROUNDING_SPEC)
    assert all(sp.diff(f(sp.Symbol("x", real=True)), sp.Symbol("x", real=True)) == 0
               for f in fn.ROUNDING)
    assert "Derivative" not in deriv.pretty()
    report = attndsl.verify(ROUNDING_SPEC)
    assert report.ok, str(report)


def test_round_evaluates_half_to_even_exactly() -> None:
    half = sp.Rational(1, 2)
    assert [fn.Round(x * half) for x in (-5, -3, -1, 1, 3, 5)] == [-2, -2, 0, 0, 2, 2]
    assert fn.Round(sp.Integer(3) + sp.Symbol("x", real=True)).args  # not pulled apart
    assert fn.Floor(sp.log(sp.Rational(5, 8)) * 3) == -2


def test_rounding_kinds_in_the_checker() -> None:
    attndsl.parse("attention t {\n param P[heads, 4]\n score q . k\n"
                  " bias P[h, floor(q . k) % 4]\n}")  # an integer: `%` and subscripts take it
    with pytest.raises(attndsl.SpecError, match="round\\(\\) needs a number"):
        attndsl.parse("attention t {\n score q . k\n bias round(i < j)\n}")


def test_a_nan_reaching_a_rounded_subscript_is_an_error_naming_the_array() -> None:
    spec = "attention t {\n param P[heads, 4]\n score q . k\n bias P[h, clamp(floor(q . k), 0, 3)]\n}"
    kernel = attndsl.compile(spec, "numpy")
    q = np.zeros((1, 1, 3, 4))
    q[0, 0, 1, 0] = np.nan
    with pytest.raises(ValueError, match="'P' is not finite"):
        kernel(q, np.ones((1, 1, 3, 4)), np.ones((1, 1, 3, 2)), P=np.zeros((1, 4)))


def test_item4_cpu_compiles_integer_max_of_modulo_and_a_float_comparison() -> None:
    """Found by the precedence table: SymPy cannot tell that i % (n_k - 4) is an integer (the
    divisor might be 0), so cpu printed fx.maximum of two ints, and `exp(j - i) < 2.5` in a
    mask printed fx.exp of an int: both failed Numba's typing. Now cpu equals numpy."""
    spec = """attention t {
        param P[heads, 8]
        score q . k
        bias P[h, max(i % (n_k - 4), j // (n_k - 4)) % 8]
        mask exp(j - i) < 2.5
    }"""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 9, 4)) for _ in range(3))
    P = rng.standard_normal((2, 8))
    outs = [attndsl.compile(spec, target)(q, k, v, P=P) for target in TARGETS]
    assert np.abs(outs[0] - outs[1]).max() < 1e-12


@pytest.mark.parametrize("target", TARGETS)
def test_item4_integer_power_with_a_negative_exponent_is_a_float(target: str) -> None:
    """`^` gives a float (LANGUAGE.md 3); NumPy refuses an integer array to a negative integer
    power, so the numpy target raised ValueError on 2 ^ (j - i)."""
    kernel = attndsl.compile("attention p {\n score q . k\n bias 2 ^ (j - i)\n"
                             " mask j <= i\n}", target)
    n = 7
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    logit = np.where(j <= i, 2.0 ** (j - i), -np.inf)
    want = np.exp(logit - logit.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    assert np.abs(weights_of(kernel, n, n)[0] - want).max() < 1e-12
