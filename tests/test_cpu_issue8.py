"""Issue 8 regressions on the cpu target against the NumPy reference (and finite differences):
GQA feature-loop adjoints (item 2), size names in param subscripts (item 5), a given out= /
lse= trusted alike on every target (item 6), call-time checks (item 11), no Numba warnings
(item 12), index arrays shared by the batch (section 3).

Every kernel is compiled once per module (float64, tiny odd shapes); the CUDA side of the same
checks is in tests/cuda_sim/test_cuda_kernels.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attndsl

pytestmark = pytest.mark.slow

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
