"""Specs with a pair reduction nested inside an explicit feature loop's body (issue 8, found by
the differential fuzzer): the loop's adjoint must flow on into what its body reads per pair
(a GEMM, another loop, a param lookup). Shared by tests/test_cpu_issue8.py and
tests/cuda_sim/test_issue8_sim.py; the params are drawn from uniform(0.3, 1.3) as the fuzzer
drew them.
"""

from __future__ import annotations

import numpy as np

PARAMS = """    param W[d, r]
    param wd[d]
    param P[heads, d]
    param T[n_q, n_k]
    param c[heads]
    param u[n_k]
    param sb[heads]
"""

# name -> clauses; every spec declares every param of PARAMS (unused ones get gradient 0)
NESTED = {
    # the fuzzer's spec: a GEMM over r inside the body of a sum over d
    "fuzz": "score sum(-(wd / exp(tanh(tanh(dot((q @ W), ((k * P[h]) @ W)))))))",
    "gemm_in_loop": "score sum(k * (q . k))",
    "gemm_in_loop_param": "score sum(wd * exp(q . k))",  # d body / d wd free of the feature
    "loop_in_loop": "score sum(q * k * sum(q * k * k))",
    "three_levels": "score sum(q * k * sum(q * k * sum(k * (q . k))))",
    "folded_gemm_also_nested": "score q . k + sum(k * (q . k))",  # the GEMM fold must not apply
    # c before T: a pair lookup ahead of a per-row one trips a cuda launcher bug (not nesting)
    "lookups_in_loop": "score sum(q * k * (c[h] + T[i, j])) + sum(q * k * u[j])",
    "in_bias_causal": "score q . k\n    bias sum(wd * tanh(q . k))\n    mask j <= i",
    "in_where": "score where(q . k > 0, sum(q * k * tanh(q . k)), q . k)",
    "in_norm": "score -norm(q * exp(q . k) - k)",
    "softcap_elementwise": "score sum(q * k * (q . k))\n    softcap 3\n"
                           "    normalize sigmoid(s + sb[h])",
}


def text(name: str) -> str:
    return f"attention {name} {{\n{PARAMS}    {NESTED[name]}\n}}"


def inputs(heads: int, kv_heads: int, n_q: int, n_k: int, d: int = 3, dv: int = 2, B: int = 2,
           r: int = 3, seed: int = 0) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray]]:
    """(q, k, v, dout) ~ N(0, 1), params ~ uniform(0.3, 1.3), float64."""
    rng = np.random.default_rng(seed)
    qkvg = (rng.standard_normal((B, heads, n_q, d)), rng.standard_normal((B, kv_heads, n_k, d)),
            rng.standard_normal((B, kv_heads, n_k, dv)), rng.standard_normal((B, heads, n_q, dv)))
    shapes = {"W": (d, r), "wd": (d,), "P": (heads, d), "T": (n_q, n_k), "c": (heads,),
              "u": (n_k,), "sb": (heads,)}
    return qkvg, {name: rng.uniform(0.3, 1.3, shape) for name, shape in shapes.items()}


def relative_errors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """max |got - want| / max(1, max |want|) per gradient."""
    assert sorted(got) == sorted(want)
    return {n: float(np.max(np.abs(np.asarray(got[n]) - want[n]))
                     / max(1.0, float(np.max(np.abs(want[n]))))) for n in want}
