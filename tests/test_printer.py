"""Operator precedence of every code printer (issue 8, item 4): a golden table and its meaning.

Each case is a spec expression `(L) OP (R)` with compound operands on both sides, every
operator of the language as OP and every operator at the top of L and of R. It goes through
parse -> check -> derive, is printed by the NumPy printer (`xp.*`), the Numba CPU printer
(`fx.*`, `F(...)`) and the CUDA printer (Numba CUDA source is Python), and
  (a) the printed strings must equal tests/golden/printer_precedence.txt
      (ATTNDSL_UPDATE_GOLDEN=1 rewrites it; review the diff);
  (b) evaluating each printed string in Python, with integers (negative ones too) bound to
      the names, must give what a direct walk of the checked IR gives with Python's own
      operators (floor semantics: -1 // 4 == -1, -1 % 4 == 3) — no SymPy and no printer.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import types
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import attndsl
from attndsl import check, ir
from attndsl.codegen.cuda_printer import CudaPrinter
from attndsl.codegen.numba_cpu import NumbaPrinter, floatify
from attndsl.codegen.printer import KernelPrinter
from attndsl.runtime import numpy_ops
from attndsl.symbolic import Deriver, Lookup

GOLDEN = Path(__file__).resolve().parent / "golden" / "printer_precedence.txt"
NAMES = ("x", "y", "z", "w")

# Operand forms: the operator at their top, written over two names {0} and {1}.
INT_FORMS = ["{0} + {1}", "{0} - {1}", "{0} * {1}", "{0} // {1}", "{0} % {1}", "-{0}",
             "min({0}, {1})", "max({0}, {1})", "abs({0} - {1})", "where({0} < {1}, {0}, 2)",
             "clamp({0}, -1, {1})", "floor({0} / {1})", "ceil({0} / {1})", "round({0} / {1})",
             "{0}"]
FLOAT_FORMS = ["{0} / {1}", "{0} ^ {1}", "exp({0} - {1})", "{0} * 0.5"]
BOOL_FORMS = ["{0} < {1}", "{0} <= {1}", "{0} > {1}", "{0} >= {1}", "{0} == {1}", "{0} != {1}",
              "{0} < {1} and {1} < 2", "{0} < {1} or {1} < 2", "not {0} < {1}"]
NUMBER_FORMS = INT_FORMS + FLOAT_FORMS

# Outer operators: (template over two operands, forms allowed as operands).
OUTER = {
    **{op: ("({0}) " + op + " ({1})", NUMBER_FORMS) for op in ("+", "-", "*", "/", "^")},
    **{op: ("({0}) " + op + " ({1})", INT_FORMS) for op in ("//", "%")},
    **{op: ("({0}) " + op + " ({1})", NUMBER_FORMS)
       for op in ("==", "!=", "<", "<=", ">", ">=")},
    **{op: ("({0}) " + op + " ({1})", BOOL_FORMS) for op in ("and", "or")},
    "unary -": ("-({0})", NUMBER_FORMS),
    "not": ("not ({0})", BOOL_FORMS),
    "call": ("tanh({0})", NUMBER_FORMS),
    "min": ("min({0}, {1})", NUMBER_FORMS),
    "max": ("max({0}, {1})", NUMBER_FORMS),
    "where": ("where(x < w, {0}, {1})", NUMBER_FORMS),
    "clamp": ("clamp({0}, -2, {1})", NUMBER_FORMS),
    "floor": ("floor({0})", NUMBER_FORMS),
    "ceil": ("ceil({0})", NUMBER_FORMS),
    "round": ("round({0})", NUMBER_FORMS),
}


def cases() -> list[tuple[str, str]]:
    """(outer operator, spec expression): every form on the left and on the right."""
    out = []
    for op, (template, forms) in OUTER.items():
        for n, left in enumerate(forms):
            right = forms[(n + 1) % len(forms)]
            out.append((op, template.format(left.format("x", "y"), right.format("z", "w"))))
    return out


# ---- the meaning: a direct walk of the checked IR with Python's operators --------------------

BINARY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
          "/": lambda x, y: x / y, "^": lambda x, y: x ** y, "//": lambda x, y: x // y,
          "%": lambda x, y: x % y, "==": lambda x, y: x == y, "!=": lambda x, y: x != y,
          "<": lambda x, y: x < y, "<=": lambda x, y: x <= y, ">": lambda x, y: x > y,
          ">=": lambda x, y: x >= y}
CALLS = {"min": min, "max": max, "abs": abs, "exp": math.exp, "tanh": math.tanh,
         "floor": math.floor, "ceil": math.ceil, "round": round,  # round: a tie to even
         "clamp": lambda x, lo, hi: min(max(x, lo), hi)}


def meaning(e: ir.Expr, env: dict[str, int]) -> object:
    if isinstance(e, ir.Num):
        return int(e.text) if e.is_int else float(e.text)
    if isinstance(e, ir.Name):
        return env[e.name]
    if isinstance(e, ir.Unary):
        value = meaning(e.operand, env)
        return (not value) if e.op == "not" else -value
    if isinstance(e, ir.Binary):
        left, right = meaning(e.left, env), meaning(e.right, env)
        if e.op in ("and", "or"):
            return (left and right) if e.op == "and" else (left or right)
        return BINARY[e.op](left, right)
    assert isinstance(e, ir.Call)
    if e.func == "where":
        cond, yes, no = (meaning(a, env) for a in e.args)
        return yes if cond else no
    return CALLS[e.func](*(meaning(a, env) for a in e.args))


# ---- the three printers --------------------------------------------------------------------


def derived(text: str) -> tuple[ir.Expr, sp.Basic, dict[sp.Symbol, str], ir.Kind]:
    """The checked IR, its SymPy form, the names of its symbols and its kind."""
    decls = "\n".join(f"index {n}" for n in NAMES)
    try:  # a boolean is a mask, a number a bias
        spec = check.check(attndsl.parse(f"attention t {{\n{decls}\nscore q . k\n"
                                         f"mask {text}\n}}"))
        expr = spec.mask
    except attndsl.SpecError:
        spec = check.check(attndsl.parse(f"attention t {{\n{decls}\nscore q . k\n"
                                         f"bias {text}\n}}"))
        expr = spec.bias
    assert expr is not None and expr.type is not None
    deriver = Deriver(spec)
    value = deriver.scalar(expr)
    names = {n.symbol: n.array for n in deriver.out.nodes if isinstance(n, Lookup)}
    return expr, value, names, expr.type.kind


def printed(value: sp.Basic, names: dict[sp.Symbol, str], kind: ir.Kind) -> dict[str, str]:
    numba = NumbaPrinter(dict(names))
    cuda = CudaPrinter(names, {})
    return {
        "numpy": KernelPrinter("xp", names).doprint(value),
        "cpu": numba.doprint(floatify(value) if kind is ir.Kind.FLOAT else value),
        "cuda": {ir.Kind.FLOAT: cuda.num, ir.Kind.INT: cuda.int_, ir.Kind.BOOL: cuda.bool_}[
            kind](value),
        "cuda_consts": cuda.consts,
    }


FX = types.SimpleNamespace(  # numba_funcs' scalar functions, in plain Python
    exp=math.exp, tanh=math.tanh, abs=abs, maximum=max, minimum=min,
    clamp=lambda x, lo, hi: min(max(x, lo), hi),
    floor=lambda x: float(math.floor(x)), ceil=lambda x: float(math.ceil(x)),
    rint=lambda x: float(round(x)), ifloor=math.floor, iceil=math.ceil, iround=round)


def namespace(target: str, env: dict[str, int], consts: dict[str, str]) -> dict[str, object]:
    if target == "numpy":
        return {"xp": numpy_ops, **{k: np.int64(v) for k, v in env.items()}}
    if target == "cpu":
        return {"fx": FX, "F": float, **env}
    table = {name: float(literal) for name, literal in consts.items()}
    return {"math": math, "F": float, "ONE": 1.0, "ZERO": 0.0, "HALF": 0.5, "NEG_INF": -math.inf, **table, **env}


POINTS = [dict(zip(NAMES, p)) for p in
          random.Random(8).sample(list(itertools.product(range(-3, 4), repeat=4)), 60)]


def _same(got: object, want: object) -> bool:
    got = got.item() if hasattr(got, "item") else got
    if isinstance(want, bool) or isinstance(got, (bool, np.bool_)):
        return bool(got) == bool(want)
    return math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12)


def _golden_text() -> str:
    lines = []
    for op, text in cases():
        _, value, names, kind = derived(text)
        out = printed(value, names, kind)
        lines.append(f"[{op}] {text}")
        lines += [f"  {target:<5} {out[target]}" for target in ("numpy", "cpu", "cuda")]
    return "\n".join(lines) + "\n"


def test_item4_precedence_golden_table() -> None:
    text = _golden_text()
    if os.environ.get("ATTNDSL_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


@pytest.mark.parametrize("op", list(OUTER))
def test_item4_precedence_meaning(op: str) -> None:
    """Every printed case evaluates to the IR's meaning at 60 integer points (negatives too)."""
    for outer, text in cases():
        if outer != op:
            continue
        expr, value, names, kind = derived(text)
        out = printed(value, names, kind)
        checked = 0
        for env in POINTS:
            try:
                want = meaning(expr, env)
            except (ZeroDivisionError, OverflowError, ValueError):
                continue  # x // 0, 0 ^ -1: undefined in the language too
            if isinstance(want, complex) or (isinstance(want, float) and not math.isfinite(want)):
                continue  # (-2) ^ 0.5
            for target in ("numpy", "cpu", "cuda"):
                with np.errstate(all="ignore"):
                    got = eval(out[target], namespace(target, env, out["cuda_consts"]))
                assert _same(got, want), (f"{target}: {text} printed as {out[target]} gives "
                                          f"{got} at {env}, the IR says {want}")
            checked += 1
        assert checked >= 10, f"{text}: only {checked} points defined"


