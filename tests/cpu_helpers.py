"""Shared input builders and comparisons for the Numba CPU target tests (tests/test_numba_cpu.py).

Also a small script: `python tests/cpu_helpers.py NAME...` compiles the `cpu` kernels of the named
examples (or inline specs of INLINE) for float64 and float32 into $ATTNDSL_CACHE, so that a test
session can warm Numba's disk cache in a second process while it compiles other specs itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.attn"))

# Inline specs of the edge-case tests: empty rows, out-of-range subscripts.
INLINE = {
    "keep_softmax": """attention keep_softmax {
    index keep[n_k]
    score q . k
    scale 1 / sqrt(d)
    mask  keep[j] == 1
}""",
    "keep_sum": """attention keep_sum {
    index     keep[n_k]
    score     (elu(q) + 1) . (elu(k) + 1)
    normalize sum
    mask      keep[j] == 1
}""",
    "keep_sigmoid": """attention keep_sigmoid {
    index     keep[n_k]
    score     q . k
    scale     1 / sqrt(d)
    normalize sigmoid(s)
    mask      keep[j] == 1
}""",
    "shifted_causal": """attention shifted_causal {
    score q . k
    scale 1 / sqrt(d)
    mask  j <= i - 3
}""",
    "shifted_causal_sum": """attention shifted_causal_sum {
    score     (elu(q) + 1) . (elu(k) + 1)
    normalize sum
    mask      j <= i - 3
}""",
    "table_bias": """attention table_bias {
    param table[heads, 5]
    score q . k
    bias  table[h, j]
}""",
    "softcap_window": """attention softcap_window {
    score   q . k
    scale   1 / sqrt(d)
    softcap 30
    mask    j <= i and i - j < 4
}""",
    "table_index": """attention table_index {
    param table[heads, 5]
    index pos[n_k]
    score q . k
    bias  table[h, pos[j]]
}""",
}


def load_spec(name: str) -> Any:
    import attndsl

    if name in INLINE:
        return attndsl.parse(INLINE[name])
    return attndsl.load(EXAMPLES / f"{name}.attn")


def uses_n(spec: Any) -> bool:
    from attndsl.check import uses_n

    return uses_n(spec)


def head_counts(spec: Any, heads: int, kv_heads: int) -> tuple[int, int]:
    """The (heads, kv_heads) a spec accepts: its own if it fixes them, else the ones asked for."""
    if spec.heads is not None:
        return spec.heads, spec.kv_heads if spec.kv_heads is not None else spec.heads
    return heads, kv_heads


def make_inputs(spec: Any, dtype: Any = np.float64, *, B: int = 2, heads: int = 4,
                kv_heads: int = 2, n_q: int = 67, n_k: int = 131, d: int = 5, dv: int = 3,
                r: int = 4, seed: int = 0, qk_scale: float = 1.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """q, k, v and every param / index of `spec` at the given sizes (n_q = n_k where `n` is used).

    Free param sizes (such as Bahdanau's r) get `r`. Scalar params are positive (tau > 0.01);
    index arrays hold small sorted integers (document ids), prefix lengths within n_k.
    """
    rng = np.random.default_rng(seed)
    heads, kv_heads = head_counts(spec, heads, kv_heads)
    if uses_n(spec):
        n_k = n_q
    sizes = {"B": B, "heads": heads, "kv_heads": kv_heads, "n_q": n_q, "n_k": n_k, "n": n_q,
             "d": d, "dv": dv}

    def shape(dims: tuple[Any, ...]) -> tuple[int, ...]:
        return tuple(x if isinstance(x, int) else sizes.get(x, r) for x in dims)

    q = (rng.standard_normal((B, heads, n_q, d)) * qk_scale).astype(dtype)
    k = (rng.standard_normal((B, kv_heads, n_k, d)) * qk_scale).astype(dtype)
    v = rng.standard_normal((B, kv_heads, n_k, dv)).astype(dtype)
    extra: dict[str, np.ndarray] = {}
    for p in spec.params:
        value = rng.standard_normal(shape(p.dims)) * 0.5
        extra[p.name] = (np.abs(value) + 0.5 if not p.dims else value).astype(dtype)
    for x in spec.indices:
        full = (B, *shape(x.dims))
        if x.name == "prefix":
            extra[x.name] = rng.integers(0, n_k + 1, size=full)
        else:
            extra[x.name] = np.sort(rng.integers(0, 4, size=full), axis=-1)
    return q, k, v, extra


def qkv_dout(n_q: int, n_k: int, dtype: type, B: int = 2, heads: int = 4, kv_heads: int = 2,
             d: int = 5, dv: int = 3, seed: int = 0, scale: float = 1.0) -> tuple[Any, ...]:
    """Random q, k, v and an output adjoint (q and k times `scale`, for huge logits)."""
    rng = np.random.default_rng(seed + n_q + 7 * n_k)
    q = (scale * rng.standard_normal((B, heads, n_q, d))).astype(dtype)
    k = (scale * rng.standard_normal((B, kv_heads, n_k, d))).astype(dtype)
    v = rng.standard_normal((B, kv_heads, n_k, dv)).astype(dtype)
    dout = rng.standard_normal((B, heads, n_q, dv)).astype(dtype)
    return q, k, v, dout


def as64(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: (a.astype(np.float64) if a.dtype.kind == "f" else a) for n, a in arrays.items()}


def run(kernel: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, extra: dict[str, np.ndarray],
        G: np.ndarray, **backward_kw: Any) -> dict[str, Any]:
    """out, lse and every gradient of sum(out * G), in one dict."""
    out, lse = kernel.forward(q, k, v, return_lse=True, **extra)
    grads = kernel.backward(q, k, v, G.astype(q.dtype), **backward_kw, **extra)
    result: dict[str, Any] = {"out": out, "lse": lse}
    result.update({f"d{n}": g for n, g in grads.items()})
    return result


def rel_error(ref: np.ndarray, got: np.ndarray, floor: float = 1.0) -> float:
    """max |ref - got| / max(floor, max |ref|) over finite entries; inf if the non-finite
    entries (inf, -inf, nan) differ in place or value, or got has any extra."""
    a = np.asarray(ref, np.float64)
    b = np.asarray(got, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    finite = np.isfinite(a)
    if not np.array_equal(finite, np.isfinite(b)):
        return float("inf")
    if not np.array_equal(a[~finite], b[~finite], equal_nan=True):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(floor, float(np.max(np.abs(a[finite]))))
    return float(np.max(np.abs(a[finite] - b[finite]))) / scale


def errors(ref: dict[str, Any], got: dict[str, Any], floor: float = 1.0) -> dict[str, float]:
    assert set(ref) == set(got), (sorted(ref), sorted(got))
    result = {}
    for name, want in ref.items():
        if want is None or got[name] is None:
            assert want is None and got[name] is None, name
            continue
        result[name] = rel_error(want, got[name], floor)
    return result


def compile_pairs(specs: dict[str, str], check: Callable[[str, Any], bool]
                  ) -> dict[str, tuple[Any, Any]]:
    """Each inline spec's (cpu, numpy) kernels by name; `check(name, plan)` must hold of the
    spec's KernelPlan (that the spec takes the path its tests are about)."""
    import attndsl
    from attndsl.plan import make_plan

    built = {}
    for name, text in specs.items():
        spec = attndsl.parse(text)
        assert check(name, make_plan(spec)), name
        built[name] = (attndsl.compile(spec, target="cpu"), attndsl.compile(spec, target="numpy"))
    return built


def warm(names: list[str]) -> None:
    """Compiles, stopping at the first Numba warning: that spec is then compiled by the test
    session itself, where the warning fails a test (test_item12_no_numba_warnings)."""
    import warnings

    from numba.core.errors import NumbaWarning

    import attndsl

    warnings.simplefilter("error", NumbaWarning)
    for name in names:
        spec = load_spec(name)
        kernel = attndsl.compile(spec, target="cpu")
        for dtype in (np.float64, np.float32):
            q, k, v, extra = make_inputs(spec, dtype, B=1, n_q=3, n_k=3, seed=1)
            out = kernel.forward(q, k, v, **extra)
            kernel.backward(q, k, v, np.ones_like(out), **extra)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    warm(sys.argv[1:])
