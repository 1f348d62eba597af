"""spec -> Kernel for a target: derive, emit source, load it from the cache, wrap it."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import ir
from ..symbolic import derive
from . import cache, numpy_ops
from .kernel import Call, Kernel

TARGETS = ("numpy", "cpu", "cuda")


def compile_numpy(spec: ir.Spec) -> Kernel:
    from ..codegen import numpy_ref

    source = numpy_ref.emit(derive(spec))
    module = cache.load_module(source, "numpy", spec.name)

    def forward(call: Call) -> tuple[np.ndarray, np.ndarray | None]:
        with np.errstate(all="ignore"):
            return module.forward(numpy_ops, *call.arrays(), **call.offsets)

    def backward(call: Call, dout: np.ndarray, out: Any, lse: Any, dlse: Any
                 ) -> dict[str, np.ndarray]:
        q, k, v, *rest = call.arrays()
        given = {"dlse": dlse} if dlse is not None else {}  # only softmax's backward takes it
        with np.errstate(all="ignore"):
            return module.backward(numpy_ops, q, k, v, dout, *rest, out=out, lse=lse, **given,
                                   **call.offsets)

    return Kernel(spec, "numpy", source, forward, backward)


def compile_spec(spec: ir.Spec, target: str) -> Kernel:
    if target == "numpy":
        return compile_numpy(spec)
    if target == "cpu":
        from .cpu_kernel import CpuKernel

        return CpuKernel(spec)
    if target == "cuda":
        from .cuda_kernel import compile_kernel

        return compile_kernel(spec)
    raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
