"""Issue 12: the cpu target's fused feature maps. When every row-level value a kernel reads is
q, k or an element-wise map of one of them (phi(q) = elu(q) + 1 of linear attention), one
generated pass computes the maps (`_maps_fwd`) and one chains their adjoints to dq and dk
(`_maps_bwd`), in place of the NumPy reference's `rows` and `rows_backward`.

Checked here: which plans take the fused pass; the maps' values are the reference's bit for
bit; forward and every gradient against the reference (and finite differences) on the tiled
path and the linear path, with GQA, sizes that are not multiples of MAP_ROWS or of a tile, a
mask that empties rows, huge logits, a map next to the raw k, and NaN or inf in q and k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attndsl
from attndsl.codegen import numba_cpu
from attndsl.plan import make_plan
from attndsl.runtime import numpy_ops
from tests.cpu_helpers import compile_pairs, qkv_dout

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("error::numba.core.errors.NumbaWarning")]

SPECS = {
    # the tiled path: softmax over maps, a mask that leaves rows 0..2 without a key
    "softmax_maps": """attention softmax_maps {
    normalize softmax
    mask      j <= i - 3
    score     (elu(q) + 1) . (elu(k) + 1)
    scale     1 / sqrt(d)
}""",
    # a map of q against the raw k (the kernel reads k itself: its adjoint joins dk)
    "map_and_raw_k": """attention map_and_raw_k {
    normalize softmax
    score     relu(q) . k
}""",
    # the linear path, causal
    "causal_linear": """attention causal_linear {
    normalize sum
    mask      j <= i
    score     (elu(q) + 1) . (elu(k) + 1)
}""",
}
NOT_FUSED = {
    "projection": "attention p { param W[d, d]\n score elu(q @ W) . k }",
    "position": "attention r { score (q * i) . k }",
    "scalar param": "attention s { param c\n score (elu(q) * c) . k }",
    "norm": "attention c { score (q / norm(q)) . (k / norm(k)) }",
    "plain": "attention sdp { score q . k }",
}
TOL = {np.float64: 1e-10, np.float32: 3e-5}  # relative to the largest reference value


@pytest.fixture(scope="module")
def kernels() -> dict[str, tuple[Any, Any]]:
    return compile_pairs(SPECS, lambda name, plan: bool(plan.feature_maps))


def test_which_plans_take_the_fused_maps() -> None:
    maps = make_plan(attndsl.parse(SPECS["causal_linear"])).feature_maps
    assert maps is not None
    assert [(m.source.name, str(m.value), str(m.partial)) for m in maps] == [
        ("q", "Elu(q_f) + 1", "EluGrad(q_f)"), ("k", "Elu(k_f) + 1", "EluGrad(k_f)")]
    mixed = make_plan(attndsl.parse(SPECS["map_and_raw_k"]))
    assert [m.source.name for m in mixed.feature_maps or []] == ["q"]
    assert any(i.is_raw_key for i in mixed.inputs)
    for name, text in NOT_FUSED.items():
        assert make_plan(attndsl.parse(text)).feature_maps is None, name
    source = numba_cpu.emit_source(make_plan(attndsl.parse(SPECS["causal_linear"])))
    assert "def _maps_fwd(" in source and "def _maps_bwd(" in source
    assert "in_vec2 = Elu(q_f) + 1" in source  # the docstring names what each map computes
    assert "def _maps_fwd(" not in numba_cpu.emit_source(attndsl.parse(NOT_FUSED["norm"]))


def _compare(kernels: dict[str, tuple[Any, Any]], name: str, q: np.ndarray, k: np.ndarray,
             v: np.ndarray, dout: np.ndarray) -> None:
    cpu, ref = kernels[name]
    dtype = q.dtype.type
    with np.errstate(all="ignore"):
        out, want = cpu(q, k, v), ref(q, k, v)
        got, grads = cpu.backward(q, k, v, dout), ref.backward(q, k, v, dout)
    assert set(got) == set(grads) == {"q", "k", "v"}
    for label, g, w in [("out", out, want)] + [(f"d{x}", got[x], grads[x]) for x in grads]:
        assert g.shape == w.shape and g.dtype == w.dtype, (name, label)
        assert np.array_equal(np.isnan(g), np.isnan(w)), (name, label)
        finite = np.isfinite(w)
        tol = TOL[dtype] * max(1.0, float(np.abs(w[finite]).max(initial=0)))
        np.testing.assert_allclose(g[finite], w[finite], rtol=0, atol=tol,
                                   err_msg=f"{name} {label}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", [1, 70, numba_cpu.MAP_ROWS + 3])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_fused_maps_match_reference(kernels, name: str, n: int, dtype: type
                                    ) -> None:  # type: ignore[no-untyped-def]
    """Forward and every gradient, GQA (4 heads on 2), B = 2, n around MAP_ROWS; the softmax
    spec's first three rows see no key (out and dq are 0 there, as on the reference)."""
    _compare(kernels, name, *qkv_dout(n, n + 2, dtype))