def test_item4_floor_semantics_of_printed_division() -> None:
    """The two Python facts the table relies on, through every printer."""
    for text, want in (("x // w", -1), ("x % w", 3)):
        _, value, names, kind = derived(text)
        out = printed(value, names, kind)
        for target in ("numpy", "cpu", "cuda"):
            got = eval(out[target], namespace(target, {"x": -1, "y": 0, "z": 0, "w": 4}, {}))
            assert int(got) == want, (target, out[target])


def test_item4_cpu_printer_compiles_with_numba() -> None:
    """The Python stand-in for numba_funcs above cannot see Numba's typing (fx.exp of an int,
    fx.maximum of two ints, math.floor's type): every 4th case, one case of every operator at
    least, is compiled with Numba and checked against the IR's meaning at 12 points."""
    from numba import njit

    from attndsl.runtime import numba_funcs

    chosen = cases()[::4]
    assert {op for op, _ in chosen} == set(OUTER)
    glob = {"math": math, "np": np, "fx": numba_funcs, "F": np.float64}
    for op, text in chosen:
        expr, value, names, kind = derived(text)
        source = f"def case(x, y, z, w):\n    return {printed(value, names, kind)['cpu']}\n"
        scope: dict[str, object] = {}
        exec(compile(source, f"<{text}>", "exec"), glob, scope)  # noqa: S102 - printed by us
        compiled = njit(scope["case"])
        for env in POINTS[:12]:
            try:
                want = meaning(expr, env)
            except (ZeroDivisionError, OverflowError, ValueError):
                continue
            if isinstance(want, complex) or (isinstance(want, float) and not math.isfinite(want)):
                continue
            got = compiled(*(np.int64(env[n]) for n in NAMES))
            assert _same(got, want), f"{op}: {text} -> {source} gives {got} at {env}, not {want}"


def test_item4_spec_printer_round_trips_every_case() -> None:
    """ir.to_text (error messages, `attndsl check`) is the fourth printer: written back and
    parsed again, every case gives the same tree."""
    for _, text in cases():
        expr = derived(text)[0]
        again = derived(ir.to_text(expr))[0]
        assert again == expr, (text, ir.to_text(expr))
