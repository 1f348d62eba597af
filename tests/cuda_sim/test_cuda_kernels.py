"""Generated CUDA kernels (attndsl.compile(spec, target="cuda")) under Numba's CUDA simulator,
forward and backward, against the NumPy reference target on tiny shapes with odd sizes.

Tiles are 4-8 here (the simulator runs every thread as a Python thread); production tiles are
a parameter of compile_kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

import attndsl
from attndsl.codegen import cuda_toolchain as tc
from attndsl.runtime.cuda_kernel import compile_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared NaN cases
import nan_cases

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.attn"))
TOL = {np.float64: {"rtol": 1e-10, "atol": 1e-10}, np.float32: {"rtol": 1e-4, "atol": 1e-4}}


def make_inputs(spec, dtype, n_q, n_k, d, dv=3, heads=2, kv_heads=1, B=1, r=4, seed=0):
    rng = np.random.default_rng(seed)
    H = spec.heads or heads
    KV = spec.kv_heads or spec.heads or kv_heads
    if spec.kv_heads is None and spec.heads is None:
        KV = kv_heads
    q = rng.standard_normal((B, H, n_q, d)).astype(dtype)
    k = rng.standard_normal((B, KV, n_k, d)).astype(dtype)
    v = rng.standard_normal((B, KV, n_k, dv)).astype(dtype)
    dout = rng.standard_normal((B, H, n_q, dv)).astype(dtype)
    sizes = {"B": B, "heads": H, "kv_heads": KV, "d": d, "dv": dv, "n_q": n_q, "n_k": n_k, "n": n_q,
             "r": r}
    extra = {}
    for p in spec.params:
        shape = [sizes[x] if isinstance(x, str) else x for x in p.dims]
        extra[p.name] = (0.5 * rng.standard_normal(shape)).astype(dtype) if shape else 0.7
    for x in spec.indices:
        shape = [B] + [sizes[s] if isinstance(s, str) else s for s in x.dims]
        extra[x.name] = np.sort(rng.integers(0, 3, shape), axis=-1)
    return q, k, v, dout, extra


def shape_for(index: int, spec) -> tuple[int, int, int]:
    n_q, n_k, d = 5 + (index * 3) % 7, 7 + (index * 5) % 7, 3 + index % 3
    if "n" in {dim for decl in (*spec.params, *spec.indices) for dim in decl.dims} or (
            "n " in spec.source or "n)" in spec.source):
        n_k = n_q
    return n_q, n_k, d


def check_against_reference(spec, dtype, n_q, n_k, d, tiles, **kw):
    q, k, v, dout, extra = make_inputs(spec, dtype, n_q, n_k, d, **kw)
    ref = attndsl.compile(spec, target="numpy")
    kernel = compile_kernel(spec, tiles=tiles)
    out, lse = kernel.forward(q, k, v, return_lse=True, **extra)
    want_out, want_lse = ref.forward(q, k, v, return_lse=True, **extra)
    assert out.dtype == dtype and out.shape == want_out.shape
    np.testing.assert_allclose(out, want_out, **TOL[dtype])
    if want_lse is None:
        assert lse is None
    else:
        np.testing.assert_allclose(lse, want_lse, **TOL[dtype])
    grads = kernel.backward(q, k, v, dout, out=out, lse=lse, **extra)
    want = ref.backward(q, k, v, dout, **extra)
    assert sorted(grads) == sorted(want)
    for name in want:
        assert grads[name].dtype == want[name].dtype, name
        assert grads[name].shape == want[name].shape, name
        np.testing.assert_allclose(grads[name], want[name], err_msg=name, **TOL[dtype])
    return out, lse, grads


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_float64(path):
    spec = attndsl.load(path)
    index = EXAMPLES.index(path)
    check_against_reference(spec, np.float64, *shape_for(index, spec), tiles=(4, 4, 4, 4))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_float32_uneven_tiles(path):
    spec = attndsl.load(path)
    index = EXAMPLES.index(path) + 1
    check_against_reference(spec, np.float32, *shape_for(index, spec), tiles=(8, 4, 4, 8))


@pytest.mark.parametrize("name", ["causal", "alibi", "bahdanau", "relative_bias"])
def test_gqa_four_heads_two_kv_heads(name):
    text = Path(EXAMPLES[0].parent / f"{name}.attn").read_text()
    text = "\n".join(line for line in text.splitlines()
                     if not line.strip().startswith(("heads", "kv_heads")))
    spec = attndsl.parse(text)
    check_against_reference(spec, np.float64, 9, 6, 4, tiles=(4, 4, 4, 4), heads=4,
                            kv_heads=2)


EMPTY_ROWS = """
attention keep_some {
    index keep[n_k]
    score q . k
    mask  keep[j] == 1 and j <= i + 1
}
"""


@pytest.mark.parametrize("norm", ["softmax", "sum", "sigmoid"])
def test_rows_with_every_key_masked(norm):
    # keep = 0 everywhere: every row is empty -> out = 0, lse = -inf, zero gradients
    text = EMPTY_ROWS.replace("score q . k", f"score q . k\n    normalize {norm}") if \
        norm != "sum" else EMPTY_ROWS.replace("score q . k", "score (elu(q) + 1) . (elu(k) + 1)"
                                              "\n    normalize sum")
    spec = attndsl.parse(text)
    kernel = compile_kernel(spec, tiles=(4, 4, 4, 4))
    ref = attndsl.compile(spec, target="numpy")
    q, k, v, dout, _ = make_inputs(spec, np.float64, 7, 9, 3)
    for keep in (np.zeros((1, 9), np.int64), (np.arange(9)[None] % 3 == 2).astype(np.int64)):
        out, lse = kernel.forward(q, k, v, return_lse=True, keep=keep)
        want_out, want_lse = ref.forward(q, k, v, return_lse=True, keep=keep)
        np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-12)
        if norm == "softmax":
            np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
            np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)])
        grads = kernel.backward(q, k, v, dout, keep=keep)
        want = ref.backward(q, k, v, dout, keep=keep)
        for name in ("q", "k", "v"):
            np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-12)
        if not keep.any():
            assert np.all(out == 0) and all(np.all(grads[n] == 0) for n in "qkv")
            if norm == "softmax":
                assert np.all(lse == -np.inf)


def test_out_of_range_subscript_raises_before_launch():
    spec = attndsl.parse("""