def test_fused_maps_rows_differ_from_keys_and_mqa(kernels) -> None:  # type: ignore[no-untyped-def]
    """n_q != n_k (different block counts per side) and 3 query heads on one kv head, whose
    dk sums the three heads' adjoints."""
    for name in SPECS:
        _compare(kernels, name, *qkv_dout(40, 300, np.float64, heads=3, kv_heads=1))
        _compare(kernels, name, *qkv_dout(300, 40, np.float64, heads=3, kv_heads=3))


def test_fused_maps_huge_logits(kernels) -> None:  # type: ignore[no-untyped-def]
    """Inputs of size ~100: elu is linear there, the logits are ~1e4 (softmax must not
    overflow), and elu's exp side is deep below -87 for the negative entries. float64: in
    float32 a logit of 1e4 is only known to ~1e-3, and the nearly one-hot weights' gradients
    move by that much between any two summation orders."""
    for name in ("softmax_maps", "map_and_raw_k"):
        _compare(kernels, name, *qkv_dout(90, 90, np.float64, scale=100.0))
        cpu, ref = kernels[name]
        q, k, v, _ = qkv_dout(90, 90, np.float32, scale=100.0)
        out, want = cpu(q, k, v), ref(q, k, v)
        assert np.isfinite(want).all()
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-3 * float(np.abs(want).max()))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_fused_maps_nan_and_inf(kernels, dtype: type) -> None:  # type: ignore[no-untyped-def]
    """A NaN in q and in k, +inf in q, -inf in k (elu(-inf) + 1 = 0: a finite map of a
    non-finite input, whose gradient is 0): NaN exactly where the reference has it."""
    for name in SPECS:
        q, k, v, dout = qkv_dout(150, 150, dtype)
        q[0, 1, 70, 2] = np.nan
        q[1, 2, 10, 0] = np.inf
        k[0, 0, 40, 1] = np.nan
        k[1, 1, 90, 4] = -np.inf
        _compare(kernels, name, q, k, v, dout)


def test_fused_maps_are_the_reference_bits(kernels) -> None:  # type: ignore[no-untyped-def]
    """phi(q), phi(k) of the fused pass are exactly NumPy's elu(x) + 1 (float32 and float64:
    fx.elu and numpy_ops.elu share cpu_intrinsics.elu_f32), NaN and infinities included; a
    non-finite value among them sends the kernels down their careful path (sz[8]), and only
    then."""
    cpu, _ = kernels["causal_linear"]
    n = numba_cpu.MAP_ROWS + 5
    for dtype in (np.float32, np.float64):
        for special in (False, True):
            q, k, v, _ = qkv_dout(n, n, dtype, scale=30.0)
            if special:
                q[0, 0, 0, :4] = [np.nan, np.inf, -np.inf, -0.0]
            _, args = cpu._common(cpu.validate(q, k, v, {}))
            assert bool(args[0][8]) == special  # the careful path
            with np.errstate(all="ignore"):
                want_q = numpy_ops.elu(q) + 1
                want_k = np.repeat(numpy_ops.elu(k) + 1, 2, axis=1)  # per query head
            np.testing.assert_array_equal(args[6], want_q)
            np.testing.assert_array_equal(args[7], want_k)


def test_fused_maps_gradient_by_finite_differences(kernels) -> None:  # type: ignore[no-untyped-def]
    """d(sum(out * dout)) / d q[..] and / d k[..] by central differences, float64, at entries
    on both sides of elu's kink (the reference is proved; this checks the fused chain rule)."""
    for name in ("softmax_maps", "causal_linear"):
        cpu, _ = kernels[name]
        q, k, v, dout = qkv_dout(23, 23, np.float64, seed=5)
        grads = cpu.backward(q, k, v, dout)
        for array, index in (("q", (1, 3, 20, 2)), ("q", (0, 0, 5, 4)), ("k", (1, 1, 4, 0)),
                             ("k", (0, 0, 17, 3))):
            x = {"q": q, "k": k}[array]
            h = 1e-6
            x[index] += h
            up = float((cpu(q, k, v) * dout).sum())
            x[index] -= 2 * h
            down = float((cpu(q, k, v) * dout).sum())
            x[index] += h
            assert abs((up - down) / (2 * h) - grads[array][index]) < 1e-6, (name, array, index)
