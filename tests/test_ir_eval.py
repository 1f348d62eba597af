"""The fuzzer's oracle (tests/ir_eval.py) against hand-computed values and the shipped examples,
and the fuzzer's comparisons against injected errors (a check that cannot fail is no check)."""

from __future__ import annotations

import math
from pathlib import Path

import fuzz_tiers
import numpy as np
import pytest
import spec_gen
from ir_eval import Evaluator, Pair, evaluate

import attndsl
from attndsl import ir

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.attn"))
HAS_ROUNDING = all(f in ir.FUNCTIONS for f in ("floor", "ceil", "round"))


def value(expr: str, i: int = 0, j: int = 0, h: int = 0, decls: str = "", **arrays) -> object:
    """The value of a scalar expression at one pair (written as the score of a spec)."""
    spec = attndsl.parse(f"attention t {{\n{decls}\nscore {expr}\n}}\n")
    sizes = {"B": 1, "heads": 2, "kv_heads": 2, "n_q": 9, "n_k": 9, "d": 2, "dv": 1}
    params = {n: np.asarray(a, dtype=np.float64) for n, a in arrays.items()}
    at = Pair(0, h, i, j, h, np.array([1.0, 2.0]), np.array([3.0, -1.0]), sizes, params, {})
    return Evaluator()(spec.score, at)


def test_integer_division_and_modulo_follow_python() -> None:
    assert value("(i - 3) // 4", i=1) == -1
    assert value("(i - 3) % 7", i=1) == 5
    assert value("(i + 1) // 3", i=4) == 1  # not i + 1 // 3 = 4
    assert value("i % (0 - 3)", i=1) == -2
    assert value("-7 // 2") == -4
    assert value("abs(i - j)", i=2, j=7) == 5


def test_arithmetic_kinds_and_functions() -> None:
    assert value("7 / 2") == 3.5  # integers divide to a float
    assert value("2 ^ -1") == 0.5
    assert value("2 ^ 3 ^ 2") == 2.0 ** 9  # right-associative
    assert value("-2 ^ 2") == -4.0  # -(2^2)
    assert value("q . k") == 1.0  # 1*3 + 2*(-1)
    assert value("dot(q, k) + sum(q) + norm(k)") == pytest.approx(1 + 3 + math.sqrt(10))
    assert value("sigmoid(0) + softplus(0) + relu(-2) + elu(-1)") == pytest.approx(
        0.5 + math.log(2) + 0 + math.expm1(-1))
    assert value("gelu(1)") == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))))
    assert value("clamp(5, 0, 3) + min(i, j) + max(i, j)", i=1, j=4) == 3 + 1 + 4
    assert value("rsqrt(4) + sum(max(q, 1.5))") == pytest.approx(0.5 + 1.5 + 2.0)
    assert value("sum(q @ W)", decls="param W[d, r]", W=[[1.0, 2.0], [3.0, 4.0]]) == 1 * 3 + 2 * 7
    assert value("slope[h] * (j - i)", i=3, j=1, h=1, decls="param slope[heads]",
                 slope=[0.5, 2.0]) == -4.0


@pytest.mark.skipif(not HAS_ROUNDING, reason="floor/ceil/round are not in the language yet")
def test_rounding_gives_integers_half_to_even() -> None:
    assert value("round(2.5)") == 2 and value("round(3.5)") == 4 and value("round(-0.5)") == 0
    assert value("floor(-0.5)") == -1 and value("ceil(-0.5)") == 0
    assert isinstance(value("floor(1.5) // 1"), int)


def test_where_evaluates_only_the_picked_branch() -> None:
    # the untaken branch reads out of range: evaluating it would raise
    assert value("where(h < 0, sb[h + 10], 1.5)", decls="param sb[heads]", sb=[1.0, 1.0]) == 1.5


def test_a_subscript_out_of_range_names_the_array() -> None:
    with pytest.raises(ValueError, match="'sb'"):
        value("sb[h + 10]", decls="param sb[heads]", sb=[1.0, 1.0])


