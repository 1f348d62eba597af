"""Decoding on the cpu target (`_attn_decode` + `_decode_merge`, issue 12 item 6): a few query
rows (n_q x the query heads of a key/value head <= DECODE_ROWS) against many keys take the
flash-decoding path: rows of a GQA group packed per task, keys split into ranges, ranges merged
through their running state. Every example it serves agrees with the NumPy reference on out and
lse at decoder-step offsets, with key counts that are not multiples of the tile, ranges that are
uneven or empty, rows the mask leaves empty, NaN kept out of masked pairs and propagated from
allowed ones, and the same out-of-range error as the tiled forward."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attndsl
from attndsl.runtime import cpu_kernel
from tests.cpu_helpers import (
    EXAMPLE_NAMES,
    head_counts,
    load_spec,
    make_inputs,
    rel_error,
    uses_n,
)

_KERNELS: dict[str, tuple[Any, Any]] = {}


def kernels(name: str) -> tuple[Any, Any]:
    """(numpy reference, cpu) of an example, compiled once per session."""
    if name not in _KERNELS:
        spec = load_spec(name)
        _KERNELS[name] = (attndsl.compile(spec, target="numpy"),
                          attndsl.compile(spec, target="cpu"))
    return _KERNELS[name]


def one_sequence(name: str) -> bool:
    """The spec uses n (queries and keys are one sequence): n_q = n_k, no offsets."""
    return uses_n(load_spec(name))


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The split counts of the decode calls that follow (so a test knows the path ran)."""
    calls: list[int] = []
    splits = cpu_kernel._decode_splits

    def spy(tasks: int, n_k: int) -> int:
        calls.append(splits(tasks, n_k))
        return calls[-1]

    monkeypatch.setattr(cpu_kernel, "_decode_splits", spy)
    return calls


DECODING = [n for n in EXAMPLE_NAMES if n not in ("linear", "causal_linear")]
FLOAT32 = ("alibi", "bahdanau", "sigmoid", "softcap")  # float32 compiles again: a few suffice


@pytest.mark.parametrize("name", DECODING)
def test_decode_matches_the_reference_at_a_decoder_step(name: str, taken: list[int]) -> None:
    """n_q = 1 and 2 rows at the end of 1100 keys (GQA 4:2 where the spec allows), float64 to
    1e-12 against the reference; float32 to 1e-4 for a few specs (ALiBi's bias reaches logits
    of a few hundred at 1100 keys, rounded to float32 by ~3e-5 relative, as the tiled forward
    is)."""
    ref, cpu = kernels(name)
    spec = ref.spec
    heads, kv = head_counts(spec, 4, 2)
    cases = [(1, np.float64, 1e-12), (2, np.float64, 1e-12)]
    if name in FLOAT32:
        cases.append((2, np.float32, 1e-4))
    for n_q, dtype, tol in cases:
        n_k = n_q if one_sequence(name) else 1100
        if n_q * heads // kv > cpu_kernel.DECODE_ROWS:
            continue
        q, k, v, extra = make_inputs(spec, dtype, B=2, heads=4, kv_heads=2, n_q=n_q, n_k=n_k,
                                     seed=3)
        offset = {} if one_sequence(name) else {"q_offset": n_k - n_q}
        want = ref.forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                           return_lse=True, **offset, **_as64(extra))
        got = cpu.forward(q, k, v, return_lse=True, **offset, **extra)
        assert rel_error(want[0], got[0]) <= tol, (name, n_q, dtype)
        if want[1] is not None:
            assert rel_error(want[1], got[1]) <= tol, (name, n_q, dtype)
    assert taken, "the decode path did not run"


def _as64(extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: (a.astype(np.float64) if a.dtype.kind == "f" else a) for n, a in extra.items()}


