"""Issue 8 item 3, the NaN policy, as cases every target runs (numpy, cpu, cuda simulator).

NaN or inf reaching an allowed pair propagates to that row's out and lse and to the gradients
it feeds; masked pairs and `where` branches not taken never affect out, lse or any gradient.
Each case poisons clean inputs and returns what the numpy reference must show; a target then
agrees with the numpy reference on the poisoned inputs, NaN for NaN (`assert_same`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CAUSAL = """attention causal {
    mask  j <= i
    score q . k
    scale 1 / sqrt(d)
}"""

# Untaken branches: log(j - i) is -inf or NaN for j <= i, the sqrt's derivative 0 / 0 where
# q_f = k_f = 0 (row 3, key 3), nanp (NaN in the tests) is read only when i - j > 1000.
HAZARDS = """attention hazards {
    param nanp[heads, 2]
    param sb[heads, 2]
    mask  j <= i + 1
    score where(j <= i, q . k, -sum(sqrt(q * q + k * k)) - log(j - i))
    bias  where(i - j > 1000, nanp[h, j % 2], sb[h, j % 2])
}"""


@dataclass
class Inputs:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    dout: np.ndarray
    params: dict[str, np.ndarray] = field(default_factory=dict)

    def copy(self) -> Inputs:
        return Inputs(self.q.copy(), self.k.copy(), self.v.copy(), self.dout.copy(),
                      {n: p.copy() for n, p in self.params.items()})


def make(spec: str, n_q: int, n_k: int, dtype: type = np.float64, heads: int = 4,
         kv_heads: int = 2, d: int = 5, dv: int = 3, seed: int = 0) -> Inputs:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, heads, n_q, d)).astype(dtype)
    k = rng.standard_normal((1, kv_heads, n_k, d)).astype(dtype)
    v = rng.standard_normal((1, kv_heads, n_k, dv)).astype(dtype)
    dout = rng.standard_normal((1, heads, n_q, dv)).astype(dtype)
    params = {}
    if spec == HAZARDS:  # heads == kv_heads: cpu's GQA dk of feature loops is item 2's bug
        params = {"nanp": np.zeros((heads, 2), dtype),
                  "sb": (0.3 * rng.standard_normal((heads, 2))).astype(dtype)}
        q[0, :, 3, 0] = k[0, 0, 3, 0] = 0  # a NaN partial at pair (3, 3) of kv head 0's heads
    return Inputs(q, k, v, dout, params)


def run(kernel: Any, x: Inputs) -> dict[str, np.ndarray]:
    """out, lse and every gradient of one call (errors on NaN/inf silenced: NaN is expected)."""
    with np.errstate(all="ignore"):
        out, lse = kernel.forward(x.q, x.k, x.v, return_lse=True, **x.params)
        grads = kernel.backward(x.q, x.k, x.v, x.dout, **x.params)
    result = {"out": out, "lse": lse, **{f"d{n}": g for n, g in grads.items()}}
    return {n: r for n, r in result.items() if r is not None}  # lse: softmax only


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float,
                atol: float) -> None:
    """Equal within tolerance, with NaN exactly where the reference has NaN (and inf alike)."""
    for name, w in want.items():
        g = got[name]
        assert np.array_equal(np.isnan(g), np.isnan(w)), (
            f"{name}: NaN at {np.argwhere(np.isnan(g) != np.isnan(w))[:5].tolist()} differs")
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)


# ---- the cases: poison, then what the reference must show (r: results, c: clean results) ----

def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to rounding: the careful path sums in another order than BLAS."""
    tol = 1e-9 if got.dtype == np.float64 else 2e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def _rows(a: np.ndarray, stop: int) -> np.ndarray:
    return a[:, :, :stop]


def nan_in_q(x: Inputs) -> Callable[[dict, dict], None]:
    x.q[0, 1, 10, 2] = np.nan

    def expect(r: dict, c: dict) -> None:
        assert np.isnan(r["out"][0, 1, 10]).all() and np.isnan(r["lse"][0, 1, 10])
        assert np.isnan(r["dq"][0, 1, 10]).all() and np.isnan(r["dk"][0, 0, :11]).all()
        ok = np.ones(r["out"].shape[:3], bool)
        ok[0, 1, 10] = False
        _close(r["out"][ok], c["out"][ok])
        # keys 11.. are masked for row 10: its NaN q stays out of their dk and dv
        _close(r["dk"][:, :, 11:], c["dk"][:, :, 11:])
        _close(r["dv"][:, :, 11:], c["dv"][:, :, 11:])
    return expect


def inf_in_k(x: Inputs) -> Callable[[dict, dict], None]:
    x.k[0, 0, 3, 1] = np.inf

    def expect(r: dict, c: dict) -> None:
        hit = (x.q[0, :2, 3:, 1] > 0)  # heads 0, 1 read kv head 0; logit +inf from row 3 on
        assert hit.any() and np.isnan(r["out"][0, :2, 3:][hit]).all()
        assert np.isnan(r["lse"][0, :2, 3:][hit]).all()
        _close(r["out"][0, :2, :3], c["out"][0, :2, :3])
        _close(r["out"][0, 2:], c["out"][0, 2:])
    return expect


