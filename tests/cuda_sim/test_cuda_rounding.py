"""Issue 8 on the CUDA target (simulator): the `//` and `%` masks of item 4 and floor/ceil/round
(T5's buckets), against direct NumPy computations, like tests/test_rounding.py for numpy/cpu."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

import attndsl
from attndsl.runtime.cuda_kernel import compile_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_rounding import ITEM4_MASKS, ROUNDING_SPEC, t5_bucket, weights_of

ROOT = Path(__file__).resolve().parents[2]
TILES = (4, 8, 8, 4)


@pytest.mark.parametrize("mask", ITEM4_MASKS, ids=[m[0] for m in ITEM4_MASKS])
def test_item4_floor_division_and_modulo_masks_cuda(mask: tuple) -> None:
    text, n_q, n_k, allowed = mask
    kernel = compile_kernel(attndsl.parse(f"attention m {{\n score q . k\n mask {text}\n}}"),
                            tiles=TILES)
    i, j = np.arange(n_q)[:, None], np.arange(n_k)[None, :]
    m = allowed(i, j, n_k).astype(float)
    want = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    assert np.abs(weights_of(kernel, n_q, n_k)[0] - want).max() < 1e-12, text


def test_t5_bucket_example_cuda() -> None:
    kernel = compile_kernel(attndsl.load(ROOT / "examples" / "t5_bucket.attn"), tiles=TILES)
    n = 35  # offsets up to 34: the exact buckets, the edges 16 and 32, log-spaced ones
    w = weights_of(kernel, n, n, table=np.arange(32, dtype=np.float64)[None])
    got = np.rint(np.log(w / np.diagonal(w, axis1=1, axis2=2)[..., None])).astype(np.int64)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    assert np.array_equal(got[0], t5_bucket(j - i))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_floor_ceil_round_cuda_matches_numpy(dtype: type) -> None:
    spec = attndsl.parse(ROUNDING_SPEC)
    cuda, ref = compile_kernel(spec, tiles=TILES), attndsl.compile(spec, "numpy")
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 11, 4)).astype(dtype) for _ in range(3))
    table = rng.standard_normal((2, 9))
    dout = rng.standard_normal((1, 2, 11, 4)).astype(dtype)
    tol = 1e-12 if dtype is np.float64 else 2e-5
    np.testing.assert_allclose(cuda(q, k, v, table=table), ref(q, k, v, table=table), atol=tol)
    g_cuda = cuda.backward(q, k, v, dout, table=table)
    g_ref = ref.backward(q, k, v, dout, table=table)
    for name in g_ref:
        np.testing.assert_allclose(g_cuda[name], g_ref[name], atol=10 * tol, err_msg=name)


def test_item4_cuda_prints_where_and_a_where_divisor() -> None:
    """Found by the precedence table: the CUDA printer raised ValueError on any where() (its
    last branch folds to a number) and NotImplementedError on `//` by a where()."""
    spec = attndsl.parse("attention t {\n param P[heads, 9]\n score q . k\n"
                         " bias where(j > i, 0.5, 0) + P[h, (i + 5) // where(j > 2, 3, 2) % 9]\n}")
    cuda, ref = compile_kernel(spec, tiles=TILES), attndsl.compile(spec, "numpy")
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 9, 4)) for _ in range(3))
    P = rng.standard_normal((2, 9))
    assert np.abs(cuda(q, k, v, P=P) - ref(q, k, v, P=P)).max() < 1e-12
