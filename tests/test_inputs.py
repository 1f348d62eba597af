"""`input NAME[DIMS]` (issue 9): float tensors with a batch axis, read at the call's b, with
gradients, on numpy and cpu and in the proof (the cuda simulator: tests/cuda_sim).

The reference is written from LANGUAGE.md section 2 alone; gradients of the inputs are checked
against its central finite differences, with B = 2 (the proof runs at B = 1), GQA and odd
lengths around the cpu tiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import attndsl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FORGETTING = (EXAMPLES / "forgetting.attn").read_text()
LATENT = (EXAMPLES / "latent_rope.attn").read_text()


def forgetting_reference(q, k, v, c):  # type: ignore[no-untyped-def]
    B, H, n, d = q.shape
    group = H // k.shape[1]
    out = np.zeros((B, H, n, v.shape[3]))
    for b, h, i in np.ndindex(B, H, n):
        x = np.array([q[b, h, i] @ k[b, h // group, j] / np.sqrt(d) + c[b, h, i] - c[b, h, j]
                      for j in range(i + 1)])
        w = np.exp(x - x.max())
        out[b, h, i] = (w / w.sum()) @ v[b, h // group, :i + 1]
    return out


def latent_reference(q, k, v, rq, rk):  # type: ignore[no-untyped-def]
    B, H, n, d = q.shape
    group = H // k.shape[1]
    out = np.zeros((B, H, n, v.shape[3]))
    for b, h, i in np.ndindex(B, H, n):
        x = np.array([(q[b, h, i] @ k[b, h // group, j] + rq[b, i] @ rk[b, j]) / np.sqrt(d)
                      for j in range(i + 1)])
        w = np.exp(x - x.max())
        out[b, h, i] = (w / w.sum()) @ v[b, h // group, :i + 1]
    return out


def inputs(n=9, dtype=np.float64, seed=0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, n, 5)).astype(dtype)
    k = rng.standard_normal((2, 2, n, 5)).astype(dtype)
    v = rng.standard_normal((2, 2, n, 3)).astype(dtype)
    dout = rng.standard_normal((2, 4, n, 3)).astype(dtype)
    extra = {"c": np.cumsum(-np.abs(rng.standard_normal((2, 4, n))), axis=-1).astype(dtype),
             "rq": rng.standard_normal((2, n, 6)).astype(dtype),
             "rk": rng.standard_normal((2, n, 6)).astype(dtype)}
    return q, k, v, dout, extra


@pytest.fixture(scope="module")
def kernels():  # type: ignore[no-untyped-def]
    return {(name, target): attndsl.compile(text, target=target)
            for name, text in (("forgetting", FORGETTING), ("latent", LATENT))
            for target in ("numpy", "cpu")}


def test_inputs_are_checked_with_their_own_dims() -> None:
    spec = attndsl.parse(FORGETTING)
    (c,) = spec.params
    assert c.batched and c.kind == "input" and c.spec_dims == ("heads", "n")
    for text, message in [
        ("input c[heads, n]\n    bias c[h, i, j]", (r"input 'c' has 2 dimensions \[heads, n\] "
                                                  "but is used with 3 subscripts")),
        ("input g\n    bias g[i]", "input 'g' is a scalar and takes no subscripts"),
        ("input b[n]\n    bias b[i]", "'b' is reserved and cannot name an input"),
    ]:
        with pytest.raises(attndsl.SpecError, match=message):
            attndsl.parse(f"attention t {{\n    score q . k\n    {text}\n}}")


def test_forgetting_numpy_matches_the_definition_and_finite_differences(kernels) -> None:  # type: ignore[no-untyped-def]
    q, k, v, dout, extra = inputs()
    c = extra["c"]
    kern = kernels[("forgetting", "numpy")]
    np.testing.assert_allclose(kern(q, k, v, c=c), forgetting_reference(q, k, v, c), atol=1e-12)
    grads = kern.backward(q, k, v, dout, c=c)
    assert grads["c"].shape == c.shape and np.abs(grads["c"]).max() > 1e-2

    def loss(cc):  # type: ignore[no-untyped-def]
        return float((forgetting_reference(q, k, v, cc) * dout).sum())

    for at in [(0, 1, 3), (1, 3, 8), (1, 0, 0)]:  # both batches: the input is per batch
        e = np.zeros_like(c)
        e[at] = 1e-6
        fd = (loss(c + e) - loss(c - e)) / 2e-6
        assert abs(grads["c"][at] - fd) <= 1e-7 * max(1.0, abs(fd)), (at, grads["c"][at], fd)


def test_latent_rope_numpy_matches_the_definition_and_finite_differences(kernels) -> None:  # type: ignore[no-untyped-def]
    q, k, v, dout, extra = inputs()
    rq, rk = extra["rq"], extra["rk"]
    kern = kernels[("latent", "numpy")]
    np.testing.assert_allclose(kern(q, k, v, rq=rq, rk=rk), latent_reference(q, k, v, rq, rk),
                               atol=1e-12)
    grads = kern.backward(q, k, v, dout, rq=rq, rk=rk)
    for name, value in (("rq", rq), ("rk", rk)):
        e = np.zeros_like(value)
        e[1, 4, 2] = 1e-6
        moved = {"rq": rq, "rk": rk, name: value + e}
        back = {"rq": rq, "rk": rk, name: value - e}
        fd = ((latent_reference(q, k, v, **moved) - latent_reference(q, k, v, **back))
              * dout).sum() / 2e-6
        assert abs(grads[name][1, 4, 2] - fd) <= 1e-7 * max(1.0, abs(fd)), name


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda t: t.__name__)
@pytest.mark.parametrize("n", [9, 131])
@pytest.mark.parametrize("name", ["forgetting", "latent"])
def test_inputs_cpu_matches_numpy(kernels, name, n, dtype) -> None:  # type: ignore[no-untyped-def]
    q, k, v, dout, extra = inputs(n, dtype, seed=1)
    extra = {"c": extra["c"]} if name == "forgetting" else {"rq": extra["rq"], "rk": extra["rk"]}
    tol = 1e-12 if dtype == np.float64 else 5e-5
    want = kernels[(name, "numpy")].backward(q, k, v, dout, **extra)
    got = kernels[(name, "cpu")].backward(q, k, v, dout, **extra)
    assert sorted(got) == sorted(want) == sorted(["q", "k", "v", *extra])
    for g, value in want.items():
        scale = max(1.0, float(np.abs(value).max()))
        np.testing.assert_allclose(got[g], value, rtol=tol, atol=tol * scale, err_msg=g)
    np.testing.assert_allclose(kernels[(name, "cpu")](q, k, v, **extra),
                               kernels[(name, "numpy")](q, k, v, **extra), rtol=tol, atol=tol)


def test_an_input_is_cast_to_qs_dtype_and_its_gradient_comes_back_in_its_own(kernels) -> None:  # type: ignore[no-untyped-def]
    q, k, v, dout, extra = inputs()
    c32 = extra["c"].astype(np.float32)
    grads = kernels[("forgetting", "cpu")].backward(q, k, v, dout, c=c32)
    assert grads["q"].dtype == np.float64 and grads["c"].dtype == np.float32
    want = kernels[("forgetting", "numpy")].backward(q, k, v, dout, c=c32.astype(np.float64))
    np.testing.assert_allclose(grads["c"], want["c"], rtol=1e-5, atol=1e-6)


def test_a_wrong_input_shape_names_the_input_and_both_shapes(kernels) -> None:  # type: ignore[no-untyped-def]
    q, k, v, _, extra = inputs()
    with pytest.raises(ValueError, match=r"c: expected shape \[B=2, heads=4, n=9\], got "
                                         r"\[4, 9\]"):
        kernels[("forgetting", "cpu")](q, k, v, c=extra["c"][0])


@pytest.mark.parametrize("name", ["forgetting", "latent_rope"])
def test_input_examples_are_proved(name: str) -> None:
    report = attndsl.verify(EXAMPLES / f"{name}.attn")
    assert report.ok, str(report)
    wanted = {"c"} if name == "forgetting" else {"rq", "rk"}
    assert {f"proof d{n}" for n in wanted} <= {c.what for c in report.checks if c.ok}


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_an_out_of_range_subscript_counts_the_specs_subscripts(target: str) -> None:
    """The batch axis of an input or index array is not written in the spec: `c[h, i + 1]`
    past the end is subscript 1 of 'c' (it said 2), `doc[j + 1]` subscript 0 of 'doc'."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 5, 3)) for _ in range(3))
    spec = "attention t {\n  input c[heads, n]\n  score q . k\n  bias c[h, i + 1] - c[h, j]\n}"
    with pytest.raises(ValueError, match=r"subscript 1 of 'c' is out of range: got 5"):
        attndsl.compile(spec, target=target)(q, k, v, c=rng.standard_normal((2, 2, 5)))
    spec = "attention t {\n  index doc[n]\n  score q . k\n  mask doc[i] == doc[j + 1]\n}"
    with pytest.raises(ValueError, match=r"subscript 0 of 'doc' is out of range: got 5"):
        attndsl.compile(spec, target=target)(q, k, v, doc=np.zeros((2, 5), np.int64))