attention shifted {
    param table[heads, 9]
    score q . k
    bias  table[h, j - i + 4]
}
""")
    kernel = compile_kernel(spec, tiles=(4, 4, 4, 4))
    q, k, v, _, extra = make_inputs(spec, np.float64, 5, 5, 3)
    kernel.forward(q, k, v, **extra)  # j - i + 4 in [0, 8]: fine
    q2, k2, v2, _, extra2 = make_inputs(spec, np.float64, 5, 7, 3)
    with pytest.raises(ValueError, match="'table'"):
        kernel.forward(q2, k2, v2, **extra2)  # j - i + 4 reaches 10


def test_out_of_range_index_value_raises():
    spec = attndsl.parse("""
attention docs {
    index doc[n]
    param db[4]
    score q . k
    bias  db[doc[j]]
}
""")
    kernel = compile_kernel(spec, tiles=(4, 4, 4, 4))
    q, k, v, _, extra = make_inputs(spec, np.float64, 6, 6, 3)
    extra["doc"] = np.array([[0, 1, 2, 3, 3, 1]])
    check_against_reference(spec, np.float64, 6, 6, 3, tiles=(4, 4, 4, 4))
    kernel.forward(q, k, v, **extra)
    extra["doc"] = np.array([[0, 1, 2, 3, 4, 1]])
    with pytest.raises(ValueError, match="'db'"):
        kernel.forward(q, k, v, **extra)


def test_key_side_param_lookup_gradient():
    # a param read at a key-side subscript: its gradient comes from the dK/dV kernel
    spec = attndsl.parse("""
