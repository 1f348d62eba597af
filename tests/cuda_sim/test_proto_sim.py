"""benchmarks/proto_softmax_cuda.py under the CUDA simulator against NumPy references.

Shapes stay <= 32 and tiles at 4-16: the simulator runs every thread as a Python thread.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

PROTO_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "proto_softmax_cuda.py"


@pytest.fixture(scope="module")
def proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_softmax_cuda", PROTO_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _inputs(dtype, B=1, H=2, KV=1, n_q=13, n_k=17, d=8, dv=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, n_q, d)).astype(dtype)
    k = rng.standard_normal((B, KV, n_k, d)).astype(dtype)
    v = rng.standard_normal((B, KV, n_k, dv)).astype(dtype)
    dout = rng.standard_normal((B, H, n_q, dv)).astype(dtype)
    return q, k, v, dout


# (causal, causal_offset): full; top-left j <= i; bottom-right j <= i + n_k - n_q;
# j <= i - 3, where query rows 0-2 see no key at all (out = 0, lse = -inf)
MASKS = [(False, 0), (True, 0), (True, 4), (True, -3)]


@pytest.mark.parametrize("causal, offset", MASKS)
def test_forward_matches_numpy(proto, causal, offset):
    cfg = proto.Config(bq=8, bk=8, d=8, dv=8, causal=causal)
    q, k, v, _ = _inputs(np.float32)
    out, lse = proto.forward(q, k, v, cfg, causal_offset=offset)
    ref_out, ref_lse = proto.reference_forward(q, k, v, 1 / math.sqrt(8), causal, offset)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-6)
    if offset < 0:
        assert np.all(out[:, :, :-offset] == 0)
        assert np.all(lse[:, :, :-offset] == -np.inf)
        assert np.all(np.isfinite(lse[:, :, -offset:]))


@pytest.mark.parametrize("causal, offset", MASKS)
def test_backward_matches_numpy(proto, causal, offset):
    cfg = proto.Config(bq=8, bk=8, d=8, dv=8, causal=causal)
    q, k, v, dout = _inputs(np.float32)
    out, lse = proto.forward(q, k, v, cfg, causal_offset=offset)
    dq, dk, dv = proto.backward(q, k, v, out, lse, dout, cfg, causal_offset=offset)
    ref = proto.reference_backward(q.astype(np.float64), k.astype(np.float64),
                                   v.astype(np.float64), dout.astype(np.float64),
                                   1 / math.sqrt(8), causal, offset)
    for got, want in zip((dq, dk, dv), ref):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if offset < 0:
        assert np.all(dq[:, :, :-offset] == 0)  # fully masked rows get no gradient


def test_reference_backward_against_finite_differences(proto):
    # the NumPy reference backward itself, entry by entry, float64, GQA with two kv heads
    q, k, v, dout = _inputs(np.float64, H=4, KV=2, n_q=5, n_k=7, d=3, dv=2)
    scale, causal, offset = 0.7, True, -1
    grads = proto.reference_backward(q, k, v, dout, scale, causal, offset)

    def loss(q_, k_, v_):
        return float(np.sum(proto.reference_forward(q_, k_, v_, scale, causal, offset)[0] * dout))

    eps = 1e-6
    for which, grad in enumerate(grads):
        args = [q, k, v]
        fd = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            fd[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_float64_kernels_against_finite_differences(proto):
    # the CUDA kernels themselves in float64: directional derivatives along random directions
    cfg = proto.Config(bq=8, bk=8, d=8, dv=8, causal=True, dtype="float64")
    q, k, v, dout = _inputs(np.float64)
    offset = -3
    dq, dk, dv = proto.backward(q, k, v, *proto.forward(q, k, v, cfg, causal_offset=offset),
                                dout, cfg, causal_offset=offset)

    def loss(q_, k_, v_):
        return float(np.sum(proto.forward(q_, k_, v_, cfg, causal_offset=offset)[0] * dout))

    rng = np.random.default_rng(1)
    eps = 1e-5
    for which, grad in enumerate((dq, dk, dv)):
        direction = rng.standard_normal(grad.shape)
        plus = [q, k, v]
        minus = [q, k, v]
        plus[which] = plus[which] + eps * direction
        minus[which] = minus[which] - eps * direction
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert fd == pytest.approx(float(np.sum(grad * direction)), rel=1e-7, abs=1e-9)


def test_uneven_tiles_gqa_and_more_queries_than_keys(proto):
    # bq != bk, two kv heads serving four query heads, n_q > n_k with bottom-right alignment:
    # rows 0-3 see nothing
    cfg = proto.Config(bq=4, bk=16, d=8, dv=4, causal=True)
    q, k, v, dout = _inputs(np.float32, H=4, KV=2, n_q=17, n_k=13, d=8, dv=4)
    offset = 13 - 17
    out, lse = proto.forward(q, k, v, cfg, scale=0.5, causal_offset=offset)
    ref_out, ref_lse = proto.reference_forward(q, k, v, 0.5, True, offset)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-6)
    assert np.all(lse[:, :, :4] == -np.inf)
    grads = proto.backward(q, k, v, out, lse, dout, cfg, scale=0.5, causal_offset=offset)
    ref = proto.reference_backward(q, k, v, dout, 0.5, True, offset)
    for got, want in zip(grads, ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_device_arrays_stay_on_device(proto):
    from numba import cuda

    from attndsl.codegen import cuda_toolchain as tc

    cfg = proto.Config(bq=8, bk=8, d=8, dv=8, causal=False)
    q, k, v, _ = _inputs(np.float32)
    dq_, dk_, dv_ = (cuda.to_device(a) for a in (q, k, v))
    out, lse = proto.forward(dq_, dk_, dv_, cfg)
    assert tc.is_device_array(out) and tc.is_device_array(lse)
    ref_out, _ = proto.reference_forward(q, k, v, 1 / math.sqrt(8))
    np.testing.assert_allclose(out.copy_to_host(), ref_out, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="mix of NumPy and CUDA arrays"):
        tc.as_device_arrays(q, dk_)


def test_compile_ptx_refuses_under_simulator():
    from attndsl.codegen import cuda_toolchain as tc

    assert tc.simulator_enabled()
    with pytest.raises(tc.CudaToolchainError, match="simulator"):
        tc.compile_ptx(lambda x: None, "void(float32[::1])")
