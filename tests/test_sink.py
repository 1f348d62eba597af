"""softmax(sink = e) (issue 9): a key with a logit and no value, on numpy, cpu and the proof.

The reference here is written from LANGUAGE.md section 4 alone, row by row; the gradients of
q and the sink param are checked against its central finite differences. Shapes are odd (not
multiples of any tile), with GQA and rows the window leaves without a key (out 0, lse = sink).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import attndsl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SPEC = """attention window_sink {
    param sink[heads]
    let window = 3
    score q . k
    scale 1 / sqrt(d)
    mask j <= i and i - j < window
    normalize softmax(sink = sink[h])
}"""

# a query-side sink sharing a param with the logit, and a size: its chain meets the logit's
SHARED = """attention shared_sink {
    param sk[n]
    param w[heads]
    score q . k + sum(q) * w[h]
    normalize softmax(sink = sk[i] * w[h] - log(n_k))
}"""


def reference(q, k, v, sink, window=3):  # type: ignore[no-untyped-def]
    """out and lse of SPEC by the definition: exp(x_j) / (exp(sink[h]) + sum_j exp(x_j))."""
    B, H, n_q, d = q.shape
    group = H // k.shape[1]
    out, lse = np.zeros((B, H, n_q, v.shape[3])), np.zeros((B, H, n_q))
    for b, h, i in np.ndindex(B, H, n_q):
        keys = [j for j in range(k.shape[2]) if j <= i and i - j < window]
        x = np.array([q[b, h, i] @ k[b, h // group, j] for j in keys]) / np.sqrt(d)
        z = np.exp(sink[h]) + np.exp(x).sum()
        lse[b, h, i] = np.log(z)
        for weight, j in zip(np.exp(x) / z, keys):
            out[b, h, i] += weight * v[b, h // group, j]
    return out, lse


def arrays(n_q=14, n_k=9, dtype=np.float64, seed=0):  # type: ignore[no-untyped-def]
    """B 2, 4 query heads on 2 key heads; rows 11-13 see no key (n_k 9, window 3)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, n_q, 5)).astype(dtype)
    k = rng.standard_normal((2, 2, n_k, 5)).astype(dtype)
    v = rng.standard_normal((2, 2, n_k, 6)).astype(dtype)
    dout = rng.standard_normal((2, 4, n_q, 6)).astype(dtype)
    return q, k, v, dout, rng.standard_normal(4).astype(dtype)


@pytest.fixture(scope="module")
def kernels():  # type: ignore[no-untyped-def]
    return {target: attndsl.compile(SPEC, target=target) for target in ("numpy", "cpu")}


def test_sink_parses_and_refuses_what_is_not_one_logit_per_row() -> None:
    spec = attndsl.parse(SPEC)
    assert spec.normalize.sink is not None
    for text, message in [
        ("normalize softmax(sink = j)", "must not depend on j"),
        ("normalize softmax(sink = sum(q))", r"may not use q \(a vector\)"),
        ("normalize sum(sink = 0)", "'sum' takes no keyword argument"),
        ("normalize softmax(sinks = 0)", "softmax has no argument 'sinks'"),
    ]:
        with pytest.raises(attndsl.SpecError, match=message) as error:
            attndsl.parse(f"attention t {{\n    score q . k\n    {text}\n}}")
        assert error.value.line == 3 and "^" in str(error.value)


def test_sink_numpy_matches_the_definition_and_finite_differences(kernels) -> None:  # type: ignore[no-untyped-def]
    q, k, v, dout, sink = arrays()
    out, lse = kernels["numpy"].forward(q, k, v, return_lse=True, sink=sink)
    want_out, want_lse = reference(q, k, v, sink)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)
    assert np.all(out[:, :, 11:] == 0) and np.allclose(lse[:, :, 11:], sink[None, :, None])
    grads = kernels["numpy"].backward(q, k, v, dout, sink=sink)

    def loss(q_, sink_):  # type: ignore[no-untyped-def]
        return float((reference(q_, k, v, sink_)[0] * dout).sum())

    eps = 1e-6
    for h in range(4):
        e = np.eye(4)[h] * eps
        fd = (loss(q, sink + e) - loss(q, sink - e)) / (2 * eps)
        assert abs(grads["sink"][h] - fd) <= 1e-7 * max(1.0, abs(fd)), (h, grads["sink"][h], fd)
    assert np.max(np.abs(grads["sink"])) > 1e-2  # the check above can fail
    e = np.zeros_like(q)
    e[1, 2, 4, 3] = eps
    fd = (loss(q + e, sink) - loss(q - e, sink)) / (2 * eps)
    assert abs(grads["q"][1, 2, 4, 3] - fd) <= 1e-7 * max(1.0, abs(fd))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda t: t.__name__)
@pytest.mark.parametrize("shape", [(14, 9), (70, 131)], ids=["empty_rows", "tiles"])
def test_sink_cpu_matches_numpy(kernels, dtype, shape) -> None:  # type: ignore[no-untyped-def]
    q, k, v, dout, sink = arrays(*shape, dtype=dtype, seed=1)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    want = kernels["numpy"].forward(q, k, v, return_lse=True, sink=sink)
    got = kernels["cpu"].forward(q, k, v, return_lse=True, sink=sink)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    want_grads = kernels["numpy"].backward(q, k, v, dout, sink=sink)
    # out and lse given (the kernels then trust them), as a training loop passes them
    got_grads = kernels["cpu"].backward(q, k, v, dout, out=got[0], lse=got[1], sink=sink)
    assert sorted(got_grads) == ["k", "q", "sink", "v"]
    for name, value in want_grads.items():
        scale = max(1.0, float(np.max(np.abs(value))))
        np.testing.assert_allclose(got_grads[name], value, rtol=tol, atol=tol * scale,
                                   err_msg=name)


def test_sink_nan_reaches_its_rows_only(kernels) -> None:  # type: ignore[no-untyped-def]
    """A NaN sink of head 1 makes head 1's rows NaN (out, lse) and no other head's."""
    q, k, v, _dout, sink = arrays()
    sink[1] = np.nan
    for target in ("numpy", "cpu"):
        out, lse = kernels[target].forward(q, k, v, return_lse=True, sink=sink)
        assert np.isnan(lse[:, 1]).all() and np.isfinite(lse[:, [0, 2, 3]]).all(), target
        assert np.isnan(out[:, 1, :11]).all() and np.isfinite(out[:, [0, 2, 3]]).all(), target


def test_sink_shared_param_on_numpy_and_cpu_and_proved() -> None:
    """sk[i] * w[h] - log(n_k): a query-side sink whose param w is also in the logit."""
    spec = attndsl.parse(SHARED)
    report = attndsl.verify(spec, targets="numpy,cpu")
    assert report.ok, str(report)
    assert {"proof dsk", "proof dw"} <= {c.what for c in report.checks if c.ok}, str(report)


def test_sink_example_is_proved() -> None:
    report = attndsl.verify(EXAMPLES / "sliding_window_sink.attn")
    assert report.ok, str(report)
    assert any(c.what == "proof dsink" and c.ok for c in report.checks), str(report)
