"""`launch_stream`: every copy and launch of a cuda call goes on the caller's stream (what
`attndsl.torch` uses to run on PyTorch's current stream). Under the simulator, each launch's
configuration, each copy up and each copy down is recorded and must name the given stream;
the results must equal a call on the default stream. Specs: one whose rows are hoisted to the
host (cosine: copies both ways), a sink with dlse (the host epilogue), and causal linear."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

import attndsl
from attndsl.codegen import cuda_toolchain as tc
from attndsl.runtime import cuda_kernel
from attndsl.runtime.cuda_kernel import compile_kernel, launch_stream

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class _Recorded:
    """A kernel whose launch configuration is recorded before it runs."""

    def __init__(self, kernel: Any, seen: list[Any]) -> None:
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, config: tuple[Any, ...]) -> Any:
        self.seen.append(("launch", config[2] if len(config) > 2 else 0))
        return self.kernel[config]


class _Module:
    def __init__(self, module: Any, seen: list[Any]) -> None:
        self.module, self.seen = module, seen

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.module, name)
        return _Recorded(value, self.seen) if name.startswith("attn_") else value


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """(what, stream) of every launch, copy up and copy down of the calls that follow."""
    record: list[Any] = []
    cuda = tc.require_cuda()
    module = cuda_kernel.CudaKernel.module
    monkeypatch.setattr(cuda_kernel.CudaKernel, "module",
                        lambda self, config: _Module(module(self, config), record))
    to_device = cuda.to_device

    def recorded_to_device(a: Any, stream: Any = 0, **kw: Any) -> Any:
        record.append(("up", stream))
        return to_device(a, stream=stream, **kw)

    monkeypatch.setattr(cuda, "to_device", recorded_to_device)
    array_type = type(to_device(np.zeros(1)))
    copy_to_host = array_type.copy_to_host

    def recorded_copy_to_host(self: Any, ary: Any = None, stream: Any = 0) -> Any:
        record.append(("down", stream))
        return copy_to_host(self, ary, stream=stream)

    monkeypatch.setattr(array_type, "copy_to_host", recorded_copy_to_host)
    return record


@pytest.mark.parametrize("name", ["cosine", "sliding_window_sink", "causal_linear"])
def test_every_copy_and_launch_goes_on_the_given_stream(name: str, seen: list[Any]) -> None:
    spec = attndsl.load(EXAMPLES / f"{name}.attn")
    kernel = compile_kernel(spec, tiles=(4, 4, 4, 4))
    rng = np.random.default_rng(1)
    heads = spec.heads or 2
    kv = spec.kv_heads or heads
    q, k = rng.standard_normal((1, heads, 7, 3)), rng.standard_normal((1, kv, 7, 3))
    v, dout = rng.standard_normal((1, kv, 7, 2)), rng.standard_normal((1, heads, 7, 2))
    params = {p.name: rng.uniform(0.5, 1.0, size=[heads] if p.dims else []) for p in spec.params}
    softmax = spec.normalize.kind is attndsl.ir.NormKind.SOFTMAX
    extra = {"dlse": rng.standard_normal((1, heads, 7))} if softmax else {}
    want_out = kernel.forward(q, k, v, **params)
    want = kernel.backward(q, k, v, dout, **extra, **params)
    seen.clear()
    stream = tc.require_cuda().stream()
    with launch_stream(stream):
        out = kernel.forward(q, k, v, **params)
        got = kernel.backward(q, k, v, dout, **extra, **params)
    kinds = {what for what, _ in seen}
    assert {"launch", "up", "down"} <= kinds
    assert [s for _, s in seen if s is not stream] == [], seen
    np.testing.assert_array_equal(out, want_out)
    for g in want:
        np.testing.assert_array_equal(got[g], want[g], err_msg=g)


def test_a_call_after_the_block_is_back_on_the_default_stream(seen: list[Any]) -> None:
    kernel = compile_kernel(attndsl.load(EXAMPLES / "causal.attn"), tiles=(4, 4, 4, 4))
    q = np.random.default_rng(2).standard_normal((1, 2, 5, 3))
    with launch_stream(tc.require_cuda().stream()):
        pass
    seen.clear()
    kernel.forward(q, q, q)
    assert seen and all(s == 0 for _, s in seen)
