"""q_offset / k_offset on the cuda target (simulator, tiles that split every length): out,
lse and every gradient equal the reference's with offsets that differ per batch, for masks
decided from tile corners (causal, window), a per-tile scan (documents) and lookups at
shifted positions (relative table, per-side arrays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

import attndsl
from attndsl.runtime.cuda_kernel import compile_kernel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TILES = (4, 8, 4, 8)
B, HEADS, KV, N_Q, N_K, D, DV = 2, 4, 2, 7, 19, 5, 3
OFFSETS = {"q_offset": np.array([12, 5]), "k_offset": np.array([0, 2])}
DOC = """attention doc_blocks {
    index qdoc[n_q]
    index kdoc[n_k]
    score q . k
    mask  qdoc[i] == kdoc[j] and j <= i
}"""


@pytest.mark.parametrize("name", ["causal", "sliding_window_sink", "relative_bias", "doc"])
def test_cuda_offsets_agree_with_numpy(name: str) -> None:
    spec = attndsl.parse(DOC) if name == "doc" else attndsl.load(EXAMPLES / f"{name}.attn")
    rng = np.random.default_rng(2)
    q, k, v, g = (rng.standard_normal(s) for s in ((B, HEADS, N_Q, D), (B, KV, N_K, D),
                                                   (B, KV, N_K, DV), (B, HEADS, N_Q, DV)))
    extra: dict[str, np.ndarray] = {}
    for p in spec.params:
        extra[p.name] = 0.3 * rng.standard_normal([x if isinstance(x, int) else HEADS
                                                   for x in p.dims])
    if name == "doc":  # documents over positions 0..29 with borders at 4, 9 and 15
        doc_of = np.searchsorted([4, 9, 15], np.arange(30), side="right")
        extra["qdoc"] = np.stack([doc_of[o:o + N_Q] for o in OFFSETS["q_offset"]])
        extra["kdoc"] = np.stack([doc_of[o:o + N_K] for o in OFFSETS["k_offset"]])
    ref = attndsl.compile(spec, target="numpy")
    cuda = compile_kernel(spec, tiles=TILES)
    want_out, want_lse = ref.forward(q, k, v, return_lse=True, **OFFSETS, **extra)
    got_out, got_lse = cuda.forward(q, k, v, return_lse=True, **OFFSETS, **extra)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_lse, want_lse, rtol=1e-10, atol=1e-12)
    want = ref.backward(q, k, v, g, **OFFSETS, **extra)
    got = cuda.backward(q, k, v, g, **OFFSETS, **extra)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-9, atol=1e-10, err_msg=n)
    assert np.abs(ref.forward(q, k, v, **extra) - want_out).max() > 1e-3


def test_cuda_offsets_with_device_arrays() -> None:
    """Device arrays in: the offsets are validated on the host like the rest (a KV-cache block
    of 3 query rows at position 16 against 19 keys)."""
    from numba import cuda

    spec = attndsl.load(EXAMPLES / "causal.attn")
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s) for s in ((1, 2, 3, D), (1, 2, N_K, D),
                                                (1, 2, N_K, DV)))
    kernel = compile_kernel(spec, tiles=TILES)
    out = kernel.forward(*(cuda.to_device(a) for a in (q, k, v)), q_offset=16)
    want = attndsl.compile(spec, target="numpy").forward(q, k, v, q_offset=16)
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="q_offset: positions start at 0"):
        kernel.forward(*(cuda.to_device(a) for a in (q, k, v)), q_offset=-2)


def test_cuda_weights_are_its_own_p() -> None:
    """Kernel.weights on the cuda target: its forward with v = the identity (DV = n_k) gives
    the reference's weights, rows picked in blocks at their offsets."""
    spec = attndsl.load(EXAMPLES / "sliding_window_sink.attn")
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal(s) for s in ((1, 2, 9, D), (1, 2, 9, D), (1, 2, 9, DV)))
    sink = rng.standard_normal(2)
    want = attndsl.compile(spec, target="numpy").weights(q, k, v, sink=sink)
    got = compile_kernel(spec, tiles=TILES).weights(q, k, v, rows=[8, 2, 3], sink=sink)
    np.testing.assert_allclose(got, want[:, :, [8, 2, 3]], rtol=1e-10, atol=1e-14)
