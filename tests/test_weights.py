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
    monkeypatch.setattr(kernel_module, "WEIGHTS_LIMIT", 2**19)  # under the result's 656 KiB
    with pytest.raises(ValueError, match=r"would take .* GiB .*rows=range\(0, (\d+)\)"):
        kernel.weights(q, k, v)
    try:
        kernel.weights(q, k, v)
    except ValueError as e:
        fit = int(str(e).split("rows=range(0, ")[1].split(")")[0])
    assert fit > 1
    kernel.weights(q, k, v, rows=range(fit))  # the hint's size fits
    kernel.weights(q, k, v, heads=[0])  # so does the other hint
    with pytest.raises(ValueError, match="rows: expected query row indices"):
        kernel.weights(q, k, v, rows=[70])
    with pytest.raises(ValueError, match="heads: expected query head indices in 0..3"):
        kernel.weights(q, k, v, heads=4)
    with pytest.raises(ValueError, match="heads: expected a non-empty list of query heads"):
        kernel.weights(q, k, v, heads=[])


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_weights_of_some_heads_in_blocks_under_the_limit(target: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """heads= picks query heads (GQA: heads 1 and 3 read kv heads 0 and 1; ALiBi reads h); a
    limit that fits only a few query rows at a time splits the rows into blocks, same result."""
    spec, q, k, v, extra = _call("alibi", 70, 70)
    kernel = attndsl.compile(spec, target=target)
    whole = kernel.weights(q, k, v, **extra)
    picked = kernel.weights(q, k, v, heads=[3, 1], rows=slice(60, 10, -7), **extra)
    # a block's GEMMs may round differently from the whole matrix's: same to the last bits
    close = {"rtol": 1e-12, "atol": 1e-15}
    np.testing.assert_allclose(picked, whole[:, [3, 1]][:, :, 60:10:-7], **close)
    np.testing.assert_allclose(kernel.weights(q, k, v, heads=5, **extra), whole[:, 5:6], **close)
    item, B, H, KV, n = 8, 2, q.shape[1], k.shape[1], 70
    result = B * 2 * n * n * item
    # room for the result, the identity and 9 query rows of the forward over all heads
    monkeypatch.setattr(kernel_module, "WEIGHTS_LIMIT", result + B * KV * n * n * item
                        + 9 * B * H * n * item)
    calls: list[int] = []
    forward = kernel.forward
    monkeypatch.setattr(kernel, "forward", lambda q_, *a, **kw: calls.append(q_.shape[2])
                        or forward(q_, *a, **kw))
    blocks = kernel.weights(q, k, v, heads=[0, 7], **extra)
    np.testing.assert_allclose(blocks, whole[:, [0, 7]], **close)
    assert max(calls) == 9 and sum(calls) == n


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_weights_of_many_keys_in_column_blocks(target: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A limit far under the n_k x n_k identity (what long sequences meet: n_k = 20000 and 8
    kv heads make a 12 GiB identity) still gives one row's weights, and the whole matrix, in
    column blocks of the identity: the same weights, and the hint's rows= is always enough."""
    spec, q, k, v, extra = _call("alibi", 70, 150)
    kernel = attndsl.compile(spec, target=target)
    whole = kernel.weights(q, k, v, **extra)
    item, B, H, KV, n_k = 8, 2, q.shape[1], k.shape[1], 150
    identity = B * KV * n_k * n_k * item
    monkeypatch.setattr(kernel_module, "WEIGHTS_LIMIT", identity // 10 + B * H * 70 * n_k * item)
    widths: list[int] = []
    forward = kernel.forward
    monkeypatch.setattr(kernel, "forward", lambda q_, k_, v_, **kw: widths.append(v_.shape[3])
                        or forward(q_, k_, v_, **kw))
    close = {"rtol": 1e-12, "atol": 1e-15}
    np.testing.assert_allclose(kernel.weights(q, k, v, **extra), whole, **close)
    assert 1 < max(widths) < n_k  # several column blocks of the identity
    monkeypatch.setattr(kernel_module, "WEIGHTS_LIMIT", B * H * 12 * n_k * item)  # 12 rows
    with pytest.raises(ValueError, match=r"rows=range\(0, (\d+)\)") as err:
        kernel.weights(q, k, v, **extra)
    fit = int(str(err.value).split("rows=range(0, ")[1].split(")")[0])
    np.testing.assert_allclose(kernel.weights(q, k, v, rows=range(fit), **extra),
                               whole[:, :, :fit], **close)
    np.testing.assert_allclose(kernel.weights(q, k, v, rows=[69], heads=[7], **extra),
                               whole[:, 7:8, 69:70], **close)
