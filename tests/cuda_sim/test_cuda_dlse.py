"""`backward(..., dlse=)` on the CUDA target under the simulator: the preprocess kernel's delta
becomes D - dlse, so dS = P (dP - (D - dlse)) and d sink = -exp(sink - lse) (D - dlse); checked
against the NumPy reference (itself checked by finite differences in tests/test_dlse.py), with
host arrays and with device arrays, GQA, and rows a window leaves without a key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

import attndsl
from attndsl.codegen import cuda_toolchain as tc
from attndsl.runtime.cuda_kernel import compile_kernel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# rows 7 and 8 see no key with n_k = 5 (lse = sink there)
WINDOW_SINK = """attention window_sink {
    param sink[heads]
    let window = 3
    score q . k
    scale 1 / sqrt(d)
    mask j <= i and i - j < window
    normalize softmax(sink = sink[h])
}"""


def arrays(n_q: int, n_k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"q": rng.standard_normal((2, 4, n_q, 3)), "k": rng.standard_normal((2, 2, n_k, 3)),
            "v": rng.standard_normal((2, 2, n_k, 2)), "dout": rng.standard_normal((2, 4, n_q, 2)),
            "dlse": rng.standard_normal((2, 4, n_q)), "sink": rng.standard_normal(4)}


@pytest.mark.parametrize(("spec", "n_q", "n_k"), [(EXAMPLES / "causal.attn", 7, 7),
                                            (WINDOW_SINK, 9, 5)], ids=["causal", "window_sink"])
def test_cuda_dlse_matches_the_reference(spec, n_q: int, n_k: int) -> None:
    a = arrays(n_q, n_k)
    ref = attndsl.compile(spec, target="numpy")
    kernel = compile_kernel(ref.spec, tiles=(4, 4, 4, 4))
    params = {"sink": a["sink"]} if ref.spec.params else {}
    want = ref.backward(a["q"], a["k"], a["v"], a["dout"], dlse=a["dlse"], **params)
    got = kernel.backward(a["q"], a["k"], a["v"], a["dout"], dlse=a["dlse"], **params)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-10, err_msg=name)
    cuda = tc.require_cuda()
    dev = {n: cuda.to_device(a[n]) for n in ("q", "k", "v", "dout", "dlse")}
    on_device = kernel.backward(dev["q"], dev["k"], dev["v"], dev["dout"], dlse=dev["dlse"],
                                **params)
    for name in want:
        value = on_device[name]
        value = value.copy_to_host() if hasattr(value, "copy_to_host") else value
        np.testing.assert_allclose(value, want[name], rtol=1e-10, atol=1e-10, err_msg=name)
