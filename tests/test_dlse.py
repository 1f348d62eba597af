"""The gradient flowing into lse (`Kernel.backward(..., dlse=)`, LANGUAGE.md 6), softmax family.

lse = log sum_j exp(x_j) (+ exp(sink)), so d lse / d x_j = P_j and the backward's row term
D = rowsum(dO * O) becomes D - dlse on every target. Checked against central finite differences
of L = sum(out * dout) + sum(lse * dlse) (rows with lse = -inf left out: a constant there) on
numpy and cpu, with GQA, masks that empty whole rows, a sink, and odd shapes. The CUDA target is
checked under the simulator in tests/cuda_sim/test_cuda_dlse.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import attndsl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# rows 0-2 see no key (lse = -inf, out = 0)
EMPTY_ROWS = """attention empty_rows {
    score q . k
    scale 1 / sqrt(d)
    mask  j < i - 2
}"""

# (spec, heads, kv_heads, n_q, n_k, d, dv): GQA everywhere; sliding_window_sink's window is
# 128, so with n_q 137 and n_k 6 rows 133-136 see no key (lse = sink there)
CASES = {
    "causal": (EXAMPLES / "causal.attn", 4, 2, 13, 13, 5, 3),
    "empty_rows": (EMPTY_ROWS, 6, 3, 11, 11, 7, 2),
    "sink": (EXAMPLES / "sliding_window_sink.attn", 4, 2, 137, 6, 5, 3),
    "alibi": (EXAMPLES / "alibi.attn", 8, 2, 19, 19, 3, 5),
}


def inputs(name: str, dtype: Any = np.float64, seed: int = 0) -> dict[str, Any]:
    spec, H, KV, n_q, n_k, d, dv = CASES[name]
    rng = np.random.default_rng(seed)
    a: dict[str, Any] = {
        "q": rng.standard_normal((2, H, n_q, d)), "k": rng.standard_normal((2, KV, n_k, d)),
        "v": rng.standard_normal((2, KV, n_k, dv)), "dout": rng.standard_normal((2, H, n_q, dv)),
        "dlse": rng.standard_normal((2, H, n_q)), "params": {}}
    checked = attndsl.load(spec) if isinstance(spec, Path) else attndsl.parse(spec)
    for p in checked.params:
        a["params"][p.name] = 0.3 * rng.standard_normal(H)  # slope[heads], sink[heads]
    for key in ("q", "k", "v", "dout", "dlse"):
        a[key] = a[key].astype(dtype)
    a["params"] = {n: value.astype(dtype) for n, value in a["params"].items()}
    return a


@pytest.fixture(scope="module")
def kernels() -> dict[tuple[str, str], attndsl.Kernel]:
    return {(name, target): attndsl.compile(CASES[name][0], target=target)
            for name in CASES for target in ("numpy", "cpu")}


def loss(kernel: attndsl.Kernel, a: dict[str, Any], **change: np.ndarray) -> float:
    args = {"q": a["q"], "k": a["k"], "v": a["v"], **a["params"], **change}
    out, lse = kernel.forward(args.pop("q"), args.pop("k"), args.pop("v"), return_lse=True,
                              **args)
    finite = np.isfinite(lse)
    return float(np.sum(out * a["dout"]) + np.sum(np.where(finite, lse, 0) * a["dlse"]))


@pytest.mark.parametrize("target", ["numpy", "cpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_dlse_matches_finite_differences(kernels: dict, name: str, target: str) -> None:
    kernel = kernels[name, target]
    a = inputs(name)
    q, k, v, params = a["q"], a["k"], a["v"], a["params"]
    out, lse = kernel.forward(q, k, v, return_lse=True, **params)
    if name in ("empty_rows", "sink"):  # the rows the mask leaves without a key
        empty = lse[:, :, :3] if name == "empty_rows" else lse[:, :, 133:]
        expect = -np.inf if name == "empty_rows" else params["sink"][None, :, None]
        np.testing.assert_allclose(empty, np.broadcast_to(expect, empty.shape), rtol=1e-15)
    grads = kernel.backward(q, k, v, a["dout"], dlse=a["dlse"], **params)
    given = kernel.backward(q, k, v, a["dout"], out=out, lse=lse, dlse=a["dlse"], **params)
    rng = np.random.default_rng(1)
    for arg in ["q", "k", "v", *params]:
        assert np.isfinite(grads[arg]).all(), arg
        np.testing.assert_allclose(given[arg], grads[arg], rtol=1e-12, atol=1e-12, err_msg=arg)
        base = a[arg] if arg in a else params[arg]
        direction = rng.standard_normal(base.shape)
        eps = 1e-6
        fd = (loss(kernel, a, **{arg: base + eps * direction})
              - loss(kernel, a, **{arg: base - eps * direction})) / (2 * eps)
        analytic = float(np.sum(grads[arg] * direction))
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(fd)), (arg, fd, analytic)


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_dlse_changes_the_gradient_and_zero_changes_nothing(kernels: dict, target: str) -> None:
    kernel = kernels["sink", target]
    a = inputs("sink", np.float32)
    q, k, v, dout = a["q"], a["k"], a["v"], a["dout"]
    plain = kernel.backward(q, k, v, dout, **a["params"])
    zero = kernel.backward(q, k, v, dout, dlse=np.zeros_like(a["dlse"]), **a["params"])
    some = kernel.backward(q, k, v, dout, dlse=a["dlse"], **a["params"])
    for arg in plain:
        assert plain[arg].dtype == some[arg].dtype == np.float32
        np.testing.assert_array_equal(plain[arg], zero[arg])  # D - 0 is D: bit for bit
    assert not np.allclose(plain["q"], some["q"]) and not np.allclose(plain["sink"], some["sink"])
    np.testing.assert_array_equal(plain["v"], some["v"])  # lse does not read v


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_dlse_on_rows_without_keys_is_ignored_even_when_not_finite(kernels: dict,
                                                                     target: str) -> None:
    """lse = -inf there is a constant; a model's merge rule may send NaN or inf into it."""
    kernel = kernels["empty_rows", target]
    a = inputs("empty_rows")
    wild = a["dlse"].copy()
    wild[:, :, 0], wild[:, :, 1], wild[:, :, 2] = np.nan, np.inf, -np.inf
    tame = a["dlse"].copy()
    tame[:, :, :3] = 0
    want = kernel.backward(a["q"], a["k"], a["v"], a["dout"], dlse=tame)
    got = kernel.backward(a["q"], a["k"], a["v"], a["dout"], dlse=wild)
    for arg in want:
        np.testing.assert_array_equal(got[arg], want[arg], err_msg=arg)


def test_dlse_errors_name_the_argument(kernels: dict) -> None:
    kernel = kernels["causal", "numpy"]
    a = inputs("causal")
    q, k, v, dout = a["q"], a["k"], a["v"], a["dout"]
    with pytest.raises(ValueError, match=r"dlse: expected shape \[2, 4, 13\] .*got \[2, 4, 12\]"):
        kernel.backward(q, k, v, dout, dlse=a["dlse"][:, :, :12])
    with pytest.raises(TypeError, match="dlse: expected a float array, got int64"):
        kernel.backward(q, k, v, dout, dlse=np.zeros((2, 4, 13), np.int64))
    sigmoid = attndsl.compile(EXAMPLES / "sigmoid.attn", target="numpy")
    with pytest.raises(TypeError, match="dlse: the spec normalizes with 'elementwise', which "
                                        "has no lse"):
        sigmoid.backward(q, k, v, dout, dlse=a["dlse"])
    sigmoid.backward(q, k, v, dout, dlse=None)  # None is "no gradient into lse": always fine
