"""PTX for the CUDA fuzz causes (tests/cuda_sim/test_cuda_fuzz_causes.py): the signatures
`CudaKernel.ptx` compiles with list dq's outputs in the kernel's argument order (a per-block
pair partial is 2-D, a per-row one 3-D), a logit with nothing query-side still gives every
kernel, and the NaN-keeping float max/min stay float32. No GPU needed."""

from __future__ import annotations

import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

import attndsl
from attndsl.codegen import cuda_toolchain as tc
from attndsl.runtime.cuda_kernel import KERNELS, compile_kernel

SPECS = {
    "lookup_order": "param T[n_q, n_k]\n    param c[heads]\n    score q . k + T[i, j] + c[h]",
    "qk_free_score": "param pos[n_k]\n    score pos[j] + 0.5 * (j - i)",
    "minmax_nan": "score sum(max(q, k)) + min(min(sum(q), 0.5 * sum(k)), 2)",
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cuda_fuzz_cause_ptx_assembles(name):
    kernel = compile_kernel(attndsl.parse(f"attention {name} {{\n    {SPECS[name]}\n}}"))
    ptxs = kernel.ptx(cc=(8, 0), dtype="float32")
    assert sorted(ptxs) == sorted(KERNELS)
    for kernel_name, ptx in ptxs.items():
        assert tc.f64_instructions(ptx) == [], kernel_name
        report = tc.assemble(ptx, (8, 0))
        assert report.spill_stores == 0 and report.spill_loads == 0, kernel_name