def test_softmax_by_hand_with_lse() -> None:
    spec = attndsl.parse("attention t {\nscore q . k\n}\n")
    q = np.ones((1, 1, 1, 1))
    k = np.array([0.0, math.log(3)]).reshape(1, 1, 2, 1)
    v = np.array([1.0, 5.0]).reshape(1, 1, 2, 1)
    r = evaluate(spec, q, k, v)
    assert r.weights[0, 0, 0] == pytest.approx([0.25, 0.75])
    assert r.out[0, 0, 0, 0] == pytest.approx(0.25 + 3.75)
    assert r.lse[0, 0, 0] == pytest.approx(math.log(4))


def test_masked_row_is_empty_and_masked_pairs_are_never_evaluated() -> None:
    # bias reads sb[i - j], out of range exactly where the mask forbids the pair
    spec = attndsl.parse("attention t {\nparam sb[n]\nscore 0\nbias sb[i - j]\nmask j < i\n}\n")
    v = np.arange(3.0).reshape(1, 1, 3, 1)
    v_nan = v.copy()
    v_nan[0, 0, 2] = np.nan  # key 2 is masked for every row
    r = evaluate(spec, np.zeros((1, 1, 3, 1)), np.zeros((1, 1, 3, 1)), v_nan,
                 {"sb": [0.0, 0.0, math.log(2)]})
    assert r.out[0, 0, 0, 0] == 0 and r.lse[0, 0, 0] == -math.inf  # row 0 allows nothing
    assert r.out[0, 0, 1, 0] == 0.0  # only key 0
    # row 2: keys 0 (bias sb[2] = log 2) and 1 (sb[1] = 0): weights 2/3, 1/3
    assert r.out[0, 0, 2, 0] == pytest.approx(1 / 3)
    assert r.lse[0, 0, 2] == pytest.approx(math.log(3))


def test_sum_none_and_elementwise_normalizers() -> None:
    q, k = np.ones((1, 1, 1, 1)), np.array([1.0, 3.0]).reshape(1, 1, 2, 1)
    v = np.array([2.0, 4.0]).reshape(1, 1, 2, 1)
    total = evaluate(attndsl.parse("attention t {\nscore q . k\nnormalize sum\n}\n"), q, k, v)
    assert total.out[0, 0, 0, 0] == pytest.approx(0.25 * 2 + 0.75 * 4) and total.lse is None
    none = evaluate(attndsl.parse("attention t {\nscore q . k\nnormalize none\n}\n"), q, k, v)
    assert none.out[0, 0, 0, 0] == pytest.approx(1 * 2 + 3 * 4)
    spec = attndsl.parse("attention t {\nparam sb[heads]\nscore q . k\n"
                         "normalize sigmoid(s + sb[h])\n}\n")
    sig = evaluate(spec, q, k, v, {"sb": [-1.0]})
    want = 2 / (1 + math.exp(-0.0)) + 4 / (1 + math.exp(-2.0))
    assert sig.out[0, 0, 0, 0] == pytest.approx(want)
    empty = evaluate(attndsl.parse("attention t {\nscore q . k\nmask j > 5\nnormalize sum\n}\n"),
                     q, k, v)
    assert empty.out[0, 0, 0, 0] == 0


def test_softcap_and_gqa_head_map() -> None:
    spec = attndsl.parse("attention t {\nheads 4\nkv_heads 2\nscore 0\nsoftcap 2\n}\n")
    v = np.array([[1.0, 3.0], [10.0, 30.0]]).reshape(1, 2, 2, 1)  # per kv head
    r = evaluate(spec, np.zeros((1, 4, 1, 1)), np.zeros((1, 2, 2, 1)), v)
    assert r.out[0, :, 0, 0] == pytest.approx([2.0, 2.0, 20.0, 20.0])  # g(h) = h // 2
    capped = attndsl.parse("attention t {\nscore q . k\nsoftcap 2\nnormalize none\n}\n")
    q, k = np.full((1, 1, 1, 1), 3.0), np.ones((1, 1, 1, 1))
    out = evaluate(capped, q, k, np.ones((1, 1, 1, 1))).out
    assert out[0, 0, 0, 0] == pytest.approx(2 * math.tanh(1.5))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_match_numpy_target(path: Path) -> None:
    spec = attndsl.load(path)
    rng = np.random.default_rng(7)
    heads = spec.heads or 4
    kv = spec.kv_heads or (spec.heads if spec.heads else 2)
    B, n_q, n_k, d, dv = 2, 5, 5, 3, 2
    sizes = {"B": B, "heads": heads, "kv_heads": kv, "d": d, "dv": dv, "n_q": n_q, "n_k": n_k, "n": n_q,
             "r": 3}
    params = {p.name: rng.uniform(0.5, 1.5, [sizes.get(x, x) for x in p.dims])
              for p in spec.params}
    indices = {x.name: rng.integers(0, 3, [B] + [sizes.get(y, y) for y in x.dims])
               for x in spec.indices}
    q, k, v = (rng.normal(size=s) for s in ((B, heads, n_q, d), (B, kv, n_k, d), (B, kv, n_k, dv)))
    out, lse = attndsl.compile(spec, "numpy").forward(q, k, v, return_lse=True, **params,
                                                      **indices)
    ref = evaluate(spec, q, k, v, params, indices)
    assert fuzz_tiers.rel_err(out, ref.out) < 1e-12
    assert fuzz_tiers.rel_err(lse, ref.lse) < 1e-12 if lse is not None else ref.lse is None


