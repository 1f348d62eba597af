"""Kernel.weights (LANGUAGE.md 6): the normalized weights [B, heads, rows, n_k] exactly as a
target's kernels use them, masked entries 0, computed by the target itself (its forward with v
the identity), rows picked in runs of query blocks at their offsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import attndsl
from attndsl.runtime import kernel as kernel_module

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _call(name: str, n_q: int = 70, n_k: int = 150, seed: int = 0):  # type: ignore[no-untyped-def]
    spec = attndsl.load(EXAMPLES / f"{name}.attn")
    rng = np.random.default_rng(seed)
    H, KV = spec.heads or 4, spec.kv_heads or 2
    q, k, v = (rng.standard_normal(s) for s in ((2, H, n_q, 6), (2, KV, n_k, 6), (2, KV, n_k, 3)))
    extra = {p.name: 0.3 * rng.standard_normal([H if d == "heads" else d for d in p.dims])
             for p in spec.params}
    return spec, q, k, v, extra


@pytest.mark.parametrize("target", ["numpy", "cpu"])
@pytest.mark.parametrize("name", ["causal", "sliding_window_sink", "sigmoid", "causal_linear"])
def test_weights_times_v_is_out(name: str, target: str) -> None:
    """W @ v reproduces forward's out; masked entries above the diagonal are exactly 0; softmax
    rows sum to 1 (less the sink's share); a subset of rows equals those rows."""
    n = 70 if name != "causal_linear" else 9
    spec, q, k, v, extra = _call(name, n, n)
    kernel = attndsl.compile(spec, target=target)
    w = kernel.weights(q, k, v, **extra)
    assert w.shape == (2, q.shape[1], n, n) and w.dtype == q.dtype
    g = np.repeat(v, q.shape[1] // k.shape[1], axis=1)
    out = kernel.forward(q, k, v, **extra)
    np.testing.assert_allclose(np.einsum("bhij,bhjc->bhic", w, g), out, rtol=1e-9, atol=1e-12)
    if name != "sigmoid":  # the causal ones: masked entries are exactly 0
        assert np.all(np.triu(w[0, 0], 1) == 0)
    if name == "causal":
        np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-12)
    if name == "sliding_window_sink":
        assert np.all(w.sum(-1) < 1)  # the sink takes its share
    rows = [n - 1, n - 2, 3, 4, 5]
    np.testing.assert_allclose(kernel.weights(q, k, v, rows=rows, **extra), w[:, :, rows],
                               rtol=1e-12, atol=1e-14)


def test_weights_with_offsets_and_lookups() -> None:
    """A KV-cache block: the weights of rows at q_offset = 140 against 150 keys equal those
    rows of the whole matrix (ALiBi reads j - i)."""
    spec, q, k, v, extra = _call("alibi", 150, 150)
    kernel = attndsl.compile(spec, target="numpy")
    whole = kernel.weights(q, k, v, **extra)
    block = kernel.weights(q[:, :, 140:], k, v, q_offset=140, **extra)
    np.testing.assert_allclose(block, whole[:, :, 140:], rtol=1e-12, atol=1e-15)


def test_weights_refuse_a_result_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, q, k, v, _ = _call("causal", 70, 150)
    kernel = attndsl.compile(spec, target="numpy")
    monkeypatch.setattr(kernel_module, "WEIGHTS_LIMIT", 2**20)
    with pytest.raises(ValueError, match=r"would take .* GiB .*rows=range\(0, \d+\)"):
        kernel.weights(q, k, v)
    kernel.weights(q, k, v, rows=range(3))  # the hint's size fits
    with pytest.raises(ValueError, match="rows: expected query row indices"):
        kernel.weights(q, k, v, rows=[70])
