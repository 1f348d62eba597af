"""Issue 12 item 5: rows of a partly allowed tile found by scanning (`plan.convex_rows`).

When the mask is one linear atom or an And of them, the keys it allows a query row are one run
[j_lo, j_hi) of every tile. The cpu forward then finds the run of each row of a partly allowed
tile (a scan from the left, a binary search for its end) and computes its pairs without a mask
test; the pairs outside it are written masked.

The runs also bound the GEMMs of such a tile when the keys are packed for micro_gemm
(`micro_gemm_band`): each strip of rows computes the panels of scores its runs reach, and sums
the products of P (and dS) over its runs only, forward and backward.

Checked here: which plans take the scan; the generated kernels have it, and the banded GEMMs,
only for them; forward and every gradient against the NumPy reference with masks whose runs
start and end inside a tile, have slopes other than 1, and are empty for whole rows (in float64
and float32, GQA, positions offset, sizes that are not multiples of any tile, several tiles
forced through ATTNDSL_CPU_TILES, the keys transposed and packed), and huge logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attndsl
from attndsl.codegen import numba_cpu
from attndsl.plan import make_plan
from tests.cpu_helpers import compile_pairs, qkv_dout

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("error::numba.core.errors.NumbaWarning")]

SPECS = {
    # the GEMM writes the logits, the scan only masks them (the fold path)
    "band": """attention band {
    score q . k
    scale 1 / sqrt(d)
    mask  2 * j <= i + 3 and 3 * j >= i - 40 and j > 20
}""",
    # a logit computed per pair (bias): the band's pairs get it, the others -inf
    "band_bias": """attention band_bias {
    param slope[heads]
    score q . k
    bias  slope[h] * (j - i)
    mask  j <= i and i - j < 37
}""",
    # a normalizer other than softmax: the pairs outside the run get weight 0 (`keep`)
    "band_sigmoid": """attention band_sigmoid {
    score     q . k
    scale     1 / sqrt(d)
    normalize sigmoid(s)
    mask      j >= i - 5 and j <= i + 7
}""",
}
NOT_CONVEX = {
    "or": "attention o { index prefix[1]\n score q . k\n mask j <= i or j < prefix[0] }",
    "document": "attention d { index doc[n]\n score q . k\n mask doc[i] == doc[j] }",
    "not equal": "attention e { score q . k\n mask j != i }",
    "blocks": "attention w { score q . k\n mask abs(i // 16 - j // 16) <= 2 }",
    "none": "attention f { score q . k }",
}
TOL = {np.float64: 1e-10, np.float32: 3e-5}  # relative to the largest reference value
TILES = ["off", "16x32", "64x256", "128x128"]
KEYS = ["transposed", "packed"]  # packed: the GEMMs run by micro_gemm (banded on these tiles)
WIDTHS = {"transposed": {}, "packed": {"d": 16, "dv": 32}}  # packed: whole panels of features,
# so every product (P @ v and the adjoints' too) runs by micro_gemm, not only the scores


@pytest.fixture(scope="module")
def kernels() -> dict[str, tuple[Any, Any]]:
    return compile_pairs(SPECS, lambda name, plan: plan.convex_rows)


def test_which_plans_scan_their_rows() -> None:
    for name in ("causal", "sliding_window", "alibi"):
        assert make_plan(attndsl.load(f"examples/{name}.attn")).convex_rows, name
    for name, text in NOT_CONVEX.items():
        assert not make_plan(attndsl.parse(text)).convex_rows, name
    for text in SPECS.values():
        source = numba_cpu.emit_source(attndsl.parse(text))
        forward = source[source.index("def _attn_fwd("):source.index("def _attn_decode(")]
        assert "j_lo = nk" in forward
        assert forward.count("micro_gemm_band(") == 2  # scores and P @ v
        backward = source[source.index("def _attn_bwd("):]
        assert backward.count("j_lo = nk") == 1  # the runs, found once per tile for its GEMMs
        assert backward.count("micro_gemm_band(") == 5  # S, dP, dV, dk, dq
        # ... while its pair loops keep their per-pair mask test (banded, they ran 1-12% slower)
        assert "if not (" in backward
    for text in NOT_CONVEX.values():
        source = numba_cpu.emit_source(attndsl.parse(text))
        assert "j_lo" not in source and "micro_gemm_band(" not in source


def _compare(kernels: dict[str, tuple[Any, Any]], name: str, q: np.ndarray, k: np.ndarray,
             v: np.ndarray, dout: np.ndarray, **kw: Any) -> None:
    cpu, ref = kernels[name]
    dtype = q.dtype.type
    if name == "band_bias":
        kw["slope"] = np.linspace(-0.5, 0.5, q.shape[1]).astype(dtype)
    out, lse = cpu.forward(q, k, v, return_lse=True, **kw)
    want, want_lse = ref.forward(q, k, v, return_lse=True, **kw)
    got, grads = cpu.backward(q, k, v, dout, **kw), ref.backward(q, k, v, dout, **kw)
    assert set(got) == set(grads)
    pairs = [("out", out, want), ("lse", lse, want_lse)]
    for label, g, w in pairs + [(f"d{x}", got[x], grads[x]) for x in grads]:
        if w is None:
            assert g is None, label
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (name, label)
        finite = np.isfinite(w)
        assert np.array_equal(finite, np.isfinite(g)), (name, label)
        assert np.array_equal(g[~finite], w[~finite]), (name, label)  # lse -inf of empty rows
        tol = TOL[dtype] * max(1.0, float(np.abs(w[finite]).max(initial=0)))
        np.testing.assert_allclose(g[finite], w[finite], rtol=0, atol=tol,
                                   err_msg=f"{name} {label}")


@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_scanned_rows_match_reference(kernels, name: str, dtype: type, tiles: str, keys: str,
                                      monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """GQA (4 heads on 2), n_q = 150, n_k = 301 (no tile divides them); `band` leaves its
    first rows and many tiles' rows without a key (j > 20 and 2 j <= i + 3), and its runs
    start and end inside tiles at slopes 1/2 and 1/3. At 16 x 32 its first key tile is partly
    allowed by each atom but by none of their And on the first query tile: fitted, it has
    status 0, which the forward once took for a tile to compute unmasked (rows 0..15 had
    output where the reference has 0)."""
    monkeypatch.setenv("ATTNDSL_CPU_TILES", tiles)
    monkeypatch.setenv("ATTNDSL_CPU_KEYS", keys)
    _compare(kernels, name, *qkv_dout(150, 301, dtype, **WIDTHS[keys]))
    if name == "band":
        out = kernels[name][0](*qkv_dout(150, 301, dtype)[:3])
        assert np.all(out[:, :, :38] == 0)  # rows i < 38: 2 j <= i + 3 leaves no j > 20


@pytest.mark.parametrize("name", sorted(SPECS))
def test_scanned_rows_with_offsets_and_mqa(kernels, name: str,
                                           monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A block of queries at positions 200.. against keys at 0..: the runs move with the
    offsets (`pi`, `pj`), not with the rows; 3 query heads on one key/value head."""
    monkeypatch.setenv("ATTNDSL_CPU_TILES", "32x64")
    for keys in KEYS:
        monkeypatch.setenv("ATTNDSL_CPU_KEYS", keys)
        q, k, v, dout = qkv_dout(90, 330, np.float64, heads=3, kv_heads=1, **WIDTHS[keys])
        _compare(kernels, name, q, k, v, dout, q_offset=200, k_offset=0)


def test_scanned_rows_huge_logits(kernels, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Logits ~1e4 (inputs of size ~45): the softmax must neither overflow nor let a masked
    pair's logit in."""
    monkeypatch.setenv("ATTNDSL_CPU_TILES", "64x128")
    for keys in KEYS:
        monkeypatch.setenv("ATTNDSL_CPU_KEYS", keys)
        for name in ("band", "band_bias"):
            _compare(kernels, name, *qkv_dout(150, 301, np.float64, scale=45.0,
                                              **WIDTHS[keys]))
