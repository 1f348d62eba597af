"""Issue 12 item 4: the cpu target's linear path as GEMMs, the causal one in chunks of CHUNK
rows (S, z carried forward; U, u backward), against the NumPy reference: forward and every
gradient (params too), float64 tight and float32, sizes around and across chunk boundaries,
GQA, B = 2 with offsets where the path allows them, and the NaN policy of masked keys.

Every kernel is compiled once per module (tiny feature sizes; the chunk is 64 rows whatever
they are).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from attndsl.codegen.numba_cpu import CHUNK
from tests.cpu_helpers import compile_pairs

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("error::numba.core.errors.NumbaWarning")]

SPECS = {
    "causal_sum": """attention causal_sum {
    normalize sum
    mask      j <= i
    score     (elu(q) + 1) . (elu(k) + 1)
}""",
    "causal_none": """attention causal_none {
    normalize none
    mask      j <= i
    score     (elu(q) + 1) . (elu(k) + 1)
}""",
    "full_sum": """attention full_sum {
    normalize sum
    score     (elu(q) + 1) . (elu(k) + 1)
}""",
    "causal_param": """attention causal_param {
    param     W[d, d]
    normalize sum
    mask      j <= i
    score     (elu(q @ W) + 1) . (elu(k @ W) + 1)
}""",
}
CAUSAL = {"causal_sum", "causal_none", "causal_param"}
TOL = {np.float64: 1e-11, np.float32: 3e-5}  # relative to the largest reference value


@pytest.fixture(scope="module")
def kernels() -> dict[str, tuple[Any, Any]]:
    return compile_pairs(SPECS, lambda name, plan: plan.linear is not None
                         and plan.linear.causal == (name in CAUSAL))


def _inputs(name: str, n_q: int, n_k: int, dtype: type, B: int = 2, heads: int = 4,
            kv_heads: int = 2, d: int = 5, dv: int = 3, seed: int = 0) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed + n_q + 7 * n_k)
    q = rng.standard_normal((B, heads, n_q, d)).astype(dtype)
    k = rng.standard_normal((B, kv_heads, n_k, d)).astype(dtype)
    v = rng.standard_normal((B, kv_heads, n_k, dv)).astype(dtype)
    dout = rng.standard_normal((B, heads, n_q, dv)).astype(dtype)
    extra = {}
    if name == "causal_param":
        extra["W"] = (0.5 * rng.standard_normal((d, d))).astype(dtype)
    return q, k, v, dout, extra


def _compare(kernels: dict[str, tuple[Any, Any]], name: str, n_q: int, n_k: int, dtype: type,
             **kw: Any) -> None:
    cpu, ref = kernels[name]
    q, k, v, dout, extra = _inputs(name, n_q, n_k, dtype, **kw.pop("shape", {}))
    out, want = cpu(q, k, v, **extra, **kw), ref(q, k, v, **extra, **kw)
    tol = TOL[dtype] * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(out, want, rtol=0, atol=tol, err_msg=f"{name} out")
    got, grads = cpu.backward(q, k, v, dout, **extra, **kw), ref.backward(q, k, v, dout,
                                                                            **extra, **kw)
    assert set(got) == set(grads) == {"q", "k", "v", *extra}
    for g, w in grads.items():
        tol = TOL[dtype] * max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(got[g], w, rtol=0, atol=tol, err_msg=f"{name} d{g}")
    # a given out is trusted: the backward computes den itself, no forward run
    given = cpu.backward(q, k, v, dout, out=out, **extra, **kw)
    for g in grads:
        np.testing.assert_array_equal(given[g], got[g], err_msg=f"{name} d{g}, out given")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_item4_chunked_linear_matches_reference(kernels, name: str, n: int, dtype: type
                                                ) -> None:  # type: ignore[no-untyped-def]
    """Square calls around and across the 64-row chunks, GQA (4 heads on 2), B = 2."""
    _compare(kernels, name, n, n, dtype)


@pytest.mark.parametrize("n_q, n_k", [(130, 70), (70, 130), (65, 200), (200, 1)])
@pytest.mark.parametrize("name", ["causal_sum", "full_sum"])
def test_item4_chunked_linear_rows_differ_from_keys(kernels, name: str, n_q: int, n_k: int
                                                    ) -> None:  # type: ignore[no-untyped-def]
    """n_q != n_k: causal rows past the last key see every key (no diagonal chunk), keys past
    the last row are seen by none (their gradients 0)."""
    _compare(kernels, name, n_q, n_k, np.float64)


@pytest.mark.parametrize("name", ["causal_sum", "causal_param", "full_sum"])
def test_item4_chunked_linear_offsets(kernels, name: str) -> None:  # type: ignore[no-untyped-def]
    """B = 2 with per-batch offsets: equal ones under the causal mask (its requirement),
    any without a mask (positions do not enter the score)."""
    offsets = {"q_offset": np.array([3, 70]), "k_offset": np.array([3, 70])}
    if name == "full_sum":
        offsets["k_offset"] = np.array([0, 11])
    _compare(kernels, name, 131, 131, np.float64, **offsets)


def test_item4_chunked_linear_equal_heads_and_mqa(kernels) -> None:  # type: ignore[no-untyped-def]
    """heads == kv_heads (k's rows read at h) and one kv head for 3 query heads."""
    for heads, kv_heads in ((3, 3), (3, 1)):
        shape = {"heads": heads, "kv_heads": kv_heads, "d": 7, "dv": 9}
        _compare(kernels, "causal_sum", 150, 150, np.float64, shape=shape)


def test_item4_chunk_state_carried(kernels) -> None:  # type: ignore[no-untyped-def]
    """Rows in the fourth chunk see the first chunk's keys only through the carried state:
    changing v there moves them exactly as on the reference (a dropped or reset state would
    leave them, a state added twice double the move)."""
    assert CHUNK == 64
    cpu, ref = kernels["causal_sum"]
    q, k, v, _, _ = _inputs("causal_sum", 4 * CHUNK - 11, 4 * CHUNK - 11, np.float64)
    moved = v.copy()
    moved[:, :, :CHUNK] += 1.0
    late = slice(3 * CHUNK, None)
    got = (cpu(q, k, moved) - cpu(q, k, v))[:, :, late]
    want = (ref(q, k, moved) - ref(q, k, v))[:, :, late]
    assert np.abs(want).min() > 1e-3  # every late row moves
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    dout = np.zeros(q.shape[:3] + (v.shape[-1],))
    dout[:, :, late] = 1.0  # dv of the first chunk's keys: only through the carried U
    got_dv = cpu.backward(q, k, v, dout)["v"][:, :, :CHUNK]
    want_dv = ref.backward(q, k, v, dout)["v"][:, :, :CHUNK]
    assert np.abs(want_dv).min() > 1e-3
    np.testing.assert_allclose(got_dv, want_dv, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_item4_chunked_linear_nan_policy(kernels, dtype: type) -> None:  # type: ignore[no-untyped-def]
    """A NaN in v, k or q at a key or row inside a chunk reaches exactly the rows (and the
    gradients) that see it, as on the reference: the chunk's masked pairs (j > i) stay 0,
    never 0 * NaN."""
    cpu, ref = kernels["causal_sum"]
    n = 150
    for where in ("v", "k", "q"):
        q, k, v, dout, _ = _inputs("causal_sum", n, n, dtype)
        x = {"q": q, "k": k, "v": v}[where]
        x[0, 1, 70] = np.nan  # row or key 70: the second chunk, with rows 64..69 before it
        x[1, 0, 3, 0] = np.inf if where != "q" else np.nan
        with np.errstate(all="ignore"):
            results = [(kern(q, k, v), kern.backward(q, k, v, dout)) for kern in (cpu, ref)]
        (out, grads), (want, want_grads) = results
        tol = TOL[dtype] * 10
        for name, g, w in [("out", out, want)] + [(n_, grads[n_], want_grads[n_])
                                                 for n_ in want_grads]:
            assert np.array_equal(np.isnan(g), np.isnan(w)), (where, name)
            if name == "out":  # some rows see the NaN, the rows before it do not
                assert np.isnan(w).any() and np.isfinite(w[0, :, :70]).all(), where
            finite = np.isfinite(w)
            np.testing.assert_allclose(g[finite], w[finite], rtol=0,
                                       atol=tol * max(1.0, float(np.abs(w[finite]).max())),
                                       err_msg=f"{where}: {name}")


def test_item4_elu_without_where_bit_identical() -> None:
    """numpy_ops.elu / elu_grad (the linear path's phi and its derivative, in every call's
    prologue and epilogue) compute without np.where, which was ~20x slower, and in place: the
    same bits as the where forms, NaN, inf and signed zeros included, scalars and ints too.
    float32 elu is a vectorized loop of its own: within 3e-7 of expm1 (float64), and the
    same NaN, inf, zeros and signs."""
    from attndsl.runtime import numpy_ops as ops

    rng = np.random.default_rng(0)
    special = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45, 100.0, -100.0, 89.0, -89.0]
    for dtype in (np.float32, np.float64):
        x = np.concatenate([30 * rng.standard_normal(5000), special]).astype(dtype)
        x = x.reshape(1, 1, -1, 1, 1)  # the 5-D layout rows come in
        with np.errstate(all="ignore"):
            want = np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
            want_grad = np.where(x > 0, 1, np.exp(np.minimum(x, 0)))
            got, got_grad = ops.elu(x), ops.elu_grad(x)
        assert got.dtype == got_grad.dtype == dtype
        if dtype == np.float32:
            exact = np.where(x > 0, x, np.expm1(np.minimum(x, 0).astype(np.float64)))
            np.testing.assert_allclose(got, exact, rtol=3e-7, atol=0)
            assert np.all(got[x <= -0.5] < -0.39)  # exp(x) - 1 there: no cancellation
        else:
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
        np.testing.assert_array_equal(got_grad, want_grad)
    for value in (-1.5, 2, np.array([1, -2]), np.float32(-0.5)):
        np.testing.assert_array_equal(ops.elu(value),
                                      np.where(value > 0, value, np.expm1(np.minimum(value, 0))))
        np.testing.assert_array_equal(ops.elu_grad(value),
                                      np.where(value > 0, 1, np.exp(np.minimum(value, 0))))
