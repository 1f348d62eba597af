"""q_offset / k_offset (LANGUAGE.md 6): position i = q_offset + row, j = k_offset + column in
every spec expression; an array axis sized n_q (or n) holds the call's query rows and one sized
n_k its keys.

The reference is checked against its own unshifted result (a block of query rows at their
offset equals those rows of the whole computation: what a KV cache relies on); the cpu kernels
against the reference with offsets that differ per batch, on lengths that cross tiles (64 x
128), so tile skipping and the per-tile mask scan see shifted positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import attndsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DOC = """attention doc_blocks {
    index qdoc[n_q]
    index kdoc[n_k]
    score q . k
    scale 1 / sqrt(d)
    mask  qdoc[i] == kdoc[j] and j <= i
}"""


def _arrays(spec: attndsl.ir.Spec, B: int, H: int, KV: int, n_q: int, n_k: int, d: int = 5,
            dv: int = 3, seed: int = 0) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sizes = {"B": B, "heads": H, "kv_heads": KV, "n_q": n_q, "n_k": n_k, "n": n_q, "d": d,
             "dv": dv, "r": 3}
    extra: dict[str, np.ndarray] = {}
    for p in spec.params:
        extra[p.name] = 0.3 * rng.standard_normal([x if isinstance(x, int) else sizes[x]
                                                   for x in p.dims])
    for x in spec.indices:
        shape = (B, *(n if isinstance(n, int) else sizes[n] for n in x.dims))
        extra[x.name] = np.full(shape, 3) if x.name == "prefix" else np.zeros(shape, np.int64)
    qkvg = [rng.standard_normal(s) for s in
            ((B, H, n_q, d), (B, KV, n_k, d), (B, KV, n_k, dv), (B, H, n_q, dv))]
    return qkvg, extra


def _rows(spec: attndsl.ir.Spec, name: str, a: np.ndarray, rows: slice) -> np.ndarray:
    """The query rows `rows` of an array whose axis after the batch is per query row."""
    p = spec.param(name)
    if name == "q" or name == "dout":
        return a[:, :, rows]
    if p is not None and p.batched and p.dims[1] == "n_q":
        return a[:, rows]
    return a


@pytest.mark.parametrize("name", ["causal", "alibi", "relative_bias", "t5_bucket",
                                  "latent_rope", "sliding_window_sink", "prefix_lm"])
def test_numpy_query_block_at_its_offset_equals_those_rows(name: str) -> None:
    """Rows 5.. computed alone at q_offset = 5 against every key: out, lse and gradients
    equal those rows of the whole computation (the whole run with dout 0 on rows 0..4)."""
    spec = attndsl.load(EXAMPLES / f"{name}.attn")
    H = spec.heads or 4
    KV = spec.kv_heads or 2
    (q, k, v, g), extra = _arrays(spec, 2, H, KV, 9, 9)
    kernel = attndsl.compile(spec, target="numpy")
    out, lse = kernel.forward(q, k, v, return_lse=True, **extra)
    g[:, :, :5] = 0
    want = kernel.backward(q, k, v, g, **extra)
    block = {n: _rows(spec, n, a, slice(5, None)) for n, a in extra.items()}
    got_out, got_lse = kernel.forward(q[:, :, 5:], k, v, return_lse=True, q_offset=5, **block)
    np.testing.assert_allclose(got_out, out[:, :, 5:], rtol=1e-12, atol=1e-12)
    if lse is not None:
        np.testing.assert_allclose(got_lse, lse[:, :, 5:], rtol=1e-12, atol=1e-12)
    got = kernel.backward(q[:, :, 5:], k, v, g[:, :, 5:], q_offset=np.array([5, 5]), **block)
    for n in got:
        np.testing.assert_allclose(got[n], _rows(spec, n, want[n], slice(5, None)),
                                   rtol=1e-10, atol=1e-12, err_msg=n)
    if name != "causal":
        return
    # and the offset is not ignored: the same block at position 0 differs
    assert np.abs(kernel.forward(q[:, :, 5:], k, v) - got_out).max() > 1e-3


@pytest.mark.parametrize("name", ["document", "forgetting"])
def test_numpy_one_sequence_specs_shift_both_sides(name: str) -> None:
    """Specs using n read one sequence: q_offset == k_offset, and a shift of both leaves a
    translation-invariant spec unchanged."""
    spec = attndsl.load(EXAMPLES / f"{name}.attn")
    (q, k, v, _), extra = _arrays(spec, 2, 2, 2, 9, 9)
    kernel = attndsl.compile(spec, target="numpy")
    np.testing.assert_allclose(kernel.forward(q, k, v, q_offset=7, k_offset=7, **extra),
                               kernel.forward(q, k, v, **extra), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="q_offset == k_offset"):
        kernel.forward(q, k, v, q_offset=7, **extra)


@pytest.fixture(scope="module")
def doc_arrays():  # type: ignore[no-untyped-def]
    spec = attndsl.parse(DOC)
    (q, k, v, g), extra = _arrays(spec, 2, 4, 2, 70, 300, d=8, dv=5, seed=3)
    rng = np.random.default_rng(4)
    offsets = {"q_offset": np.array([200, 131]), "k_offset": np.array([0, 5])}
    # documents of random lengths over the global positions 0..400
    bounds = np.sort(rng.choice(np.arange(1, 400), 6, replace=False))
    doc_of = np.searchsorted(bounds, np.arange(400), side="right")
    extra["qdoc"] = np.stack([doc_of[o:o + 70] for o in offsets["q_offset"]])
    extra["kdoc"] = np.stack([doc_of[o:o + 300] for o in offsets["k_offset"]])
    return spec, (q, k, v, g), extra, offsets


@pytest.mark.parametrize("name", ["causal", "sliding_window_sink", "relative_bias", "doc"])
def test_cpu_offsets_agree_with_numpy_across_tiles(name: str, doc_arrays) -> None:  # type: ignore[no-untyped-def]
    """70 query rows at positions 200.. (batch 0) and 131.. (batch 1) against 300 keys at 0..
    and 5..: the causal and window tiles the cpu kernels skip or scan are the shifted ones."""
    if name == "doc":
        spec, (q, k, v, g), extra, offsets = doc_arrays
    else:
        spec = attndsl.load(EXAMPLES / f"{name}.attn")
        (q, k, v, g), extra = _arrays(spec, 2, 4, 2, 70, 300, d=8, dv=5, seed=1)
        offsets = {"q_offset": np.array([200, 131]), "k_offset": np.array([0, 5])}
    ref = attndsl.compile(spec, target="numpy")
    cpu = attndsl.compile(spec, target="cpu")
    want_out, want_lse = ref.forward(q, k, v, return_lse=True, **offsets, **extra)
    got_out, got_lse = cpu.forward(q, k, v, return_lse=True, **offsets, **extra)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_lse, want_lse, rtol=1e-10, atol=1e-12)
    want = ref.backward(q, k, v, g, **offsets, **extra)
    got = cpu.backward(q, k, v, g, **offsets, **extra)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-9, atol=1e-10, err_msg=n)
    unshifted = ref.forward(q, k, v, **extra)
    assert np.abs(unshifted - want_out).max() > 1e-3  # the offsets matter here


def test_offset_errors_name_the_argument() -> None:
    spec = attndsl.load(EXAMPLES / "causal.attn")
    (q, k, v, _), _ = _arrays(spec, 2, 2, 2, 5, 5)
    kernel = attndsl.compile(spec, target="numpy")
    with pytest.raises(ValueError, match=r"q_offset: expected an integer or shape \[2\]"):
        kernel.forward(q, k, v, q_offset=np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="k_offset: expected an integer"):
        kernel.forward(q, k, v, k_offset=1.5)
    with pytest.raises(ValueError, match="q_offset: positions start at 0"):
        kernel.forward(q, k, v, q_offset=-1)


def test_causal_linear_attention_needs_equal_offsets() -> None:
    spec = attndsl.load(EXAMPLES / "causal_linear.attn")
    (q, k, v, _), extra = _arrays(spec, 2, 2, 2, 6, 6)
    cpu = attndsl.compile(spec, target="cpu")
    ref = attndsl.compile(spec, target="numpy")
    np.testing.assert_allclose(cpu.forward(q, k, v, q_offset=3, k_offset=3, **extra),
                               ref.forward(q, k, v, q_offset=3, k_offset=3, **extra),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="needs q_offset == k_offset"):
        cpu.forward(q, k, v, q_offset=3, **extra)
