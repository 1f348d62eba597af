"""Interval bounds of mask atoms (attndsl/intervals.py): what ring attention skips by.

Soundness is the property that matters: whenever a block is declared "all" or "none", every
pair in it agrees, checked pair by pair on random blocks and random lookup values."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import sympy as sp

from attndsl.intervals import bounds, decide, fold, interval

i, j = sp.Symbol("i", integer=True, nonnegative=True), sp.Symbol("j", integer=True,
                                                                  nonnegative=True)
a, b = sp.Symbol("a", integer=True), sp.Symbol("b", integer=True)


def test_bounds_of_arithmetic_are_exact_where_they_can_be() -> None:
    known = {i: interval(3, 9), j: interval(-2, 4)}
    assert bounds(i - j, known) == (Fraction(-1), Fraction(11))
    assert bounds(sp.Abs(i - j), known) == (Fraction(0), Fraction(11))
    assert bounds(sp.floor(i / 3), known) == (Fraction(1), Fraction(3))  # exact at i = 3, 9
    assert bounds(sp.Mod(i, 16), known) == (Fraction(3), Fraction(9))  # one period: shifted
    assert bounds(sp.Mod(i + 10, 16), known) == (Fraction(0), Fraction(16))  # wraps
    assert bounds(j ** 2, known) == (Fraction(0), Fraction(16))
    assert bounds(sp.Max(i, j), known) == (Fraction(3), Fraction(9))
    assert bounds(sp.exp(i), known) is None  # not bounded here: unknown, never guessed
    assert bounds(i + a, known) is None  # an unknown symbol
    assert interval(float("nan"), 1.0) is None


def test_decide_each_comparison() -> None:
    known = {a: interval(0, 4), b: interval(5, 9)}
    assert decide(sp.Eq(a, b), known) is False
    assert decide(sp.Ne(a, b), known) is True
    assert decide(a < b, known) is True
    assert decide(a >= b, known) is False
    assert decide(sp.Eq(a, b), {a: interval(0, 5), b: interval(5, 9)}) is None
    assert decide(sp.Eq(a, b), {a: interval(5, 5), b: interval(5, 5)}) is True


MASKS = [
    sp.Eq(a, b) & (j <= i),  # document ids a = doc[i], b = doc[j]
    (j <= i) & (i - j < 7),  # sliding window
    (j <= i) | (j < a),  # prefix LM, a = prefix
    (sp.Abs(sp.floor(i / 4) - sp.floor(j / 4)) <= 1) & (sp.Abs(sp.Mod(i, 4) - sp.Mod(j, 4)) <= 1),
    sp.Ne(sp.floor(i / 5), sp.floor(j / 3)) | (a > 2),
    sp.Eq(sp.Mod(i - j, 3), 0),
]


@pytest.mark.parametrize("n", range(len(MASKS)))
def test_a_decided_block_agrees_with_every_pair(n: int) -> None:
    mask = MASKS[n]
    check = sp.lambdify((i, j, a, b), mask, "math")
    rng = np.random.default_rng(n)
    decided = 0
    for _ in range(300):
        q0, k0 = (int(x) for x in rng.integers(0, 40, 2))
        q1, k1 = q0 + int(rng.integers(1, 9)), k0 + int(rng.integers(1, 9))
        doc_q = np.sort(rng.integers(0, 6, q1 - q0))  # a lookup's values over the block
        doc_k = np.sort(rng.integers(0, 6, k1 - k0))
        known = {i: interval(q0, q1 - 1), j: interval(k0, k1 - 1),
                 a: interval(doc_q.min(), doc_q.max()), b: interval(doc_k.min(), doc_k.max())}
        seen = fold(mask, known)
        if seen is None:
            continue
        decided += 1
        for (x, y), (u, w) in zip(itertools.product(range(q0, q1), range(k0, k1)),
                                  itertools.product(doc_q, doc_k)):
            assert bool(check(x, y, int(u), int(w))) == seen, (mask, x, y, u, w)
    assert decided >= 5  # the property was tested, not skipped