@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("name", ["alibi", "sliding_window_sink", "sigmoid", "prefix_lm"])
def test_uneven_and_empty_key_ranges_merge_exactly(name: str, splits: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """n_k = 1300 in ranges of whole decoding tiles (DK = 512): 3 splits give 512, 512 and
    276 keys, 7 give the same and 4 empty ranges; sliding_window_sink's window leaves most
    ranges without an allowed key (their state merges as nothing)."""
    ref, cpu = kernels(name)
    monkeypatch.setattr(cpu_kernel, "_decode_splits", lambda tasks, n_k: splits)
    heads, kv = head_counts(ref.spec, 4, 2)
    n_q = 2 if 2 * heads // kv <= cpu_kernel.DECODE_ROWS else 1
    n_k = n_q if one_sequence(name) else 1300
    q, k, v, extra = make_inputs(ref.spec, np.float64, B=2, heads=4, kv_heads=2, n_q=n_q,
                                 n_k=n_k, seed=4)
    offset = {} if one_sequence(name) else {"q_offset": n_k - n_q}
    want = ref.forward(q, k, v, return_lse=True, **offset, **extra)
    got = cpu.forward(q, k, v, return_lse=True, **offset, **extra)
    assert rel_error(want[0], got[0]) <= 1e-12
    if want[1] is not None:
        assert rel_error(want[1], got[1]) <= 1e-12


def test_rows_the_mask_empties_give_zero_and_the_empty_lse(taken: list[int]) -> None:
    """k_offset 5: query position 0 sees no key (causal) -> out 0, lse -inf; with a sink the
    lse is the sink's logit."""
    for name, empty in (("causal", None), ("sliding_window_sink", "sink")):
        ref, cpu = kernels(name)
        q, k, v, extra = make_inputs(ref.spec, np.float64, B=1, heads=4, kv_heads=2, n_q=2,
                                     n_k=200, seed=5)
        out, lse = cpu.forward(q, k, v, return_lse=True, q_offset=0, k_offset=5, **extra)
        want_out, want_lse = ref.forward(q, k, v, return_lse=True, q_offset=0, k_offset=5,
                                         **extra)
        np.testing.assert_array_equal(out[:, :, 0], 0)
        expected = -np.inf if empty is None else np.broadcast_to(extra["sink"][None, :],
                                                                  (1, 4))
        np.testing.assert_allclose(lse[:, :, 0], expected, rtol=1e-12)
        assert rel_error(want_out, out) <= 1e-12 and rel_error(want_lse, lse) <= 1e-12
    assert taken


def test_nan_stays_out_of_masked_pairs_and_spreads_from_allowed_ones(taken: list[int]) -> None:
    """A NaN in v at a key after the query (masked by causal) changes nothing (up to the
    rounding of the loop that mixes a value tile holding a NaN, against BLAS's); a NaN in q
    makes its head's row NaN, and only it."""
    ref, cpu = kernels("causal")
    q, k, v, _ = make_inputs(ref.spec, np.float64, B=1, heads=4, kv_heads=2, n_q=1, n_k=700,
                             seed=6)
    clean = cpu.forward(q, k, v, q_offset=600)
    v[0, 0, 650] = np.nan
    np.testing.assert_allclose(cpu.forward(q, k, v, q_offset=600), clean, rtol=1e-13, atol=0)
    q[0, 1, 0, 2] = np.nan
    out, lse = cpu.forward(q, k, v, return_lse=True, q_offset=600)
    assert np.isnan(out[0, 1]).all() and np.isnan(lse[0, 1]).all()
    np.testing.assert_allclose(np.delete(out, 1, axis=1), np.delete(clean, 1, axis=1),
                               rtol=1e-13, atol=0)
    assert taken


def test_an_inf_in_v_spreads_only_where_the_reference_spreads_it(taken: list[int]) -> None:
    """An inf in v at an allowed key (first tile) makes its column inf in every row of the
    group, and the later tiles (mixed again by the loop that skips weights of 0, since acc
    is no longer finite) still add up as the reference does; an inf at a masked key and a
    NaN at another change nothing."""
    ref, cpu = kernels("causal")
    q, k, v, _ = make_inputs(ref.spec, np.float64, B=1, heads=4, kv_heads=2, n_q=1, n_k=1500,
                             seed=8)
    v[0, 0, 1300], v[0, 1, 1400] = np.inf, np.nan  # after the query: masked
    v[0, 0, 100, 1] = np.inf
    want = ref.forward(q, k, v, q_offset=1200)
    got = cpu.forward(q, k, v, q_offset=1200)
    assert np.isinf(got[0, :2, 0, 1]).all() and np.isfinite(np.delete(got[0, :2, 0], 1, -1)).all()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)  # inf == inf
    assert taken


def test_an_out_of_range_subscript_is_reported_as_by_the_tiled_forward(
        taken: list[int]) -> None:
    spec = attndsl.parse("attention t {\n param table[heads, 5]\n score q . k\n"
                         " bias table[h, j - i + 2]\n}")
    cpu = attndsl.compile(spec, target="cpu")
    q, k, v, extra = make_inputs(spec, np.float64, B=1, heads=2, kv_heads=2, n_q=1, n_k=9)
    with pytest.raises(ValueError, match="a subscript of 'table' is out of range"):
        cpu.forward(q, k, v, **extra)
    assert taken
    q_long = np.repeat(q, 40, axis=2)  # 40 rows: the tiled forward
    with pytest.raises(ValueError, match="a subscript of 'table' is out of range"):
        cpu.forward(q_long, k, v, **extra)
