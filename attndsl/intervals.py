"""Interval bounds of SymPy expressions: deciding a mask over a whole block of pairs.

A mask atom such as `doc[i] == doc[j]` or `abs(i // 16 - j // 16) <= 2` holds for all, none or
some of the pairs of a block (queries i in [q0, q1), keys j in [k0, k1)). Given an interval for
each free symbol (the positions, and the least and greatest value each lookup reads there),
`bounds` gives an interval containing every value of an expression, and `decide` turns the
interval of `lhs - rhs` into True (the atom holds on every pair), False (on none) or None (some,
or unknown). Sound by construction: an interval is never narrower than the values it bounds;
anything not understood is unknown. Arithmetic is exact (Fractions), so `floor(i / 3)` at
i = 3 m never rounds down to m - 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

import sympy as sp

Interval = tuple[Fraction, Fraction]  # (least, greatest), both included


def interval(lo: float | Fraction, hi: float | Fraction) -> Interval | None:
    """An interval from two finite numbers (None when either is not: NaN, inf)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return Fraction(lo), Fraction(hi)


def bounds(e: sp.Basic, known: Mapping[sp.Symbol, Interval]) -> Interval | None:
    """An interval holding every value of `e` when each symbol lies in its `known` interval;
    None when a symbol is unknown or `e` uses what this module does not bound."""
    if isinstance(e, sp.Rational):
        return Fraction(int(e.p), int(e.q)), Fraction(int(e.p), int(e.q))
    if isinstance(e, sp.Float):
        return interval(float(e), float(e))
    if isinstance(e, sp.Symbol):
        return known.get(e)
    parts: list[Interval] = []
    for a in e.args:
        part = bounds(a, known)
        if part is None:
            return None
        parts.append(part)
    if isinstance(e, sp.Add):
        return sum((p[0] for p in parts), Fraction(0)), sum((p[1] for p in parts), Fraction(0))
    if isinstance(e, sp.Mul):
        result = parts[0]
        for p in parts[1:]:
            products = [a * b for a in result for b in p]
            result = min(products), max(products)
        return result
    if isinstance(e, sp.Pow) and isinstance(e.exp, sp.Integer):
        return _power(parts[0], int(e.exp))
    if isinstance(e, sp.Abs):
        lo, hi = parts[0]
        return (lo, hi) if lo >= 0 else (-hi, -lo) if hi <= 0 else (Fraction(0), max(-lo, hi))
    if isinstance(e, sp.floor):
        return Fraction(math.floor(parts[0][0])), Fraction(math.floor(parts[0][1]))
    if isinstance(e, sp.ceiling):
        return Fraction(math.ceil(parts[0][0])), Fraction(math.ceil(parts[0][1]))
    if isinstance(e, sp.Min):
        return min(p[0] for p in parts), min(p[1] for p in parts)
    if isinstance(e, sp.Max):
        return max(p[0] for p in parts), max(p[1] for p in parts)
    if isinstance(e, sp.Mod):
        return _mod(parts[0], parts[1])
    return None


def _power(x: Interval, n: int) -> Interval | None:
    lo, hi = x
    if n < 0:
        if lo <= 0 <= hi:
            return None
        return _power((1 / hi, 1 / lo), -n)
    ends = sorted((lo ** n, hi ** n))
    if n % 2 == 0 and lo < 0 < hi:
        return Fraction(0), ends[1]
    return ends[0], ends[1]


def _mod(x: Interval, m: Interval) -> Interval | None:
    """Mod(x, m) for a constant m > 0 (SymPy's Mod takes the sign of m: in [0, m))."""
    if m[0] != m[1] or m[0] <= 0:
        return None
    m_ = m[0]
    period = math.floor(x[0] / m_)
    if math.floor(x[1] / m_) == period:  # x stays in one period: Mod is x shifted
        return x[0] - period * m_, x[1] - period * m_
    return Fraction(0), m_


def decide(atom: sp.Basic, known: Mapping[sp.Symbol, Interval]) -> bool | None:
    """True if the comparison `atom` holds wherever its symbols lie in `known`, False if it
    holds nowhere, None if it may do either (or is not a comparison this module bounds)."""
    if not isinstance(atom, sp.core.relational.Relational):
        return None
    d = bounds(sp.expand(atom.lhs - atom.rhs), known)
    if d is None:
        return None
    lo, hi = d
    op = atom.rel_op
    if op == "<":
        return True if hi < 0 else False if lo >= 0 else None
    if op == "<=":
        return True if hi <= 0 else False if lo > 0 else None
    if op == ">":
        return True if lo > 0 else False if hi <= 0 else None
    if op == ">=":
        return True if lo >= 0 else False if hi < 0 else None
    if op == "==":
        return True if lo == hi == 0 else False if lo > 0 or hi < 0 else None
    if op == "!=":
        return False if lo == hi == 0 else True if lo > 0 or hi < 0 else None
    return None


def fold(mask: sp.Basic, known: Mapping[sp.Symbol, Interval]) -> bool | None:
    """The mask over the whole block: True (every pair allowed), False (none) or None."""
    decided = {}
    for atom in mask.atoms(sp.core.relational.Relational):
        value = decide(atom, known)
        if value is not None:
            decided[atom] = sp.true if value else sp.false
    folded = mask.xreplace(decided)
    return True if folded is sp.true else False if folded is sp.false else None
