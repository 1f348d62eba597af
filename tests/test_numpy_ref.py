"""The generated NumPy reference: golden sources, dtypes, argument validation (LANGUAGE.md 6).

Numeric agreement with hand-written references is tests/test_independent_refs.py's job.

The golden sources under tests/golden/ are compared byte for byte. After an intended change of
the generator, regenerate them with

    ATTNDSL_REGEN_GOLDEN=1 python -m pytest tests/test_numpy_ref.py -k golden

and review the diff (`git diff tests/golden/`) before committing it.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import nan_cases
import numpy as np
import pytest

import attndsl
from attndsl.codegen import numpy_ref
from attndsl.symbolic import derive

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("ATTNDSL_REGEN_GOLDEN") == "1"


@functools.cache
def kernel(name: str) -> attndsl.Kernel:
    return attndsl.compile(EXAMPLES / f"{name}.attn", target="numpy")


def inputs(B=2, heads=2, kv_heads=2, n_q=5, n_k=5, d=3, dv=4, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, heads, n_q, d)).astype(dtype)
    k = rng.standard_normal((B, kv_heads, n_k, d)).astype(dtype)
    v = rng.standard_normal((B, kv_heads, n_k, dv)).astype(dtype)
    return q, k, v


# ---- golden sources -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alibi", "bahdanau"])
def test_golden_source(name: str) -> None:
    source = numpy_ref.emit(derive(attndsl.load(EXAMPLES / f"{name}.attn")))
    path = GOLDEN / f"{name}.py"
    if REGEN:
        path.write_text(source, encoding="utf-8")
    assert path.exists(), f"{path} is missing; create it with ATTNDSL_REGEN_GOLDEN=1"
    golden = path.read_text(encoding="utf-8")
    if source != golden:
        diff = next(n for n, (a, b) in enumerate(zip(source.splitlines() + [""],
                                                      golden.splitlines() + [""])) if a != b)
        pytest.fail(
            f"the emitted NumPy reference for {name} differs from {path} from line {diff + 1}:\n"
            f"  emitted: {(source.splitlines() + [''])[diff]!r}\n"
            f"  golden:  {(golden.splitlines() + [''])[diff]!r}\n"
            "If the change is intended, regenerate with\n"
            "  ATTNDSL_REGEN_GOLDEN=1 python -m pytest tests/test_numpy_ref.py -k golden\n"
            "and review `git diff tests/golden/`.")


def test_golden_source_is_the_emit_verb_output(capsys: pytest.CaptureFixture[str]) -> None:
    from attndsl.cli import main

    assert main(["emit", str(EXAMPLES / "alibi.attn"), "--target", "numpy"]) == 0
    assert capsys.readouterr().out == (GOLDEN / "alibi.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["alibi", "bahdanau"])
def test_golden_source_is_readable_python(name: str) -> None:
    source = (GOLDEN / f"{name}.py").read_text(encoding="utf-8")
    compile(source, f"{name}.py", "exec")
    for function in ("graph", "normalize", "forward", "backward", "rows", "rows_backward"):
        assert re.search(rf"^def {function}\(xp, ", source, re.MULTILINE), function
    assert "generated; do not edit" in source


# ---- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["alibi", "bahdanau", "linear", "cosine"])
def test_outputs_have_the_input_dtype(name: str, dtype: type) -> None:
    spec = attndsl.load(EXAMPLES / f"{name}.attn")
    heads = spec.heads or 2
    kv_heads = spec.kv_heads or heads
    q, k, v = inputs(heads=heads, kv_heads=kv_heads, dtype=dtype)
    rng = np.random.default_rng(1)
    extra = {}
    for p in spec.params:
        shape = tuple({"heads": heads, "d": 3, "r": 2}.get(d, d) for d in p.dims)
        extra[p.name] = (rng.random(shape) + 0.5).astype(dtype)
    kern = kernel(name)
    out, lse = kern.forward(q, k, v, return_lse=True, **extra)
    assert out.dtype == dtype and out.shape == (2, heads, 5, 4)
    if lse is not None:
        assert lse.dtype == dtype and lse.shape == (2, heads, 5)
    assert kern(q, k, v, **extra).dtype == dtype
    dout = np.ones_like(out)
    grads = kern.backward(q, k, v, dout, **extra)
    assert set(grads) == {"q", "k", "v", *extra}
    for key, value in grads.items():
        like = {"q": q, "k": k, "v": v, **extra}[key]
        assert value.dtype == dtype, key
        assert value.shape == like.shape, key
        assert np.all(np.isfinite(value)), key


def test_float32_agrees_with_float64() -> None:
    slope = np.array([0.5, -0.25, 0.125, 1.0, 0.3, 0.2, 0.1, 0.05])
    q8, k8, v8 = inputs(heads=8, kv_heads=2)
    out64 = kernel("alibi")(q8, k8, v8, slope=slope)
    out32 = kernel("alibi")(q8.astype(np.float32), k8.astype(np.float32), v8.astype(np.float32),
                            slope=slope.astype(np.float32))
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-5)


def test_lse_is_none_for_non_softmax_normalizers() -> None:
    q, k, v = inputs()
    for name in ("linear", "relu", "sigmoid"):
        out, lse = kernel(name).forward(q, k, v, return_lse=True)
        assert lse is None, name
        assert out.shape == (2, 2, 5, 4)
    out, lse = kernel("luong_dot").forward(q, k, v, return_lse=True)
    assert lse is not None and lse.shape == (2, 2, 5)


def test_lse_of_softmax_is_the_log_sum_exp() -> None:
    q, k, v = inputs()
    _, lse = kernel("luong_dot").forward(q, k, v, return_lse=True)
    logits = np.einsum("bhid,bhjd->bhij", q, k)
    np.testing.assert_allclose(lse, np.log(np.exp(logits).sum(-1)), rtol=1e-12)


def test_backward_accepts_out_and_lse_from_forward() -> None:
    q, k, v = inputs()
    kern = kernel("causal")
    out, lse = kern.forward(q, k, v, return_lse=True)
    dout = np.random.default_rng(3).standard_normal(out.shape)
    plain = kern.backward(q, k, v, dout)
    given = kern.backward(q, k, v, dout, out=out, lse=lse)
    for key in plain:
        np.testing.assert_allclose(given[key], plain[key], rtol=1e-12, atol=1e-14)


# ---- scalar params ------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [2.0, np.float64(2.0), np.float32(2.0), np.array(2.0),
                                 np.array(2.0, dtype=np.float32), 2],
                         ids=["python-float", "np-float64", "np-float32", "0d-float64",
                              "0d-float32", "python-int"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scalar_param_gradient_is_0d_in_its_dtype(tau: object, dtype: type) -> None:
    q, k, v = inputs(dtype=dtype)
    kern = kernel("cosine")
    out = kern(q, k, v, tau=tau)
    grads = kern.backward(q, k, v, np.ones_like(out), tau=tau)
    dtau = grads["tau"]
    assert np.shape(dtau) == ()
    tau_dtype = np.asarray(tau).dtype
    want = tau_dtype if tau_dtype.kind == "f" else np.dtype(dtype)
    assert np.asarray(dtau).dtype == want
    assert np.isfinite(dtau) and dtau != 0
    # the same value whatever form the scalar came in
    ref = kern.backward(q, k, v, np.ones_like(out), tau=np.array(2.0, dtype=dtype))["tau"]
    rtol = 1e-12 if np.float32 not in (dtype, want) else 1e-5
    np.testing.assert_allclose(float(dtau), float(ref), rtol=rtol)


def test_vector_param_gradient_keeps_its_own_dtype() -> None:
    q, k, v = inputs(heads=8, kv_heads=2)
    slope = np.linspace(0.1, 0.8, 8).astype(np.float32)
    grads = kernel("alibi").backward(q, k, v, np.ones((2, 8, 5, 4)), slope=slope)
    assert grads["slope"].dtype == np.float32 and grads["slope"].shape == (8,)
    assert grads["q"].dtype == np.float64


# ---- argument validation --------------------------------------------------------------------


def _raises(exc: type, fn, *patterns: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"
    return message


def test_wrong_rank_names_argument_and_shapes() -> None:
    q, k, v = inputs()
    kern = kernel("luong_dot")
    _raises(ValueError, lambda: kern(q[0], k, v), "q:", "[B, heads, n_q, d]", "[2, 5, 3]")
    _raises(ValueError, lambda: kern(q, k[..., None], v), "k:", "[B, kv_heads, n_k, d]",
            "[2, 2, 5, 3, 1]")
    _raises(ValueError, lambda: kern(q, k, v[0, 0]), "v:", "[B, kv_heads, n_k, dv]", "[5, 4]")


def test_shapes_disagreeing_name_argument_and_shapes() -> None:
    q, k, v = inputs()
    kern = kernel("luong_dot")
    # d of k differs from q
    _raises(ValueError, lambda: kern(q, k[..., :2], v), "k:", "[2, 2, 5, 3]", "[2, 2, 5, 2]")
    # B of k differs
    _raises(ValueError, lambda: kern(q, k[:1], v), "k:", "[2, 2, 5, 3]", "[1, 2, 5, 3]")
    # n_k of v differs from k
    _raises(ValueError, lambda: kern(q, k, v[:, :, :4]), "v:", "[2, 2, 5, 4]", "[2, 2, 4, 4]")
    # heads not a multiple of kv_heads
    q3, _, _ = inputs(heads=3)
    _raises(ValueError, lambda: kern(q3, k, v), "k:", "kv_heads = 2", "heads = 3")


def test_heads_declared_by_the_spec() -> None:
    q, k, v = inputs(heads=4, kv_heads=2)
    slope = np.ones(8)
    _raises(ValueError, lambda: kernel("alibi")(q, k, v, slope=slope), "q:", "heads 8",
            "[2, 4, 5, 3]")
    q8, k4, v4 = inputs(heads=8, kv_heads=4)
    _raises(ValueError, lambda: kernel("alibi")(q8, k4, v4, slope=slope), "k:", "kv_heads 2",
            "[2, 4, 5, 3]")


def test_param_shape_names_param_and_shapes() -> None:
    q, k, v = inputs(heads=8, kv_heads=2)
    _raises(ValueError, lambda: kernel("alibi")(q, k, v, slope=np.ones(4)), "slope:",
            "[heads=8]", "[4]")
    _raises(ValueError, lambda: kernel("alibi")(q, k, v, slope=np.ones((8, 1))), "slope:",
            "[8, 1]")
    q, k, v = inputs()
    good = {"Wq": np.ones((3, 2)), "Wk": np.ones((3, 2)), "w": np.ones(2)}
    _raises(ValueError, lambda: kernel("bahdanau")(q, k, v, **{**good, "Wk": np.ones((3, 4))}),
            "Wk:", "[d=3, r=2]", "[3, 4]")
    _raises(ValueError, lambda: kernel("bahdanau")(q, k, v, **{**good, "Wq": np.ones((2, 2))}),
            "Wq:", "d=3", "[2, 2]")
    _raises(ValueError, lambda: kernel("cosine")(q, k, v, tau=np.ones(2)), "tau:", "[2]")


def test_missing_and_unexpected_params() -> None:
    q, k, v = inputs(heads=8, kv_heads=2)
    _raises(TypeError, lambda: kernel("alibi")(q, k, v), "missing", "slope")
    _raises(TypeError, lambda: kernel("alibi")(q, k, v, slope=np.ones(8), bias=np.ones(8)),
            "unexpected", "bias", "slope")
    q, k, v = inputs()
    _raises(TypeError, lambda: kernel("luong_dot")(q, k, v, tau=1.0), "unexpected", "tau",
            "no params or indices")
    _raises(TypeError, lambda: kernel("document")(q, k, v), "missing", "doc")


def test_integer_and_mixed_dtypes() -> None:
    q, k, v = inputs()
    kern = kernel("luong_dot")
    _raises(TypeError, lambda: kern(q.astype(np.int64), k, v), "q:", "int64")
    _raises(TypeError, lambda: kern(q, k, v.astype(np.int32)), "v:", "int32")
    _raises(TypeError, lambda: kern(q, k.astype(np.float32), v), "float64", "float32")
    _raises(TypeError, lambda: kern(q.astype(np.float16), k.astype(np.float16),
                                    v.astype(np.float16)), "q:", "float16")


def test_dout_of_the_wrong_shape_or_dtype() -> None:
    q, k, v = inputs()
    kern = kernel("luong_dot")
    _raises(ValueError, lambda: kern.backward(q, k, v, np.ones((2, 2, 5, 3))), "dout:",
            "[2, 2, 5, 4]", "[2, 2, 5, 3]")
    _raises(ValueError, lambda: kern.backward(q, k, v, np.ones((2, 2, 5))), "dout:",
            "[2, 2, 5, 4]", "[2, 2, 5]")
    _raises(TypeError, lambda: kern.backward(q, k, v, np.ones((2, 2, 5, 4), dtype=np.int64)),
            "dout:", "int64")
    _raises(ValueError, lambda: kern.backward(q, k, v, np.ones((2, 2, 5, 4)),
                                              out=np.ones((2, 2, 5, 3))), "out:", "[2, 2, 5, 4]")
    _raises(ValueError, lambda: kern.backward(q, k, v, np.ones((2, 2, 5, 4)),
                                              lse=np.ones((2, 2, 4))), "lse:", "[2, 2, 5]",
            "[2, 2, 4]")


def test_index_arrays() -> None:
    q, k, v = inputs()
    kern = kernel("document")
    doc = np.zeros((2, 5), dtype=np.int32)
    assert kern(q, k, v, doc=doc).shape == (2, 2, 5, 4)  # any integer dtype
    assert kern(q, k, v, doc=doc.astype(np.uint8)).shape == (2, 2, 5, 4)
    _raises(TypeError, lambda: kern(q, k, v, doc=doc.astype(np.float64)), "doc:", "integer",
            "float64")
    _raises(ValueError, lambda: kern(q, k, v, doc=np.zeros((2, 4), dtype=np.int64)), "doc:",
            "[B=2, n=5]", "[2, 4]")
    # [n] is shared by the batch (LANGUAGE.md 6); a wrong length lists both shapes accepted
    assert kern(q, k, v, doc=np.zeros(5, dtype=np.int64)).shape == (2, 2, 5, 4)
    _raises(ValueError, lambda: kern(q, k, v, doc=np.zeros(4, dtype=np.int64)), "doc:",
            "[B=2, n=5] or [n=5]", "[4]")


def test_lookups_in_range() -> None:
    q, k, v = inputs()
    kern = kernel("prefix_lm")
    ok = kern(q, k, v, prefix=np.array([[2], [0]]))
    assert ok.shape == (2, 2, 5, 4)
    q8, k8, v8 = inputs(heads=8, kv_heads=2)
    table = np.zeros((8, 257))
    assert kernel("relative_bias")(q8, k8, v8, table=table).shape == (2, 8, 5, 4)
    # a literal dimension is part of the shape check
    _raises(ValueError, lambda: kernel("relative_bias")(q8, k8, v8, table=np.zeros((8, 130))),
            "table:", "[heads=8, 257]", "[8, 130]")


def test_subscript_out_of_range_names_the_array() -> None:
    """A subscript computed from an index's values that reaches past a param is a ValueError
    naming the array and the bad subscript, not an IndexError from inside NumPy."""
    spec = """attention lookup_by_index {
        index seg[n]
        param w[4]
        score q . k
        bias  w[seg[j]]
    }"""
    kern = attndsl.compile(spec, target="numpy")
    q, k, v = inputs()
    w = np.ones(4)
    assert kern(q, k, v, seg=np.full((2, 5), 3), w=w).shape == (2, 2, 5, 4)
    _raises(ValueError, lambda: kern(q, k, v, seg=np.full((2, 5), 4), w=w), "'w'",
            "out of range", "4")
    _raises(ValueError, lambda: kern(q, k, v, seg=np.full((2, 5), -1), w=w), "'w'",
            "out of range", "-1")


def test_n_needs_square_inputs() -> None:
    q, k, v = inputs(n_q=4, n_k=5)
    _raises(ValueError, lambda: kernel("document")(q, k, v, doc=np.zeros((2, 5), np.int64)),
            "n_q = 4", "n_k = 5", "'n'")
    # specs without n accept n_q != n_k
    assert kernel("luong_dot")(q, k, v).shape == (2, 2, 4, 4)


def test_empty_inputs_are_rejected() -> None:
    q, k, v = inputs(n_k=0)
    _raises(ValueError, lambda: kernel("luong_dot")(q, k, v), "empty")


# ---- issue 8 item 3: the NaN policy (tests/nan_cases.py) ------------------------------------


@functools.cache
def _nan_kernel(source: str) -> attndsl.Kernel:
    return attndsl.compile(source, target="numpy")


@pytest.mark.parametrize("case", nan_cases.CAUSAL_CASES, ids=lambda c: c.__name__)
def test_item3_causal_nan_policy_numpy(case) -> None:  # type: ignore[no-untyped-def]
    """NaN/inf at allowed pairs propagates; at masked keys (same tiles, GQA) it stays there."""
    ref = _nan_kernel(nan_cases.CAUSAL)
    clean = nan_cases.make(nan_cases.CAUSAL, 200, 200)
    poisoned = clean.copy()
    expect = case(poisoned)
    expect(nan_cases.run(ref, poisoned), nan_cases.run(ref, clean))


@pytest.mark.parametrize("case", nan_cases.HAZARD_CASES, ids=lambda c: c.__name__)
def test_item3_where_branches_nan_policy_numpy(case) -> None:  # type: ignore[no-untyped-def]
    """Untaken where branches (log of <= 0, inf derivatives, NaN params) change nothing; a NaN
    param on allowed pairs propagates."""
    ref = _nan_kernel(nan_cases.HAZARDS)
    clean = nan_cases.make(nan_cases.HAZARDS, 67, 131, **nan_cases.HAZARD_HEADS)
    poisoned = clean.copy()
    expect = case(poisoned)
    expect(nan_cases.run(ref, poisoned), nan_cases.run(ref, clean))


def test_item3_untaken_where_gradient_matches_finite_differences_numpy() -> None:
    """Pair (3, 3): the untaken branch's derivative there is 0 / 0; dq is still the true one."""
    ref = _nan_kernel(nan_cases.HAZARDS)
    x = nan_cases.make(nan_cases.HAZARDS, 67, 131, **nan_cases.HAZARD_HEADS)
    x.params["nanp"][:] = np.nan
    grads = nan_cases.run(ref, x)
    picks = [(0, 0, 3, 0), (0, 1, 3, 2), (0, 0, 2, 4)]
    fd = nan_cases.finite_differences(ref, x, picks)
    np.testing.assert_allclose([grads["dq"][p] for p in picks], fd, rtol=1e-6, atol=1e-8)


def test_item3_sum_normalizer_nan_row_numpy() -> None:
    """normalize sum: a NaN row keeps weight 0 (not 0 / NaN) at its masked keys."""
    ref = _nan_kernel(nan_cases.SHIFTED_SUM)
    clean = nan_cases.make(nan_cases.SHIFTED_SUM, 67, 67)
    poisoned = clean.copy()
    nan_cases.nan_row_sum(poisoned)(nan_cases.run(ref, poisoned), nan_cases.run(ref, clean))
