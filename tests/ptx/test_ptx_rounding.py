"""floor/ceil/round (issue 8, section 3) compile for the device: in subscripts, in the mask and in
float math, float32 kernels with no float64 (on the device math.floor of a float32 is a float32,
so integer uses go through int(...)). No GPU needed."""

from __future__ import annotations

import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

import attndsl
from attndsl.codegen import cuda_toolchain as tc
from attndsl.runtime.cuda_kernel import compile_kernel

SPEC = """attention r {
    param table[heads, 9]
    score q . k
    bias table[h, round(j / 2) % 9] + floor(q . k) * 0.5 + ceil(q . k / 3) - round(2 * q . k)
    mask ceil((i + 1) / 4) != floor(j / 5) + 1 and i % (n_k - 4) >= j // (n_k - 4)
}"""


def test_roundings_assemble_as_float32() -> None:
    ptxs = compile_kernel(attndsl.parse(SPEC)).ptx(cc=(8, 0), dtype="float32")
    for name, ptx in ptxs.items():
        assert tc.f64_instructions(ptx) == [], f"{name}: float64 in a float32 kernel"
        tc.assemble(ptx, (8, 0))
