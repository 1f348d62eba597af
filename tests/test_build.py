"""runtime/build.py: a compile derives the spec once and passes its KernelPlan down."""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import attndsl
from attndsl import grad, symbolic
from attndsl.runtime import build, cpu_kernel, cuda_kernel

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def derivations(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Counts of derive / derive_gradients calls, wherever a module imported them from."""
    counts: collections.Counter[str] = collections.Counter()
    for name, real in (("derive", symbolic.derive), ("derive_gradients", grad.derive_gradients)):
        def counting(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _real(*args, **kwargs)

        for module in list(sys.modules.values()):
            if module is not None and getattr(module, "__name__", "").startswith("attndsl") \
                    and getattr(module, name, None) is real:
                monkeypatch.setattr(module, name, counting)
    return counts


@pytest.mark.parametrize("target", ["numpy", "cpu", "cuda"])
def test_issue9_derive_once_per_compile(target: str,
                                        derivations: collections.Counter[str]) -> None:
    # before issue 9 a cpu compile derived 3 times and took the gradients 4 times
    spec = attndsl.load(EXAMPLES / "alibi.attn")
    if target == "cuda":  # building the kernel object needs no GPU; compile_spec checks for one
        kernel = cuda_kernel.CudaKernel(spec, tiles=(4, 4, 4, 4))
    else:
        kernel = build.compile_spec(spec, target)
    if target == "cpu":  # the per-dtype kernel modules are emitted from the same plan
        assert isinstance(kernel, cpu_kernel.CpuKernel)
        kernel.module(np.dtype(np.float64))
    assert derivations == {"derive": 1, "derive_gradients": 1}
