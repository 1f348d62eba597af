"""Issue 8 regressions on the cpu target against the NumPy reference (and finite differences):
GQA feature-loop adjoints (item 2), size names in param subscripts (item 5), a given out= /
lse= trusted alike on every target (item 6), call-time checks (item 11), no Numba warnings
(item 12), index arrays shared by the batch (section 3), pair reductions nested inside a
feature loop's body (found by the differential fuzzer; specs in tests/nested_specs.py).

Every kernel is compiled once per module (float64, tiny odd shapes); the CUDA side of the same
checks is in tests/cuda_sim/test_cuda_kernels.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nested_specs
import numpy as np
import pytest

import attndsl

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

FEATURE_LOOPS = {  # pair bodies that are not a plain dot product: explicit feature loops
    "l2": "attention l2 {\n    score -sum((q - k) ^ 2)\n}",
    "qkk": "attention qkk {\n    score sum(q * k * k)\n}",
}

# Every size name in the subscripts of row-level and pair-level param lookups.
SIZES = """attention sizes {
    param qr[n_q]
    param kr[n]
    param pe[n_k, d]
    param hb[heads]
    param kb[kv_heads]
    param c[dv]
    param dd[d]
    score (q * qr[n_q - 1 - i]) . (k * kr[n - 1 - j] + pe[n_k - 1 - j])
    bias  hb[heads - 1 - h] + kb[kv_heads - 1] + c[dv - 1] + dd[d - 1]
}"""


class Compiled:
    """(cpu, numpy) kernels per spec text, built once per module."""

    def __init__(self) -> None:
        self.kernels: dict[str, tuple[Any, Any]] = {}

    def __call__(self, text: str) -> tuple[Any, Any]:
        if text not in self.kernels:
            spec = attndsl.parse(text)
            self.kernels[text] = (attndsl.compile(spec, target="cpu"),
                                  attndsl.compile(spec, target="numpy"))
        return self.kernels[text]


@pytest.fixture(scope="module")
def compiled() -> Compiled:
    return Compiled()


def _qkv(heads: int, kv_heads: int, n_q: int, n_k: int, d: int = 5, dv: int = 3, B: int = 1,
         seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, heads, n_q, d)), rng.standard_normal((B, kv_heads, n_k, d)),
            rng.standard_normal((B, kv_heads, n_k, dv)), rng.standard_normal((B, heads, n_q, dv)))


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    assert sorted(a) == sorted(b)
    return {n: float(np.max(np.abs(a[n] - b[n]))) for n in a}


def _fd_check(ref: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, G: np.ndarray,
              extra: dict[str, np.ndarray], grads: dict[str, np.ndarray], name: str,
              picks: int = 6) -> None:
    """Central differences of sum(out * G) at a few entries of `name`."""
    arrays = {"q": q, "k": k, "v": v, **extra}
    rng = np.random.default_rng(1)
    base = arrays[name]
    for flat in rng.choice(base.size, size=min(picks, base.size), replace=False):
        idx = np.unravel_index(flat, base.shape)
        vals = []
        for step in (1e-6, -1e-6):
            moved = dict(arrays)
            moved[name] = base.copy()
            moved[name][idx] += step
            vals.append(float(np.sum(ref(moved["q"], moved["k"], moved["v"], **{
                n: moved[n] for n in extra}) * G)))
        fd = (vals[0] - vals[1]) / 2e-6
        assert abs(fd - grads[name][idx]) <= 1e-6 * max(1.0, abs(fd)), (name, idx, fd,
                                                                          grads[name][idx])


# ---- item 2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("name", sorted(FEATURE_LOOPS))
def test_item2_cpu_dk_gqa_feature_loop(name: str, kv_heads: int, compiled: Compiled) -> None:
    """Key-side adjoints of a feature loop are per query head, summed over the group (they
    were written at the kv head: one group got every head's share, the others 0, max error
    7.96 for l2)."""
    cpu, ref = compiled(FEATURE_LOOPS[name])
    q, k, v, G = _qkv(4, kv_heads, 13, 17)
    got, want = cpu.backward(q, k, v, G), ref.backward(q, k, v, G)
    diff = _max_diff(got, want)
    assert max(diff.values()) <= 1e-10 * max(1.0, float(np.abs(want["k"]).max())), diff
    _fd_check(ref, q, k, v, G, {}, want, "k")


# ---- item 5 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_item5_size_names_in_param_subscripts(kv_heads: int, compiled: Compiled) -> None:
    """n, n_q, n_k, d, dv, heads, kv_heads in subscripts: backward defined no size but
    kv_heads where it scatters row-level lookups back (NameError)."""
    cpu, ref = compiled(SIZES)
    n, d, dv = 13, 5, 3
    q, k, v, G = _qkv(4, kv_heads, n, n, d, dv)
    rng = np.random.default_rng(2)
    extra = {"qr": rng.standard_normal(n), "kr": rng.standard_normal(n),
             "pe": rng.standard_normal((n, d)), "hb": rng.standard_normal(4),
             "kb": rng.standard_normal(kv_heads), "c": rng.standard_normal(dv),
             "dd": rng.standard_normal(d)}
    np.testing.assert_allclose(cpu(q, k, v, **extra), ref(q, k, v, **extra), rtol=0, atol=1e-12)
    got, want = cpu.backward(q, k, v, G, **extra), ref.backward(q, k, v, G, **extra)
    diff = _max_diff(got, want)
    assert max(diff.values()) <= 1e-10, diff
    for name in ("qr", "kr", "pe", "kb", "c"):
        assert np.abs(want[name]).max() > 0, name  # each lookup gets a gradient
        _fd_check(ref, q, k, v, G, extra, want, name, picks=3)


# ---- item 6 ---------------------------------------------------------------------------------

GIVEN = {
    "causal": "attention c {\n    score q . k\n    scale 1 / sqrt(d)\n    mask j <= i\n}",
    "linear": "attention lin {\n    score (elu(q) + 1) . (elu(k) + 1)\n    normalize sum\n}",
}


@pytest.mark.parametrize("name", sorted(GIVEN))
def test_item6_given_out_trusted_alike(name: str, compiled: Compiled) -> None:
    """A stale out= (or lse=) in backward: numpy ignored it, cpu used it (dq changed by 6).
    Now both trust what is given (D from out, P from lse) and recompute what is not."""
    cpu, ref = compiled(GIVEN[name])
    q, k, v, G = _qkv(4, 2, 13, 17)
    out, lse = ref.forward(q, k, v, return_lse=True)
    rng = np.random.default_rng(3)
    stale = out + rng.standard_normal(out.shape)
    plain = ref.backward(q, k, v, G)
    cases = {"true": {"out": out, "lse": lse}, "stale out": {"out": stale, "lse": lse},
             "stale out only": {"out": stale}}
    if lse is not None:
        cases["stale lse"] = {"out": out, "lse": lse + 0.3 * rng.standard_normal(lse.shape)}
        cases["stale lse only"] = {"lse": cases["stale lse"]["lse"]}
    for case, given in cases.items():
        want = ref.backward(q, k, v, G, **given)
        diff = _max_diff(cpu.backward(q, k, v, G, **given), want)
        assert max(diff.values()) <= 1e-10, (case, diff)
        moved = max(_max_diff(want, plain).values())
        assert (moved <= 1e-12) if case == "true" else (moved > 0.1), (case, moved)


# ---- item 11 --------------------------------------------------------------------------------

SOFTCAP_PARAM = "attention cap {\n    param cap\n    score q . k\n    softcap cap\n}"
SOFTCAP_HEADS = "attention caph {\n    param cap[heads]\n    score q . k\n    softcap 2 * cap[h]\n}"


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_item11_softcap_param_not_positive(target: str) -> None:
    """cap <= 0 from a param gave uniform attention (0) and d cap = NaN; now a ValueError
    naming the param and the value, raised before any kernel is built or run."""
    q, k, v, G = _qkv(2, 2, 5, 7)
    for text, value, message in (
            (SOFTCAP_PARAM, 0.0, "cap: the softcap must be positive, got 0.0"),
            (SOFTCAP_PARAM, np.float32(-3), "cap: the softcap must be positive, got -3.0"),
            (SOFTCAP_HEADS, np.array([1.0, -0.5]),
             "cap: the softcap must be positive, got -1.0 at h = 1")):
        kernel = attndsl.compile(text, target=target)
        with pytest.raises(ValueError) as info:
            kernel(q, k, v, cap=value)
        assert str(info.value) == message
        with pytest.raises(ValueError) as info:
            kernel.backward(q, k, v, G, cap=value)
        assert str(info.value) == message
        assert not getattr(kernel, "modules", {}), "a kernel was built before the check"
    ok = attndsl.compile(SOFTCAP_HEADS, target="numpy")
    assert np.isfinite(ok(q, k, v, cap=np.array([1.0, 0.5]))).all()


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_item11_zero_heads(target: str) -> None:
    """heads = 0 (or kv_heads = 0) gave ZeroDivisionError; zero-size inputs are refused (as
    every other empty axis already was) with the argument and its shape."""
    kernel = attndsl.compile("attention a {\n    score q . k\n}", target=target)
    z = np.zeros
    with pytest.raises(ValueError, match=r"^q: every size must be at least 1, got shape "
                                         r"\[1, 0, 3, 4\]"):
        kernel(z((1, 0, 3, 4)), z((1, 0, 3, 4)), z((1, 0, 3, 4)))
    with pytest.raises(ValueError, match=r"^k: every size must be at least 1, got shape "
                                         r"\[1, 0, 3, 4\]"):
        kernel(z((1, 2, 3, 4)), z((1, 0, 3, 4)), z((1, 0, 3, 4)))
    with pytest.raises(ValueError, match=r"^v: every size must be at least 1"):
        kernel(z((1, 2, 3, 4)), z((1, 2, 3, 4)), z((1, 2, 3, 0)))


# ---- section 3: index arrays shared by the batch --------------------------------------------


def _doc_inputs(B: int = 3, n: int = 13) -> tuple[np.ndarray, ...]:
    q, k, v, G = _qkv(4, 2, n, n, B=B, seed=5)
    doc = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3][:n], dtype=np.int32)
    return q, k, v, G, doc


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_section3_shared_index_array(target: str) -> None:
    """index doc[n] given as [n] is shared by the B = 3 batch: the same out, lse and gradients
    as the tiled [B, n] array."""
    spec = attndsl.load(EXAMPLES / "document.attn")
    kernel = attndsl.compile(spec, target=target)
    q, k, v, G, doc = _doc_inputs()
    tiled = np.tile(doc, (3, 1))
    assert tiled.shape == (3, 13)
    for given in (doc, doc.astype(np.uint8)):
        out, lse = kernel.forward(q, k, v, return_lse=True, doc=given)
        want_out, want_lse = kernel.forward(q, k, v, return_lse=True, doc=tiled)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(lse, want_lse)
        got, want = kernel.backward(q, k, v, G, doc=given), kernel.backward(q, k, v, G, doc=tiled)
        assert max(_max_diff(got, want).values()) == 0
    # the batch rows differ from a per-batch array that is not the same everywhere
    other = tiled.copy()
    other[1] = 0
    assert not np.array_equal(kernel(q, k, v, doc=other)[1], kernel(q, k, v, doc=doc)[1])


def test_section3_index_shape_errors() -> None:
    """A wrong shape names the argument, the shape got and both shapes accepted."""
    kernel = attndsl.compile(EXAMPLES / "document.attn", target="numpy")
    q, k, v, _, doc = _doc_inputs()
    accepted = "expected shape [B=3, n=13] or [n=13] (shared by the batch)"
    for bad in (doc[:12], np.tile(doc, (2, 1)), np.tile(doc, (3, 1))[..., None]):
        with pytest.raises(ValueError) as info:
            kernel(q, k, v, doc=bad)
        assert str(info.value) == f"doc: {accepted}, got [{', '.join(map(str, bad.shape))}]"
    prefix = attndsl.compile(EXAMPLES / "prefix_lm.attn", target="numpy")
    shared = prefix(q, k, v, prefix=np.array([4]))
    np.testing.assert_array_equal(shared, prefix(q, k, v, prefix=np.full((3, 1), 4)))
    with pytest.raises(ValueError, match=r"^prefix: expected shape \[B=3, 1\] or \[1\] "):
        prefix(q, k, v, prefix=np.array(4))


# ---- nested reductions (the differential fuzzer) -------------------------------------------


@pytest.mark.parametrize("name", sorted(nested_specs.NESTED))
def test_nested_reduction_in_feature_loop_cpu(name: str, compiled: Compiled) -> None:
    """A pair reduction read inside an explicit loop's body: the loop's adjoint flows on into
    it (it was dropped: dq = 0 and dk, dW, dP off by 100% for the fuzzer's spec, a NameError
    for a folded GEMM also read by a loop, d lookup = 0 for params read in a loop)."""
    cpu, ref = compiled(nested_specs.text(name))
    (q, k, v, G), params = nested_specs.inputs(4, 2, 7, 9)
    want = ref.backward(q, k, v, G, **params)
    errors = nested_specs.relative_errors(cpu.backward(q, k, v, G, **params), want)
    assert max(errors.values()) <= 1e-10, errors
    for arg in ("q", "k", "W", "wd", "T", "c", "u", "sb"):
        _fd_check(ref, q, k, v, G, params, want, arg, picks=3)


def test_nested_reduction_in_feature_loop_fuzzer_shapes(compiled: Compiled) -> None:
    """The fuzzer's own case: B = 2, heads 6 over 2 kv heads, n = 5, d = dv = 1, r = 3."""
    cpu, ref = compiled(nested_specs.text("fuzz"))
    (q, k, v, G), params = nested_specs.inputs(6, 2, 5, 5, d=1, dv=1)
    want = ref.backward(q, k, v, G, **params)
    errors = nested_specs.relative_errors(cpu.backward(q, k, v, G, **params), want)
    assert max(errors.values()) <= 1e-10, errors
    assert float(np.abs(want["q"]).max()) > 0.1  # a gradient that can be dropped
    for arg in ("q", "k", "W", "P"):
        _fd_check(ref, q, k, v, G, params, want, arg, picks=4)