def huge_q(x: Inputs) -> Callable[[dict, dict], None]:
    """q = 1e30 meets k = 1e300 at an allowed pair: the logit overflows. Forward only: the
    other rows' logits (~1e300) leave no precision for P = exp(x - lse) in the backward."""
    x.q[0, 1, 10] = 1e30
    x.k[0, 0, 4] = 1e300 if x.k.dtype == np.float64 else 1e30

    def expect(r: dict, c: dict) -> None:
        assert np.isnan(r["out"][0, 1, 10]).all() and np.isnan(r["lse"][0, 1, 10])
        assert np.isfinite(r["out"][0, 1, :4]).all()
    return expect


huge_q.forward_only = True  # type: ignore[attr-defined]


def _masked_poison(array: str, value: float) -> Callable[[Inputs], Callable[[dict, dict], None]]:
    """`array` at key KEY of kv head 0: masked for rows < KEY (causal), in their tiles too."""
    def case(x: Inputs) -> Callable[[dict, dict], None]:
        key = x.k.shape[2] * 3 // 4
        getattr(x, array)[0, 0, key, 1] = value

        def expect(r: dict, c: dict) -> None:
            for name in ("out", "lse", "dq"):
                _close(_rows(r[name], key), _rows(c[name], key))
            if array == "v":  # v never reaches lse or the weights: dv stays clean
                _close(r["lse"], c["lse"])
                _close(r["dv"], c["dv"])
            assert not np.isfinite(r["out"][0, :2, key:]).all()
        return expect
    case.__name__ = f"masked_{'nan' if np.isnan(value) else 'inf'}_in_{array}"
    return case


masked_nan_in_v = _masked_poison("v", np.nan)
masked_inf_in_v = _masked_poison("v", np.inf)
masked_nan_in_k = _masked_poison("k", np.nan)


def nan_in_dout(x: Inputs) -> Callable[[dict, dict], None]:
    x.dout[0, 1, 10, 0] = np.nan

    def expect(r: dict, c: dict) -> None:
        _close(r["dv"][:, :, 11:], c["dv"][:, :, 11:])
        assert np.isnan(r["dv"][0, 0, :11, 0]).all()
    return expect


SHIFTED_SUM = """attention shifted_causal_sum {
    score     (elu(q) + 1) . (elu(k) + 1)
    normalize sum
    mask      j <= i - 3
}"""


def nan_row_sum(x: Inputs) -> Callable[[dict, dict], None]:
    """normalize sum: row 10 (keys 0..7) NaN; keys 8.. are masked for it and stay clean."""
    x.q[0, 1, 10, 2] = np.nan

    def expect(r: dict, c: dict) -> None:
        assert np.isnan(r["out"][0, 1, 10]).all() and np.isnan(r["dk"][0, 0, :8]).all()
        _close(r["dk"][:, :, 8:], c["dk"][:, :, 8:])
        _close(r["dv"][:, :, 8:], c["dv"][:, :, 8:])
    return expect


CAUSAL_CASES = [nan_in_q, inf_in_k, huge_q, masked_nan_in_v, masked_inf_in_v, masked_nan_in_k,
                nan_in_dout]


def untaken_nan_param(x: Inputs) -> Callable[[dict, dict], None]:
    x.params["nanp"][:, 0] = np.nan
    x.params["nanp"][:, 1] = [np.inf, -np.inf] * (len(x.params["nanp"]) // 2)

    def expect(r: dict, c: dict) -> None:
        for name, value in r.items():
            assert np.isfinite(value).all(), name
            _close(value, c[name])
        assert (r["dnanp"] == 0).all()
    return expect


def nan_param(x: Inputs) -> Callable[[dict, dict], None]:
    x.params["sb"][1] = np.nan  # head 1: every pair

    def expect(r: dict, c: dict) -> None:
        assert np.isnan(r["out"][0, 1]).all() and np.isnan(r["lse"][0, 1]).all()
        assert np.isnan(r["dsb"][1]).all() and np.isnan(r["dq"][0, 1]).all()
        others = [h for h in range(r["out"].shape[1]) if h != 1]
        _close(r["out"][0, others], c["out"][0, others])
    return expect


HAZARD_CASES = [untaken_nan_param, nan_param]
HAZARD_HEADS = {"heads": 2, "kv_heads": 2}  # GQA: see make()


def finite_differences(kernel: Any, x: Inputs, picks: list[tuple[int, ...]], eps: float = 1e-6
                       ) -> list[float]:
    """Central differences of sum(out * dout) in q at `picks`."""
    result = []
    for at in picks:
        values = []
        for sign in (1, -1):
            y = x.copy()
            y.q[at] += sign * eps
            with np.errstate(all="ignore"):
                values.append(float(np.sum(kernel.forward(y.q, y.k, y.v, **y.params) * y.dout)))
        result.append((values[0] - values[1]) / (2 * eps))
    return result
