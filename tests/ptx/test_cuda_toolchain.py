"""codegen/cuda_toolchain: PTX for sm_80 / sm_90 from libNVVM, assembled with ptxas, f64 leaks,
device-array staging. The generated kernels' PTX is tested in test_cuda_ptx.py."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

from numba import cuda

from attndsl.codegen import cuda_toolchain as tc

CCS = [(8, 0), (9, 0)]

PTXAS_LOG = """\
ptxas info    : 8 bytes gmem, 8 bytes cmem[4]
ptxas info    : Compiling entry function '_Z3fwd' for 'sm_80'
ptxas info    : Function properties for _Z3fwd
    768 bytes stack frame, 276 bytes spill stores, 320 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 768 bytes cumulative stack size, \
32768 bytes smem, 868 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3bwd' for 'sm_80'
ptxas info    : Function properties for _Z3bwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 468 bytes cmem[0]
"""


def _scaled_exp(x, y, s):
    i = cuda.grid(1)
    if i < x.size:
        y[i] = math.exp(x[i] * s) + np.float32(1.0)


def _leaky_exp(x, y, s):
    i = cuda.grid(1)
    if i < x.size:
        # a bare float literal is float64 (1.0 would be narrowed back by LLVM; 0.1 is not)
        y[i] = math.exp(x[i] * s * 0.1)


def test_parse_ptxas_log():
    reports = tc.parse_ptxas_log(PTXAS_LOG)
    fwd, bwd = reports["_Z3fwd"], reports["_Z3bwd"]
    assert (fwd.registers, fwd.spill_stores, fwd.spill_loads) == (255, 276, 320)
    assert (fwd.stack_bytes, fwd.shared_bytes) == (768, 32768)
    assert (bwd.registers, bwd.spill_stores, bwd.shared_bytes) == (32, 0, 0)


def test_f64_classification():
    ptx = """
    .reg .f64 %fd<4>;          // a declaration, not an instruction
    ld.param.f64 %fd1, [p];
    cvt.f64.f32 %fd2, %f1;
    @%p1 mul.f64 %fd3, %fd2, %fd1;
    cvt.rn.f32.s64 %f2, %rd1;  // int64 -> f32 is not float64
    """
    kinds = [ins.kind for ins in tc.f64_instructions(ptx)]
    assert kinds == ["move", "convert", "arith"]
    assert tc.has_f64(ptx) and tc.has_f64(ptx, include_conversions=False)
    assert not tc.has_f64("cvt.rn.f32.s64 %f2, %rd1;")


def test_find_ptxas_runs():
    ptxas = tc.find_ptxas()
    assert ptxas.is_file()


@pytest.mark.parametrize("cc", CCS)
def test_compile_and_assemble_without_gpu(cc):
    ptx = tc.compile_ptx(_scaled_exp, "void(float32[::1], float32[::1], float32)", cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert len(tc.ptx_entries(ptx)) == 1
    assert not tc.has_f64(ptx)
    report = tc.assemble(ptx, cc)
    assert 0 < report.registers <= 255
    assert report.spill_stores == report.spill_loads == 0


def test_f64_leaks_are_caught():
    leaky = tc.compile_ptx(_leaky_exp, "void(float32[::1], float32[::1], float32)")
    assert tc.has_f64(leaky, include_conversions=False)
    # a Python float scalar argument is float64 too: typed signatures prevent it
    wide = tc.compile_ptx(_scaled_exp, "void(float32[::1], float32[::1], float64)")
    assert tc.has_f64(wide, include_conversions=False)


def test_fastmath_uses_approximate_exp():
    ptx = tc.compile_ptx(_scaled_exp, "void(float32[::1], float32[::1], float32)",
                         fastmath=True)
    assert "ex2.approx" in ptx


def _shared_64k(x):
    # 64 x 64 float64 K and V tiles: 64 KiB of static shared memory, over the 48 KiB limit
    tile = cuda.shared.array(8192, numba.float64)
    i = cuda.grid(1)
    tile[i] = x[i]
    cuda.syncthreads()
    x[i] = tile[8191 - i]


def test_launch_bounds_reach_ptx():
    ptx = tc.compile_ptx(_scaled_exp, "void(float32[::1], float32[::1], float32)",
                         launch_bounds=64)
    assert ".maxntid 64" in ptx


def test_static_shared_over_48k_is_rejected():
    ptx = tc.compile_ptx(_shared_64k, "void(float64[::1])", cc=(8, 0))
    with pytest.raises(tc.CudaToolchainError, match="too much shared data"):
        tc.assemble(ptx, (8, 0))


def test_device_staging_needs_no_gpu_to_refuse_mixing():
    class FakeDevice:
        @property
        def __cuda_array_interface__(self) -> dict:
            return {"shape": (1,), "typestr": "<f4", "data": (0, False), "version": 3}

    with pytest.raises(TypeError, match="mix of NumPy and CUDA arrays"):
        tc.as_device_arrays(np.zeros(1, np.float32), FakeDevice())


def test_missing_numba_cuda_says_what_to_install(monkeypatch):
    monkeypatch.setattr(tc, "numba_cuda_installed", lambda: False)
    with pytest.raises(ImportError, match=r"attndsl\[cuda\]"):
        tc.require_cuda()
    with pytest.raises(ImportError, match=r"attndsl\[cuda\]"):
        tc.compile_ptx(_scaled_exp, "void(float32[::1], float32[::1], float32)")
