"""codegen/cuda_toolchain under the CUDA simulator: device arrays are recognized, a mix of host
and device inputs is refused, and compile_ptx says it cannot run here."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")


def test_device_arrays_are_recognized_and_mixing_is_refused():
    from numba import cuda

    from attndsl.codegen import cuda_toolchain as tc

    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    device = cuda.to_device(host)
    assert tc.is_device_array(device) and not tc.is_device_array(host)
    with pytest.raises(TypeError, match="mix of NumPy and CUDA arrays"):
        tc.as_device_arrays(host, device)


def test_compile_ptx_refuses_under_simulator():
    from attndsl.codegen import cuda_toolchain as tc

    assert tc.simulator_enabled()
    with pytest.raises(tc.CudaToolchainError, match="simulator"):
        tc.compile_ptx(lambda x: None, "void(float32[::1])")