def alibi_case() -> tuple[object, dict]:
    case = spec_gen.Case(spec_gen.GenSpec(Path(EXAMPLES[0]).read_text()), 1, 8, 2, 5, 5, 3, 2,
                         2, seed=3)
    assert "alibi" in case.gen.text
    spec = attndsl.parse(case.gen.text)
    return spec, spec_gen.arrays(case, spec)


def test_finite_differences_accept_right_and_catch_wrong_gradients() -> None:
    spec, a = alibi_case()
    extras = {**a["params"], **a["indices"]}
    grads = attndsl.compile(spec, "numpy").backward(a["q"], a["k"], a["v"], a["dout"], **extras)
    fuzz_tiers.gradients_match_fd(spec, grads, a, seed=3)
    for name in grads:
        wrong = {**grads, name: grads[name] * 0.999}
        with pytest.raises(fuzz_tiers.Mismatch, match=f"d{name}"):
            fuzz_tiers.gradients_match_fd(spec, wrong, a, seed=3)


def test_comparisons_catch_nan_and_small_errors() -> None:
    x = np.array([1.0, -np.inf, 2.0])
    assert fuzz_tiers.rel_err(x, x.copy()) == 0
    assert fuzz_tiers.rel_err(x + [0, 0, 1e-7], x) > 1e-9
    assert fuzz_tiers.rel_err([1.0, np.nan], [1.0, 2.0]) == np.inf
    assert fuzz_tiers.rel_err([1.0, 0.0], [1.0, -np.inf]) == np.inf
    with pytest.raises(fuzz_tiers.Mismatch, match="numpy lse"):
        fuzz_tiers.expect_close("c", "numpy", "lse", None, x, 1e-9)


# ---- a poisoned entry that SymPy cancels (fuzz seeds 21, 22) ----------------------------------


@pytest.mark.parametrize("text", [
    "param sb[heads]\n    param pos[n_k]\n    score (q . tanh((q - q) ^ 2))\n    bias pos[j]",
    "param W[d, r]\n    param wr[r]\n    score tanh(sum(((q @ W) - ((q @ W) - wr))))",
], ids=["power_of_a_cancelled_vector", "cancelled_projection"])
def test_a_nan_that_sympy_cancels_is_not_a_mismatch(text: str) -> None:
    """The numpy target never reads the NaN (SymPy simplified its operand away); the oracle
    then checks it against its own result with two finite values in the NaN's place."""
    gen = spec_gen.GenSpec(f"attention t {{\n    {text}\n}}")
    for seed in range(4):
        fuzz_tiers.tier_numpy(spec_gen.Case(gen, 1, 2, 2, 5, 6, 3, 2, 2, seed, "q"))


def test_a_nan_that_matters_is_still_a_mismatch() -> None:
    """relu(NaN) = 0 (the cpu bug of fuzz seed 2000) would pass as a cancelled NaN only if the
    row did not depend on q; it does, so the oracle keeps its NaN."""
    spec = attndsl.parse("attention t {\n    score relu(q . k)\n    normalize none\n}")
    rng = np.random.default_rng(0)
    a = {"q": rng.normal(size=(1, 2, 4, 3)), "k": rng.normal(size=(1, 2, 5, 3)),
         "v": rng.normal(size=(1, 2, 5, 2)), "params": {}, "indices": {}}
    a["q"][0, 1, 2, 0] = np.nan
    assert fuzz_tiers._cancelled_poison(spec, a) is None
