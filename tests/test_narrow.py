"""Integers in float math go through int32 when every position fits (numba_cpu.NARROW_LIMIT):
which expressions qualify, and that both copies of a pair loop (narrow and not) give the
reference's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

import attndsl
from attndsl.codegen import numba_cpu
from attndsl.codegen.numba_cpu import NARROW_LIMIT, narrowable
from attndsl.symbolic import OFFSETS, POSITIONS, SIZES
from tests.cpu_helpers import make_inputs, rel_error

i, j, h = POSITIONS["i"], POSITIONS["j"], POSITIONS["h"]


def test_narrowable_takes_affine_position_expressions_whose_bound_fits_int32() -> None:
    assert narrowable(j - i) and narrowable(i) and narrowable(j - i + 7)
    assert narrowable(3 * (j - i) + SIZES["n_k"] - OFFSETS["k"] + h)
    assert not narrowable(i * j)  # a product: no bound from the positions' bound
    assert not narrowable(sp.Max(8, sp.Abs(i - j)))  # not a polynomial: left as it is
    assert not narrowable(SIZES["d"])  # the same for every pair: converted once
    assert not narrowable(sp.Integer(3))
    assert not narrowable(40 * (j - i))  # 80 * 2^26 >= 2^31
    assert not narrowable(j - i + 2**31)


def test_the_alibi_pair_loops_print_both_copies() -> None:
    source = numba_cpu.emit_source(attndsl.load("examples/alibi.attn"), "float64")
    assert "(F(np.int32(-pi + pj)) if narrow else F(-pi + pj))" in source
    assert source.count("narrow = sz[11] != 0") >= 3  # forward, backward, decoding


@pytest.mark.parametrize("offset", [NARROW_LIMIT - 200, NARROW_LIMIT - 20],
                         ids=["narrow", "int64"])
def test_alibi_matches_the_reference_on_either_side_of_the_limit(offset: int) -> None:
    """Offsets just below the limit (positions fit: int32) and across it (int64): forward,
    lse and every gradient (the slope's sums (j - i) over pairs) match in float64."""
    spec = attndsl.load("examples/alibi.attn")
    cpu, ref = attndsl.compile(spec, target="cpu"), attndsl.compile(spec, target="numpy")
    q, k, v, extra = make_inputs(spec, np.float64, B=2, heads=8, kv_heads=2, n_q=37, n_k=70)
    at = {"q_offset": offset + 33, "k_offset": offset}
    dout = np.random.default_rng(3).standard_normal((2, 8, 37, 3))
    out, lse = cpu.forward(q, k, v, return_lse=True, **at, **extra)
    want_out, want_lse = ref.forward(q, k, v, return_lse=True, **at, **extra)
    assert rel_error(want_out, out) <= 1e-12 and rel_error(want_lse, lse) <= 1e-12
    got = cpu.backward(q, k, v, dout, **at, **extra)
    want = ref.backward(q, k, v, dout, **at, **extra)
    assert set(got) == set(want)
    for name in want:
        assert rel_error(want[name], got[name]) <= 1e-11, name


def test_no_narrow_copy_inside_a_power() -> None:
    """tau ^ (j - i) in a narrow (vectorized) loop crashed the process once optimized (see
    NumbaPrinter._print_Pow): powers keep the int64 conversion; the product beside them does
    not."""
    spec = attndsl.parse("attention p {\n param tau\n score q . k\n"
                         " bias 0.5 * (tau ^ (j - i)) + 0.25 * (j - i)\n}")
    source = numba_cpu.emit_source(spec, "float32")
    assert "**F(F(-pi + pj))" in source and "(F(np.int32(-pi + pj)) if narrow" in source
    assert "**F((F(np.int32" not in source
