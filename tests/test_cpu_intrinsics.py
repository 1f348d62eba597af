"""Tests for attndsl.runtime.cpu_intrinsics: gemm, vectorized max, exp2, caching, BLAS threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from attndsl.runtime import cpu_intrinsics as ci

REPO = Path(__file__).resolve().parents[1]


@njit(cache=False)
def _gemm_2d(ta, tb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc):
    ci.gemm(ta, tb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc)


def _tile(flat: np.ndarray, off: int, rows: int, cols: int, ld: int) -> np.ndarray:
    """The row-major rows x cols tile of a flat array at off with row stride ld (a view)."""
    return np.lib.stride_tricks.as_strided(
        flat[off:], shape=(rows, cols), strides=(ld * flat.itemsize, flat.itemsize)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_gemm_transposes_offsets_odd_sizes(dtype, ta: bool, tb: bool) -> None:
    rng = np.random.default_rng(0)
    m, n, k = 13, 7, 11
    lda, ldb, ldc = 19, 17, 9  # padded rows: tiles live inside bigger flat buffers
    a_off, b_off, c_off = 5, 3, 4
    a_rows, a_cols = (k, m) if ta else (m, k)
    b_rows, b_cols = (n, k) if tb else (k, n)
    a = rng.standard_normal(a_off + a_rows * lda).astype(dtype)
    b = rng.standard_normal(b_off + b_rows * ldb).astype(dtype)
    c = rng.standard_normal(c_off + m * ldc).astype(dtype)
    opa = _tile(a, a_off, a_rows, a_cols, lda).astype(np.float64)
    opb = _tile(b, b_off, b_rows, b_cols, ldb).astype(np.float64)
    opa, opb = (opa.T if ta else opa), (opb.T if tb else opb)
    expect = c.astype(np.float64).copy()
    exp_tile = _tile(expect, c_off, m, n, ldc)
    exp_tile[...] = 0.75 * (opa @ opb) - 0.5 * exp_tile
    _gemm_2d(ta, tb, m, n, k, 0.75, a, a_off, lda, b, b_off, ldb, -0.5, c, c_off, ldc)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, expect, rtol=tol, atol=tol)  # padding untouched too


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_on_2d_arrays_with_row_offset(dtype) -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((40, 8)).astype(dtype)
    kt = rng.standard_normal((8, 50)).astype(dtype)
    s = np.zeros((16, 50), dtype)
    # Rows 24..39 of q times columns 10..39 of kt into s[:, 10:40] -- addressed in place.
    _gemm_2d(False, False, 16, 30, 8, 2.0, q, 24 * 8, 8, kt, 10, 50, 0.0, s, 10, 50)
    expect = np.zeros((16, 50))
    expect[:, 10:40] = 2.0 * q[24:].astype(np.float64) @ kt[:, 10:40]
    np.testing.assert_allclose(s, expect, rtol=1e-5, atol=1e-5)


def test_gemm_rejects_out_of_bounds_tiles() -> None:
    a = np.zeros(10, np.float32)
    c = np.zeros(9, np.float32)
    with pytest.raises(ValueError):
        _gemm_2d(False, False, 3, 3, 4, 1.0, a, 0, 4, a, 0, 3, 0.0, c, 0, 3)  # a needs 12
    with pytest.raises(ValueError):
        _gemm_2d(False, False, 3, 3, 2, 1.0, a, 0, 1, a, 0, 3, 0.0, c, 0, 3)  # lda < k


@njit(cache=False, fastmath=ci.FASTMATH)
def _row_max_rows(x, n_rows, n):
    out = np.empty(n_rows, x.dtype)
    for r in range(n_rows):
        out[r] = ci.row_max(x, r * n, n)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 31, 128, 133])
def test_row_max(dtype, n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n)).astype(dtype) - 10.0
    x[1, :] = -np.inf  # fully masked row
    x[2, : n // 2] = -np.inf  # partly masked row
    x[3, n - 1] = 5.0  # max in the vector tail
    got = _row_max_rows(x.ravel(), 5, n)
    np.testing.assert_array_equal(got, x.max(axis=1))
    assert ci.row_max(x.ravel(), 0, 0) == -np.inf


def test_row_max_uses_vector_max() -> None:
    x = np.zeros(64, np.float32)
    _row_max_rows(x, 2, 32)
    sig = next(s for s in _row_max_rows.signatures if str(s[0].dtype) == "float32")
    asm = _native_asm(_row_max_rows, sig)
    vector_max = [ln for ln in asm.splitlines() if "vmaxps" in ln and ("ymm" in ln or "zmm" in ln)]
    assert vector_max, "row_max did not vectorize"


@njit(cache=False, fastmath=ci.FASTMATH)
def _exp2_shift_sum(x, shift):
    return ci.exp2_shift_sum(x, 0, x.size, shift)


@njit(cache=False, fastmath=ci.FASTMATH)
def _exp2_scalar(y):
    return ci.exp2(y)


def test_exp2_float32_accuracy_and_masking() -> None:
    y = np.linspace(-125.0, 0.0, 300_001).astype(np.float32)
    x = y.copy()
    total = _exp2_shift_sum(x, np.float32(0.0))
    ref = np.exp2(y.astype(np.float64))
    assert x.dtype == np.float32
    assert np.max(np.abs(x - ref) / ref) <= 1.2e-7
    assert abs(total - ref.sum()) / ref.sum() < 1e-5
    z = np.array([-np.inf, -1e30, -126.5, -200.0, 0.0], np.float32)
    _exp2_shift_sum(z, np.float32(0.0))
    np.testing.assert_array_equal(z, [0.0, 0.0, 0.0, 0.0, 1.0])
    assert _exp2_scalar(np.float32(-1.0)) == np.float32(0.5)
    assert _exp2_scalar(np.float32(-np.inf)) == 0.0


def test_exp2_float32_whole_range_and_nan_payloads() -> None:
    # vectorized under the kernels' fast-math flags ('reassoc' would fold a (y + magic) - magic
    # rounding to y) and as a scalar: the same values over exp2's whole range
    y = np.linspace(-126.0, 127.0, 400_001).astype(np.float32)
    x = y.copy()
    _exp2_shift_sum(x, np.float32(0.0))
    ref = np.exp2(y.astype(np.float64))
    assert np.max(np.abs(x - ref) / ref) <= 1.2e-7
    assert all(_exp2_scalar(y[i]) == x[i] for i in range(0, y.size, 9973))
    # a NaN whatever its payload (the payload's low bits must not move 2**n's exponent)
    payloads = np.array([0x7FC00001, 0x7FC001FF, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], np.uint32)
    nans = payloads.view(np.float32)
    row = np.concatenate([nans, np.zeros(11, np.float32)])  # 16: the vector loop, no tail
    assert np.isnan(_exp2_shift_sum(row, np.float32(0.0)))
    assert np.isnan(row[:5]).all() and (row[5:] == 1.0).all()
    assert all(np.isnan(_exp2_scalar(v)) for v in nans)


def _native_asm(dispatcher, sig: tuple) -> str:
    """Assembly of the compiled functions for sig, minus the CPython wrapper (boxes to double)."""
    asm = dispatcher.inspect_asm(sig)
    funcs = asm.split("\t.type\t")[1:]
    return "\n".join(f for f in funcs if not f.startswith("_ZN7cpython"))


def test_exp2_float32_stays_float32() -> None:
    x = np.zeros(8, np.float32)
    _exp2_shift_sum(x, np.float32(0.0))
    sig = next(s for s in _exp2_shift_sum.signatures if str(s[0].dtype) == "float32")
    asm = _native_asm(_exp2_shift_sum, sig)
    assert "vcvtps2pd" not in asm and "vcvtss2sd" not in asm
    assert "vfmadd" in asm and ("ymm" in asm or "zmm" in asm)


def test_exp2_float64_accuracy() -> None:
    y = np.concatenate([np.linspace(-1000.0, 0.0, 100_001), [-np.inf]])
    x = y.copy()
    _exp2_shift_sum(x, 0.0)
    ref = np.exp2(y)
    ok = ref > 0
    assert np.max(np.abs(x[ok] - ref[ok]) / ref[ok]) < 1e-10
    assert x[-1] == 0.0
    assert _exp2_scalar(-3.0) == pytest.approx(0.125, rel=1e-15)


# The launcher's passes split their units (panels, blocks, rows) into tasks of _PASS_BYTES or
# more: at these sizes one task, unless the test makes every unit a task of its own (run on two
# threads, each writing its own flag)
PASS_SPLITS = pytest.mark.parametrize("split", [False, True], ids=["one_task", "unit_tasks"])


@pytest.fixture
def pass_split(request, monkeypatch):  # type: ignore[no-untyped-def]
    import numba

    if request.node.callspec.params.get("split"):
        monkeypatch.setattr(ci, "_PASS_BYTES", 1)
        old = numba.get_num_threads()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        yield
        numba.set_num_threads(old)
    else:
        yield


@PASS_SPLITS
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: t.__name__)
def test_transposed_rows_copies_and_checks_finiteness(dtype, split: bool, pass_split) -> None:
    """The launcher's key transpose: exact, for key counts around the 64-key block, and its
    finiteness flag catches a NaN, +inf or -inf anywhere (first element, last of a partial
    block), which sends the kernel down its careful path."""
    rng = np.random.default_rng(0)
    for n in (1, 63, 64, 65, 131):
        x = rng.standard_normal((2, 3, n, 5)).astype(dtype)
        xt = np.empty(np.swapaxes(x, 2, 3).shape, dtype)
        finite = ci.transposed_rows(x, xt)
        assert finite and xt.flags.c_contiguous and xt.dtype == dtype
        np.testing.assert_array_equal(xt, np.swapaxes(x, 2, 3))
        for where, value in (((0, 0, 0, 0), np.nan), ((1, 2, n - 1, 4), np.inf),
                             ((1, 0, n // 2, 2), -np.inf)):
            y = x.copy()
            y[where] = value
            finite = ci.transposed_rows(y, yt := np.empty_like(xt))
            assert not finite
            np.testing.assert_array_equal(yt, np.swapaxes(y, 2, 3))


@PASS_SPLITS
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: t.__name__)
def test_key_and_value_panels_copy_pad_and_check(dtype, split: bool, pass_split) -> None:
    """key_panels: panel p holds keys p*16 .. p*16+15 as columns, zeros past the last key, and
    its finiteness flag catches a NaN or inf in any key; value_panels: panel p holds columns
    p*16 .. p*16+15 of every row."""
    rng = np.random.default_rng(1)
    for n in (1, 15, 16, 17, 131):
        x = rng.standard_normal((2, 3, n, 5)).astype(dtype)
        panels = -(-n // ci.PANEL)
        out = np.full((2, 3, panels, 5, ci.PANEL), np.nan, dtype)
        assert ci.key_panels(x, out)
        padded = np.zeros((2, 3, panels * ci.PANEL, 5), dtype)
        padded[:, :, :n] = x
        want = padded.reshape(2, 3, panels, ci.PANEL, 5).transpose(0, 1, 2, 4, 3)
        np.testing.assert_array_equal(out, want)
        for where, value in (((0, 0, 0, 0), np.nan), ((1, 2, n - 1, 4), -np.inf)):
            y = x.copy()
            y[where] = value
            assert not ci.key_panels(y, np.empty_like(out))
    v = rng.standard_normal((2, 3, 37, 32)).astype(dtype)
    vp = np.empty((2, 3, 2, 37, ci.PANEL), dtype)
    ci.value_panels(v, vp)
    np.testing.assert_array_equal(vp, v.reshape(2, 3, 37, 2, ci.PANEL).transpose(0, 1, 3, 2, 4))


@PASS_SPLITS
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: t.__name__)
def test_finite_everywhere_and_row_dots(dtype, split: bool, pass_split) -> None:
    """finite_everywhere sees a NaN, +inf or -inf at the first, a middle and the last element
    (and nothing else: huge finite values pass); row_dots is (a * b).sum(-1) in a's dtype."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 37, 5)).astype(dtype)
    x[0, 0, 0, 0] = np.finfo(dtype).max
    assert ci.finite_everywhere(x)
    for where in ((0, 0, 0, 0), (1, 1, 18, 2), (1, 2, 36, 4)):
        for value in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[where] = value
            assert not ci.finite_everywhere(y)
    a, b = (rng.standard_normal((2, 3, 37, 20)).astype(dtype) for _ in range(2))
    d = ci.row_dots(a, b)
    assert d.dtype == dtype and d.shape == (2, 3, 37)
    np.testing.assert_allclose(d, (a.astype(np.float64) * b).sum(-1),
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: t.__name__)
@pytest.mark.parametrize("accumulate", [False, True])
def test_micro_gemm_every_row_count_panel_and_offset(dtype, accumulate: bool) -> None:
    """C (+)= alpha A @ B by the micro-kernel: every row count 0..14 (whole 6-row blocks and
    each tail of 1..5 rows), column counts within, at and past a panel (the last panel is
    written whole, from B's zero padding), k = 0, 1 and 70, tiles at offsets inside bigger
    buffers, nothing written outside the tile; A as stored and transposed (a_step); B as
    packed keys (key_panels) and as a row-major matrix read in place."""
    rng = np.random.default_rng(2)
    tol = 1e-5 if dtype == np.float32 else 1e-13

    def run(m: int, wide: int, args: tuple, b_tile: np.ndarray, alpha: float) -> None:
        ldc, c_off = wide + 5, 3
        c0 = rng.standard_normal(c_off + m * ldc + 4).astype(dtype)
        for a, a_off, lda, a_step, A in operands:
            c = c0.copy()
            ci.micro_gemm(m, *args[:1], k, alpha, a, a_off, lda, a_step, *args[1:], accumulate,
                          c, c_off, ldc)
            want = c0.copy()
            tile = _tile(want, c_off, m, wide, ldc)
            tile[:] = tile * accumulate + alpha * A @ b_tile
            np.testing.assert_allclose(c, want, rtol=tol, atol=tol)  # outside: untouched

    for m in range(15):
        for n, k in ((1, 70), (16, 1), (17, 0), (40, 70)):
            # A as stored (rows k + 3 apart) and transposed (A^T stored, rows m + 2 apart)
            lda, a_off, ldt = k + 3, 7, m + 2
            a = rng.standard_normal(a_off + m * lda + 2).astype(dtype)
            at = rng.standard_normal(a_off + k * ldt + 2).astype(dtype)
            operands = [(a, a_off, lda, 1, _tile(a, a_off, m, k, lda)),
                        (at, a_off, 1, ldt, _tile(at, a_off, k, m, ldt).T)]
            # the keys of the second of two heads, packed: C = alpha A @ keys^T, zero-padded
            keys = rng.standard_normal((1, 2, n, k)).astype(dtype)
            panels = -(-n // ci.PANEL)
            kp = np.empty((1, 2, panels, k, ci.PANEL), dtype)
            ci.key_panels(keys, kp)
            padded = np.zeros((panels * ci.PANEL, k), dtype)
            padded[:n] = keys[0, 1]
            run(m, panels * ci.PANEL, (n, kp, panels * k * ci.PANEL, ci.PANEL, k * ci.PANEL),
                padded.T, 0.5)
            # a row-major B (row stride 2 PANEL + 1) read in place, PANEL columns at a time
            ldb = 2 * ci.PANEL + 1
            b = rng.standard_normal(2 + k * ldb).astype(dtype)
            run(m, 2 * ci.PANEL, (2 * ci.PANEL, b, 2, ldb, ci.PANEL),
                _tile(b, 2, k, 2 * ci.PANEL, ldb), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: t.__name__)
def test_micro_gemm_band_computes_each_strips_run(dtype) -> None:
    """micro_gemm_band on runs drawn at random (empty ones, whole rows, every row count 1..20):
    over columns (depth False) every row's run of C matches alpha A @ B and nothing outside
    its strip's panels is written; over the sum (depth True, A zero outside each row's run)
    every column of C matches, accumulated or not, also with a strip whose runs are all empty
    (its C is then 0, or left as it was when accumulating); per = PANEL: one run per panel of
    C's rows, A read transposed (the backward's P^T @ dO). band_panels gives those runs."""
    rng = np.random.default_rng(5)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    P = ci.PANEL
    for m in range(1, 21):
        n, k = int(rng.integers(1, 3 * P)), int(rng.integers(1, 40))
        wide = -(-n // P) * P
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, wide)).astype(dtype)
        lo = rng.integers(0, n + 1, m)
        hi = np.minimum(lo + rng.integers(0, n + 1, m), n)
        hi[rng.random(m) < 0.2] = 0  # some empty runs
        c = np.full((m, wide), 7.0, dtype)
        ci.micro_gemm_band(m, n, k, 0.5, a.ravel(), 0, k, 1, b.ravel(), 0, wide, P, False,
                           c.ravel(), 0, wide, lo, hi, 1, False)
        want = 0.5 * a @ b
        for s0 in range(0, m, ci.MICRO_ROWS):  # a strip: its runs' union in whole panels
            rows = range(s0, min(m, s0 + ci.MICRO_ROWS))
            runs = [(lo[r], hi[r]) for r in rows if lo[r] < hi[r]]
            p0 = min(r[0] for r in runs) // P * P if runs else wide
            p1 = -(-max(r[1] for r in runs) // P) * P if runs else wide
            np.testing.assert_allclose(c[rows.start:rows.stop, p0:p1],
                                       want[rows.start:rows.stop, p0:p1], rtol=tol, atol=tol)
            assert (c[rows.start:rows.stop, :p0] == 7).all()
            assert (c[rows.start:rows.stop, p1:] == 7).all()
        klo = rng.integers(0, k + 1, m)
        khi = np.minimum(klo + rng.integers(0, k + 1, m), k)
        if m % 2:  # the first strip's runs all empty
            khi[:ci.MICRO_ROWS] = 0
        masked = a.copy()
        for r in range(m):
            masked[r, :klo[r]] = 0
            masked[r, max(khi[r], klo[r]):] = 0
            if khi[r] <= klo[r]:
                masked[r] = 0
        for accumulate in (False, True):
            c0 = rng.standard_normal((m, wide)).astype(dtype)
            c = c0.copy()
            ci.micro_gemm_band(m, n, k, 1.5, masked.ravel(), 0, k, 1, b.ravel(), 0, wide, P,
                               accumulate, c.ravel(), 0, wide, klo, khi, 1, True)
            np.testing.assert_allclose(c, 1.5 * masked @ b + c0 * accumulate, rtol=tol,
                                       atol=tol)
        # the transposed product: C's rows are keys, A = P^T read in place (lda 1), one run
        # of query rows per panel of keys, from band_panels over P's rows
        keys, queries = m + 11, k
        q_lo = rng.integers(0, keys + 1, queries)
        q_hi = np.minimum(q_lo + rng.integers(0, keys + 1, queries), keys)
        p_lo = np.empty(-(-keys // P), np.int64)
        p_hi = np.empty_like(p_lo)
        ci.band_panels(q_lo, q_hi, queries, keys, p_lo, p_hi)
        weights = rng.standard_normal((queries, keys)).astype(dtype)
        for r in range(queries):
            weights[r, :q_lo[r]] = 0
            weights[r, q_hi[r]:] = 0
        for p in range(len(p_lo)):
            touched = [r for r in range(queries) if q_lo[r] < q_hi[r]
                       and q_lo[r] < (p + 1) * P and q_hi[r] > p * P]
            assert (p_lo[p], p_hi[p]) == ((touched[0], touched[-1] + 1) if touched
                                          else (queries, 0))
        bq = rng.standard_normal((queries, wide)).astype(dtype)
        c0 = rng.standard_normal((keys, wide)).astype(dtype)
        c = c0.copy()
        ci.micro_gemm_band(keys, n, queries, 1.0, weights.ravel(), 0, 1, keys, bq.ravel(), 0,
                           wide, P, True, c.ravel(), 0, wide, p_lo, p_hi, P, True)
        np.testing.assert_allclose(c, weights.T @ bq + c0, rtol=tol, atol=tol)


def test_single_threaded_blas_restores_thread_count() -> None:
    before = ci.blas_num_threads()
    if before is None:
        pytest.skip("SciPy's BLAS is not OpenBLAS")
    with ci.single_threaded_blas():
        assert ci.blas_num_threads() == 1
    assert ci.blas_num_threads() == before


def test_cpu_features_prefer_512() -> None:
    feats = ci.cpu_features_prefer_512()
    assert feats.endswith("-prefer-256-bit")
    assert all(f[0] in "+-" for f in feats.split(","))


_CACHED_MODULE = """
import numpy as np
from numba import njit, prange
from attndsl.runtime.cpu_intrinsics import FASTMATH, gemm_unchecked, row_max

@njit(cache=True, parallel=True, fastmath=FASTMATH)
def tiles(a, b, c, nt):
    for t in prange(nt):  # one 4x4 tile of C per work item, like a kernel's query tiles
        gemm_unchecked(False, False, 4, 4, 4, 1.0, a, 16 * t, 4, b, 0, 4, 0.0, c, 16 * t, 4)
        c[16 * t] = row_max(c, 16 * t, 16)
"""

_CACHED_DRIVER = """
import sys, warnings
import numpy as np
warnings.simplefilter("error")  # NumbaWarning "cannot cache ... dynamic globals" -> failure
sys.path.insert(0, sys.argv[1])
import cached_kernel as m
rng = np.random.default_rng(0)
a = rng.standard_normal(48).astype(np.float32)
b = rng.standard_normal(16).astype(np.float32)
c = np.zeros(48, np.float32)
m.tiles(a, b, c, 3)
ref = (a.reshape(3, 4, 4) @ b.reshape(4, 4)).reshape(3, 16)
ref[:, 0] = ref.max(axis=1)
assert np.allclose(c.reshape(3, 16), ref, atol=1e-5), (c, ref)
st = m.tiles.stats
print("hits", sum(st.cache_hits.values()), "misses", sum(st.cache_misses.values()))
"""


def test_gemm_kernel_loads_from_cache_in_new_process(tmp_path: Path) -> None:
    (tmp_path / "cached_kernel.py").write_text(textwrap.dedent(_CACHED_MODULE))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("NUMBA_CPU_FEATURES", None)
    runs = []
    # The CPU feature string is part of Numba's cache key: the 512-bit variant is compiled once
    # more, then both variants load from the same cache.
    for prefer_512 in ("0", "0", "1", "1", "0"):
        proc = subprocess.run(
            [sys.executable, "-c", _CACHED_DRIVER, str(tmp_path)],
            env=dict(env, **{ci.PREFER_512_ENV: prefer_512}),
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        runs.append(" ".join(proc.stdout.split()))
    assert runs == [
        "hits 0 misses 1",  # compiled and saved
        "hits 1 misses 0",  # loaded, nothing compiled
        "hits 0 misses 1",  # other CPU features: compiled and saved beside the first
        "hits 1 misses 0",
        "hits 1 misses 0",  # the first variant is still there
    ]
    assert list((tmp_path / "cache").rglob("*.nbi")), "no cache index written"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_dot_keys_and_rows_mix_values_match_numpy(dtype: type) -> None:
    """Decoding's plain-loop products on tiles at offsets inside larger arrays (odd sizes, row
    strides wider than the tile): C = A @ B^T overwrites only its tile, C += A @ B adds."""
    from attndsl.runtime.cpu_intrinsics import rows_dot_keys, rows_mix_values

    rng = np.random.default_rng(7)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    for m in (3, 4, 7):  # rows four at a time, then the rest one by one
        a = rng.standard_normal((2, 3, 9, 7)).astype(dtype)
        b = rng.standard_normal((2, 11, 7)).astype(dtype)
        c = np.full((m + 1, 13), 5.0, dtype)
        rows_dot_keys(m, 9, 7, a, (1 * 3 + 2) * 9 * 7 + 7, 7, b, (11 + 2) * 7, 7, c, 13 + 2, 13)
        np.testing.assert_allclose(c[1:, 2:11], a[1, 2, 1:m + 1] @ b[1, 2:11].T, rtol=tol,
                                   atol=tol)
        c[1:, 2:11] = 5.0
        assert (c == 5.0).all()  # nothing outside the tile was written
    for m, k in ((3, 9), (2, 4), (5, 3)):  # keys four at a time, then the rest one by one
        x = rng.standard_normal((m, 20)).astype(dtype)
        v = rng.standard_normal((2, 30, 6)).astype(dtype)
        acc = np.ones((m, 6), dtype)
        rows_mix_values(m, 6, k, x, 2, 20, v, (30 + 4) * 6, 6, acc, 0, 6)
        np.testing.assert_allclose(acc, 1 + x[:, 2:2 + k] @ v[1, 4:4 + k], rtol=tol, atol=tol)


@njit(fastmath=ci.FASTMATH, error_model="numpy")
def _all_finite(x, off, n):  # type: ignore[no-untyped-def]
    return ci.all_finite(x, off, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_sees_every_element_of_its_range_and_none_outside(dtype: type) -> None:
    """all_finite over [off, off + n) of a flat array, 2-D arrays read flat; its unsigned
    indices must still cover the range exactly (first, last, odd lengths)."""
    x = np.arange(2 * 97, dtype=dtype).reshape(2, 97)
    assert _all_finite(x, 0, x.size) and _all_finite(x, 5, 0)
    for bad in (np.nan, np.inf, -np.inf):
        for at in (0, 13, 96, 97, 193):
            y = x.copy()
            y.flat[at] = bad
            assert not _all_finite(y, 0, y.size)
            assert not _all_finite(y, at, 1) and not _all_finite(y, max(at - 4, 0), 5)
            assert _all_finite(y, at + 1, y.size - at - 1)  # the range after it
            assert _all_finite(y, 0, at)  # the range before it