@pytest.mark.parametrize("name", ["fuzz", "in_bias_causal"])
def test_nested_reduction_in_feature_loop_several_tiles(name: str, compiled: Compiled) -> None:
    """Sizes past one tile each way (BQ = 64, BK = 128), MQA: every query tile and key part."""
    cpu, ref = compiled(nested_specs.text(name))
    (q, k, v, G), params = nested_specs.inputs(3, 1, 70, 131, B=1)
    errors = nested_specs.relative_errors(cpu.backward(q, k, v, G, **params),
                                          ref.backward(q, k, v, G, **params))
    assert max(errors.values()) <= 1e-10, errors


# ---- division by zero (issue 12: the kernels' error model) ------------------------------------

DIVIDE_BY_ZERO = """attention divide_by_zero {
    score (q . k) / (i - j) + tanh(q . k) / (j - 5)
    mask i // (n_k - 9) <= j
}"""


def test_division_by_zero_gives_what_numpy_gives(compiled: Compiled) -> None:
    """The cpu kernels divide under NumPy's error model (x / 0 is inf or NaN, n // 0 is 0),
    which also lets LLVM vectorize loops that divide: at n_k = 9 the mask divides by zero for
    every row, and the score by zero at i == j and at key 5; out, lse and every gradient are
    what the NumPy reference gives, NaN and inf in the same places, never an exception."""
    cpu, ref = compiled(DIVIDE_BY_ZERO)
    q, k, v, G = _qkv(2, 1, 7, 9)
    with np.errstate(all="ignore"):
        want_out, want_lse = ref.forward(q, k, v, return_lse=True)
        want = ref.backward(q, k, v, G)
    got_out, got_lse = cpu.forward(q, k, v, return_lse=True)
    got = cpu.backward(q, k, v, G)
    assert np.isnan(want_out).any() and np.isfinite(want_out).any()  # both kinds of row
    for name, a, b in [("out", got_out, want_out), ("lse", got_lse, want_lse),
                       *((n, got[n], want[n]) for n in sorted(want))]:
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, equal_nan=True, err_msg=name)