attention key_bias {
    param kb[n_k]
    param qb[n_q]
    score q . k
    bias  kb[j] - 0.5 * qb[i]
    mask  j <= i + 2
}
""")
    check_against_reference(spec, np.float64, 7, 9, 3, tiles=(4, 4, 4, 4))


def test_validation_errors_match_other_targets():
    kernel = compile_kernel(attndsl.load(EXAMPLES[0]), tiles=(4, 4, 4, 4))
    q = np.zeros((1, 8, 5, 3))
    with pytest.raises(ValueError, match="k: expected"):
        kernel.forward(q, np.zeros((1, 2, 5, 4)), np.zeros((1, 2, 5, 3)), slope=np.zeros(8))
    with pytest.raises(TypeError, match="missing argument slope"):
        kernel.forward(q, np.zeros((1, 2, 5, 3)), np.zeros((1, 2, 5, 3)))


@pytest.mark.parametrize("name", ["causal", "bahdanau"])
def test_device_arrays_in_device_arrays_out(name):
    from numba import cuda

    spec = attndsl.load(EXAMPLES[0].parent / f"{name}.attn")
    kernel = compile_kernel(spec, tiles=(4, 4, 4, 4))
    ref = attndsl.compile(spec, target="numpy")
    q, k, v, dout, extra = make_inputs(spec, np.float64, 6, 7, 3)
    dq_, dk_, dv_, ddo = (cuda.to_device(a) for a in (q, k, v, dout))
    out, lse = kernel.forward(dq_, dk_, dv_, return_lse=True, **extra)
    assert tc.is_device_array(out) and tc.is_device_array(lse)
    want_out, _ = ref.forward(q, k, v, return_lse=True, **extra)
    np.testing.assert_allclose(out.copy_to_host(), want_out, rtol=1e-10, atol=1e-12)
    grads = kernel.backward(dq_, dk_, dv_, ddo, out=out, lse=lse, **extra)
    want = ref.backward(q, k, v, dout, **extra)
    for n in want:
        assert tc.is_device_array(grads[n]), n
        np.testing.assert_allclose(grads[n].copy_to_host(), want[n], rtol=1e-10, atol=1e-12)


def test_attndsl_compile_cuda_target():
    kernel = attndsl.compile(EXAMPLES[0].parent / "causal.attn", target="cuda")
    assert kernel.target == "cuda"
    assert "def attn_fwd(" in kernel.source and "def attn_bwd_dkdv(" in kernel.source


# ---- the linear-attention path (associative form) ----------------------------------------------

LINEAR_SPECS = {
    "raw_causal_none": "attention raw {\n score q . k\n normalize none\n mask j <= i\n}",
    "raw_full_none": "attention raw2 {\n score q . k\n normalize none\n}",
}


@pytest.mark.parametrize("text", [str(EXAMPLES[0].parent / f"{name}.attn")
                                  for name in ("linear", "causal_linear")]
                         + list(LINEAR_SPECS.values()),
                         ids=["linear", "causal_linear", *LINEAR_SPECS])
@pytest.mark.parametrize("nq, nk", [(5, 7), (9, 4)])
def test_linear_path_matches_reference_with_gqa(text: str, nq: int, nk: int) -> None:
    """The O(n) kernels (prefix sums forward, suffix sums backward) against the reference:
    GQA (4 query heads on 2 key/value heads), n_q < n_k and n_q > n_k, float64."""
    import attndsl

    reference = attndsl.compile(text, target="numpy")
    kernel = attndsl.compile(text, target="cuda")
    assert kernel.plan.linear_path
    rng = np.random.default_rng(nq * 10 + nk)
    q = rng.standard_normal((2, 4, nq, 3))
    k = rng.standard_normal((2, 2, nk, 3))
    v = rng.standard_normal((2, 2, nk, 5))
    np.testing.assert_allclose(kernel(q, k, v), reference(q, k, v), atol=1e-10, rtol=0)
    G = rng.standard_normal((2, 4, nq, 5))
    want, got = reference.backward(q, k, v, G), kernel.backward(q, k, v, G)
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-10, rtol=0, err_msg=name)


ITEM1_SPECS = {
    "normalize": """
attention sbg {
    heads 4
    kv_heads 2
    param sb[heads]
    param gamma
    score q . k
    mask j <= i + 2
    normalize relu(s + sb[h]) * gamma + softplus(s) * sb[h] ^ 2
}
""",
    "every_clause": """
attention every {
    heads 4
    kv_heads 2
    param w[d]
    param tau
    param slope[heads]
    param cap
    score sum(w * q * k)
    scale 1 / tau
    bias slope[h] * (j - i)
    softcap cap
    mask j <= i + 2
}
""",
}


@pytest.mark.parametrize("name", list(ITEM1_SPECS))
def test_item1_param_gradients_in_every_clause(name):
    # the reference's param gradients are checked against finite differences in test_grad.py
    spec = attndsl.parse(ITEM1_SPECS[name])
    _, _, grads = check_against_reference(spec, np.float64, 5, 7, 3, tiles=(4, 4, 4, 4), B=2)
    assert all(np.abs(grads[p.name]).max() > 1e-3 for p in spec.params)


# ---- issue 8 item 3: the NaN policy (tests/nan_cases.py) ------------------------------------


@pytest.fixture(scope="module")
def nan_kernels():
    return {source: (compile_kernel(attndsl.parse(source), tiles=(4, 4, 4, 4)),
                     attndsl.compile(source, target="numpy"))
            for source in (nan_cases.CAUSAL, nan_cases.HAZARDS)}


def _nan_case(kernels, source, case, n_q, n_k):
    cuda, ref = kernels[source]
    heads = nan_cases.HAZARD_HEADS if source == nan_cases.HAZARDS else {}
    clean = nan_cases.make(source, n_q, n_k, **heads)
    poisoned = clean.copy()
    expect = case(poisoned)
    got = nan_cases.run(cuda, poisoned)
    want = nan_cases.run(ref, poisoned)
    if getattr(case, "forward_only", False):
        got, want = ({n: r[n] for n in ("out", "lse")} for r in (got, want))
    nan_cases.assert_same(got, want, **TOL[np.float64])
    expect(got, nan_cases.run(cuda, clean))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # simulator threads: no errstate
@pytest.mark.parametrize("case", nan_cases.CAUSAL_CASES, ids=lambda c: c.__name__)
def test_item3_causal_nan_policy_cuda(nan_kernels, case):
    """13 x 13 causal, GQA, 4 x 4 tiles: NaN where numpy has it; keys masked for rows of the
    same tile leave those rows as on clean data."""
    _nan_case(nan_kernels, nan_cases.CAUSAL, case, 13, 13)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # simulator threads: no errstate
@pytest.mark.parametrize("case", nan_cases.HAZARD_CASES, ids=lambda c: c.__name__)
def test_item3_where_branches_nan_policy_cuda(nan_kernels, case):
    _nan_case(nan_kernels, nan_cases.HAZARDS, case, 7, 11)
