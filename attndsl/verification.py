"""Verification: a symbolic proof of the gradients and numeric checks of every target.

Proof. At small sizes (B = 1, n_q x n_k = 3 x 3 or 2 x 3, d = 4, dv = 2, two heads where the spec
has GQA) the naive forward of LANGUAGE.md section 1 is built with SymPy symbols, L = sum(out * G)
(+ sum(lse * G_lse) for the softmax family, so the lse adjoint dlse is proved too) is
differentiated with `sympy.diff`, and the result is compared, entry by entry, with the
gradients the generated reference computes when it runs over SymPy object arrays.
  * "exact": every transcendental function application (exp, tanh, sigmoid, ...) is replaced by
    an independent random value of its exact argument and both sides are evaluated in exact
    rational arithmetic at 3 random points. Equal as rational functions of independent symbols
    means equal for every function, so this is a Schwartz-Zippel certificate: the chance that a
    wrong gradient passes is at most (deg / 2^61)^3 per entry.
  * "mpmath-60": where roots make the exact method inapplicable, both sides are evaluated with
    the true functions at 60 significant digits at 3 random points (agreement < 1e-40).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any, ClassVar

import mpmath
import numpy as np
import sympy as sp

from . import functions as fn
from . import ir, normalizers
from .codegen import numpy_ref
from .progress import quiet
from .runtime import cache, symbolic_ops
from .symbolic import POSITIONS, SIZES, Derivation, Lookup, Reduction, Vec, derive

SCALE = 2**61  # random values are drawn from integers up to this size
FLOAT_CONSTANT_TOLERANCE = 1e-12  # mpmath agreement where an expression holds float64 numbers
TARGETS = ("numpy", "cpu", "cuda")


@dataclasses.dataclass
class Check:
    what: str
    ok: bool
    method: str
    detail: str
    seconds: float = 0.0
    ran: bool = True  # False: the check could not be run (detail says why); not ok either


@dataclasses.dataclass
class Report:
    spec: str
    checks: list[Check] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def status(self) -> str:
        """ok; FAILED (a check found a difference); INCOMPLETE (some check could not run)."""
        if any(not c.ok and c.ran for c in self.checks):
            return "FAILED"
        return "ok" if self.ok else "INCOMPLETE"

    def __str__(self) -> str:
        width = max([len(c.what) for c in self.checks] + [10])
        lines = [f"verify {self.spec}: {self.status}"]
        for c in self.checks:
            mark = "ok  " if c.ok else "FAIL" if c.ran else "SKIP"
            lines.append(f"  {mark} {c.what:<{width}}  {c.method:<12} {c.detail}  "
                         f"({c.seconds:.2f} s)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- proof sizes and inputs ----------------------------------------------------------------


@dataclasses.dataclass
class ProofSetup:
    sizes: dict[str, int]
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    G: np.ndarray
    params: dict[str, np.ndarray]
    indices: dict[str, np.ndarray]
    G_lse: np.ndarray | None = None  # softmax: the adjoint of lse [B, heads, n_q]


def _symbols(prefix: str, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    for idx in np.ndindex(*shape):
        out[idx] = sp.Symbol(prefix + "_" + "_".join(map(str, idx)), real=True)
    return out


def _is_gqa(spec: ir.Spec) -> bool:
    """Whether the spec groups query heads: kv_heads < heads, or kv_heads with free heads."""
    return spec.kv_heads is not None and (spec.heads is None or spec.kv_heads < spec.heads)


def _proof_sizes(spec: ir.Spec) -> dict[str, int]:
    heads, kv_heads = (2, 1) if _is_gqa(spec) else (1, 1)
    square = spec.mask is not None or any("n" in x.dims for x in (*spec.params, *spec.indices))
    n_q, n_k = (3, 3) if square or spec.mask is not None else (2, 3)
    # d = 4 keeps sqrt(d) rational, so 1/sqrt(d) scales stay in the exact method.
    return {"B": 1, "heads": heads, "kv_heads": kv_heads, "n_q": n_q, "n_k": n_k, "n": n_q,
            "d": 4, "dv": 2}


def _shape(dims: tuple[ir.Dim, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else sizes.setdefault(d, 2) for d in dims)


def _mask_atoms(deriv: Derivation) -> list[sp.Basic]:
    if deriv.mask is None:
        return []
    return sorted(deriv.mask.atoms(sp.core.relational.Relational), key=sp.default_sort_key)


def _mask_params(deriv: Derivation) -> set[str]:
    """Params the mask or a subscript reads (`mask sb[h] <= 1`, `table[h, round(tau)]`): the
    proof holds them at rational values, since a comparison of a symbol has no truth value and
    a symbol is no subscript (their gradient is checked by finite differences only)."""
    read: set[sp.Basic] = set(deriv.mask.free_symbols) if deriv.mask is not None else set()
    for n in deriv.nodes:
        for sub in getattr(n, "subscripts", None) or ():
            read |= sp.sympify(sub).free_symbols
    return {n.array for n in deriv.nodes
            if isinstance(n, Lookup) and n.is_param and n.symbol in read}


def _rationals(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values in [-2, 2] by thirds: comparisons go both ways, and round() meets no tie."""
    out = np.empty(shape, dtype=object)
    for idx in np.ndindex(*shape):
        out[idx] = sp.Rational(int(rng.integers(-6, 7)), 3)
    return out


def _exercised(deriv: Derivation, sizes: dict[str, int], indices: dict[str, np.ndarray],
               fixed: dict[str, np.ndarray]) -> tuple[int, list[sp.Basic]]:
    """How many mask atoms take both values over the proof pairs, and those that do not."""
    atoms = _mask_atoms(deriv)
    seen: dict[sp.Basic, set[bool]] = {a: set() for a in atoms}
    naive = Naive(deriv, sizes, {}, indices, fixed)
    for b, h, i, j in np.ndindex(sizes["B"], sizes["heads"], sizes["n_q"], sizes["n_k"]):
        env = naive.scalar_env(b, h, i, j)
        for atom in atoms:
            seen[atom].add(bool(atom.xreplace(env)))
    dead = [a for a in atoms if len(seen[a]) < 2]
    return len(atoms) - len(dead), dead


def proof_setup(deriv: Derivation, seed: int = 0) -> tuple[ProofSetup, list[sp.Basic]]:
    spec = deriv.spec
    sizes = _proof_sizes(spec)
    rng = np.random.default_rng(seed)
    in_mask = _mask_params(deriv)
    Best = tuple[tuple[int, bool], dict[str, np.ndarray], dict[str, np.ndarray], list[sp.Basic]]
    best: Best | None = None
    for _ in range(20):  # index (and mask param) values that exercise the most mask clauses
        indices = {}
        for x in spec.indices:
            shape = (sizes["B"], *_shape(x.dims, sizes))
            indices[x.name] = rng.integers(0, max(sizes["n_q"], 2), size=shape)
        fixed = {p.name: _rationals(rng, _shape(p.dims, sizes)) for p in spec.params
                 if p.name in in_mask}
        exercised, dead = _exercised(deriv, sizes, indices, fixed)
        some_allowed = deriv.mask is None or True in _mask_values(deriv, sizes, indices, fixed)
        score = (exercised, some_allowed)  # a mask false everywhere leaves nothing to prove
        if best is None or score > best[0]:
            best = (score, indices, fixed, dead)
        if not dead and some_allowed:
            break
    assert best is not None
    params = {p.name: best[2].get(p.name, _symbols(p.name, _shape(p.dims, sizes)))
              for p in spec.params}
    B, H, KVH = sizes["B"], sizes["heads"], sizes["kv_heads"]
    setup = ProofSetup(
        sizes, _symbols("q", (B, H, sizes["n_q"], sizes["d"])),
        _symbols("k", (B, KVH, sizes["n_k"], sizes["d"])),
        _symbols("v", (B, KVH, sizes["n_k"], sizes["dv"])),
        _symbols("G", (B, H, sizes["n_q"], sizes["dv"])), params, best[1],
        _symbols("Glse", (B, H, sizes["n_q"])) if deriv.norm is ir.NormKind.SOFTMAX else None)
    return setup, best[3]


# ---- the naive forward of LANGUAGE.md section 1 ---------------------------------------------


class Naive:
    """Evaluates the derivation's nodes at one (b, h, i, j), feature by feature."""

    def __init__(self, deriv: Derivation, sizes: dict[str, int], arrays: dict[str, np.ndarray],
                 indices: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> None:
        self.deriv, self.sizes = deriv, sizes
        self.arrays, self.indices, self.params = arrays, indices, params
        self.memo: dict[tuple, Any] = {}
        self.in_mask = _mask_params(deriv)

    def scalar_env(self, b: int, h: int, i: int, j: int) -> dict[sp.Basic, Any]:
        env: dict[sp.Basic, Any] = {POSITIONS["b"]: b, POSITIONS["h"]: h, POSITIONS["i"]: i,
                                    POSITIONS["j"]: j}
        env.update({SIZES[n]: self.sizes[n] for n in SIZES})
        for node in self.deriv.nodes:
            if isinstance(node, Lookup) and (not node.is_param or node.array in self.in_mask):
                env[node.symbol] = self.lookup(node, env)
        return {k: sp.sympify(v) for k, v in env.items()}

    def lookup(self, node: Lookup, env: dict[sp.Basic, Any]) -> Any:
        subs = tuple(int(s.xreplace(env)) for s in node.subscripts)
        if node.is_param:
            return self.params[node.array][_in_range(node.array, subs, self.params)]
        batch = int(env[POSITIONS["b"]])
        return self.indices[node.array][(batch, *_in_range(node.array, subs, self.indices, 1))]

    def value(self, symbol: sp.Symbol, at: tuple[int, int, int, int], f: int | None) -> Any:
        key = (symbol, at, f)
        if key not in self.memo:
            self.memo[key] = self._value(symbol, at, f)
        return self.memo[key]

    def _value(self, symbol: sp.Symbol, at: tuple[int, int, int, int], f: int | None) -> Any:
        b, h, i, j = at
        node = self.deriv.node(symbol)
        env = self.scalar_env(b, h, i, j)
        if isinstance(node, Lookup):
            return self.lookup(node, env)
        if isinstance(node, Reduction):
            size = self._size(node.size)
            return sum((self.expr(node.body, at, ff) for ff in range(size)), sp.S.Zero)
        assert isinstance(node, Vec) and f is not None
        if node.kind == "input":
            g = h // (self.sizes["heads"] // self.sizes["kv_heads"])
            return self.arrays["q"][b, h, i, f] if node.name == "q" else self.arrays["k"][b, g, j, f]
        if node.kind == "param":
            subs = tuple(int(s.xreplace(env)) for s in node.subscripts)
            return self.params[node.param][(*subs, f)]  # type: ignore[index]
        if node.kind == "proj":
            matrix = self.params[node.param]  # type: ignore[index]
            return sum((self.value(node.expr, at, r) * matrix[r, f]  # type: ignore[arg-type]
                        for r in range(matrix.shape[0])), sp.S.Zero)
        return self.expr(node.expr, at, f)  # type: ignore[arg-type]

    def _size(self, name: str) -> int:
        return self.sizes[name] if name in self.sizes else int(name)

    def expr(self, e: sp.Expr, at: tuple[int, int, int, int], f: int | None) -> Any:
        env = self.scalar_env(*at)
        for symbol in e.free_symbols:
            node = self.deriv.node(symbol)
            if node is not None and symbol not in env:
                env[symbol] = self.value(symbol, at, f if isinstance(node, Vec) else None)
        return e.xreplace(env)


def _in_range(name: str, subs: tuple[int, ...], arrays: dict[str, np.ndarray], skip: int = 0
              ) -> tuple[int, ...]:
    """`subs` when they lie inside arrays[name] (past its first `skip` axes); NumPy would wrap
    a negative one round silently."""
    shape = np.shape(arrays[name])[skip:]
    for axis, (sub, size) in enumerate(zip(subs, shape)):
        if not 0 <= sub < size:
            raise ValueError(f"subscript {axis} of '{name}' is out of range at the proof "
                             f"sizes: got {sub}, the array has size {size} on that axis")
    return subs


def naive_loss_rows(deriv: Derivation, setup: ProofSetup) -> list[sp.Expr]:
    """The terms of L = sum(out * G) (+ sum(lse * G_lse) for softmax), one per query row
    (b, h, i)."""
    s = setup.sizes
    naive = Naive(deriv, s, {"q": setup.q, "k": setup.k}, setup.indices, setup.params)
    group = s["heads"] // s["kv_heads"]
    rows = []
    for b, h, i in np.ndindex(s["B"], s["heads"], s["n_q"]):
        logits, allowed = [], []
        for j in range(s["n_k"]):
            at = (b, h, i, j)
            logits.append(naive.expr(deriv.logit, at, None))
            mask = True if deriv.mask is None else bool(deriv.mask.xreplace(
                naive.scalar_env(*at)))
            allowed.append(mask)
        keys = [j for j in range(s["n_k"]) if allowed[j]]
        weights = _naive_weights(deriv, logits, keys, naive, (b, h, i))
        total = sp.S.Zero
        for c in range(s["dv"]):
            out = sum((weights[j] * setup.v[b, h // group, j, c] for j in keys), sp.S.Zero)
            total += out * setup.G[b, h, i, c]
        if setup.G_lse is not None:
            total += _naive_lse(deriv, logits, keys, naive, (b, h, i)) * setup.G_lse[b, h, i]
        rows.append(total)
    return rows


def _naive_lse(deriv: Derivation, logits: list[sp.Expr], keys: list[int], naive: Naive,
               row: tuple[int, int, int]) -> sp.Expr:
    """A softmax row's lse = log(sum exp(allowed logits) + exp(sink)); a row with neither has
    lse = -inf, a constant: its term is left out (0)."""
    terms = [sp.exp(logits[j]) for j in keys]
    if deriv.sink is not None:
        terms.append(sp.exp(naive.expr(deriv.sink, (*row, 0), None)))
    return sp.log(sp.Add(*terms)) if terms else sp.S.Zero


def _naive_weights(deriv: Derivation, logits: list[sp.Expr], keys: list[int], naive: Naive,
                   row: tuple[int, int, int]) -> dict[int, sp.Expr]:
    """The weights of one row's allowed keys, as its normalizer defines them (an element-wise
    f may read sizes and positions: evaluated at each pair)."""
    if not keys:
        return {}
    sink = None if deriv.sink is None else naive.expr(deriv.sink, (*row, 0), None)
    weights = normalizers.of(deriv).naive([logits[j] for j in keys], sink)
    return {j: naive.expr(w, (*row, j), None) for j, w in zip(keys, weights)}


# ---- the derived gradients: the generated reference over SymPy arrays -----------------------


def derived_gradients(deriv: Derivation, setup: ProofSetup) -> dict[str, np.ndarray]:
    source = numpy_ref.emit(deriv, exact=True)
    module = cache.load_module(source, "numpy_exact", deriv.spec.name)
    args = [setup.q, setup.k, setup.v, setup.G, *setup.params.values(),
            *setup.indices.values()]
    given = {} if setup.G_lse is None else {"dlse": setup.G_lse}
    return module.backward(symbolic_ops, *args, **given)


# ---- comparing two expressions ------------------------------------------------------------


class _Evaluator:
    """The value of a SymPy tree at one point, memoized over shared sub-trees; subclasses say
    what a number is (`_eval`) and share how conditions are decided."""

    point: dict[sp.Symbol, Any]
    memo: dict[sp.Basic, Any]

    def __call__(self, e: sp.Basic) -> Any:
        if e not in self.memo:
            self.memo[e] = self._eval(e)
        return self.memo[e]

    def _eval(self, e: sp.Basic) -> Any:
        raise NotImplementedError

    def _truth(self, cond: sp.Basic) -> bool:
        if isinstance(cond, sp.core.relational.Relational):
            a, b = self(cond.lhs), self(cond.rhs)
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b,
                    "!=": a != b}[cond.rel_op]
        if isinstance(cond, sp.And):
            return all(self._truth(c) for c in cond.args)
        if isinstance(cond, sp.Or):
            return any(self._truth(c) for c in cond.args)
        if isinstance(cond, sp.Not):
            return not self._truth(cond.args[0])
        raise _Inexact(type(cond).__name__)


class _Oracle(_Evaluator):
    """Exact rational evaluation; transcendental applications become random values."""

    TRANSCENDENTAL = (sp.exp, sp.log, sp.tanh, sp.sin, sp.cos, sp.erf, fn.Sigmoid, fn.Softplus,
                      fn.Elu, fn.EluGrad, fn.Gelu, fn.GeluGrad, fn.Norm, fn.NormGrad)

    def __init__(self, point: dict[sp.Symbol, Fraction], salt: int, exp_root: int = 1) -> None:
        self.point, self.salt = point, salt
        self.exp_root = exp_root  # E(u) = F(u)^exp_root, so E(u)^(a/b) is exact when b | root
        self.memo: dict[sp.Basic, Fraction] = {}

    def random(self, *key: object) -> Fraction:
        digest = hashlib.sha256(repr((self.salt, key)).encode()).digest()
        return Fraction(int.from_bytes(digest[:8], "big") % SCALE + 1)


    def _eval(self, e: sp.Basic) -> Fraction:
        if e.is_Symbol:
            return self.point[e]
        if e.is_Rational:
            return Fraction(int(e.p), int(e.q))
        if e.is_Add:
            return sum((self(a) for a in e.args), Fraction(0))
        if e.is_Mul:
            out = Fraction(1)
            for a in e.args:
                out *= self(a)
            return out
        if e.is_Pow:
            base, exponent = e.args
            if exponent.is_Integer:
                return self(base) ** int(exponent)
            raise _Inexact("root")
        if isinstance(e, sp.exp):
            return self._exp(e.args[0])
        if type(e) in self.TRANSCENDENTAL:
            return self.random(type(e).__name__, *(self(a) for a in e.args))
        if isinstance(e, sp.Piecewise):
            for value, cond in e.args:
                if cond == sp.true or self._truth(cond):
                    return self(value)
            raise _Inexact("piecewise with no branch")
        piecewise = {fn.Step: lambda x: Fraction(int(x > 0)), fn.Relu: lambda x: max(x, 0),
                     sp.Heaviside: lambda x, h0=Fraction(1, 2): h0 if x == 0 else Fraction(int(x > 0)),
                     sp.sign: lambda x: Fraction((x > 0) - (x < 0)), sp.Abs: abs, fn.Abs: abs,
                     sp.Max: max, sp.Min: min, fn.Max: max, fn.Min: min,
                     fn.Clamp: lambda x, lo, hi: min(max(x, lo), hi),
                     fn.InRange: lambda x, lo, hi: Fraction(int(lo <= x <= hi)),
                     fn.Floor: lambda x: Fraction(math.floor(x)),
                     fn.Ceil: lambda x: Fraction(math.ceil(x)),
                     fn.Round: lambda x: Fraction(round(x))}  # Fraction: a tie to even
        if type(e) in piecewise:
            return piecewise[type(e)](*(self(a) for a in e.args))
        raise _Inexact(type(e).__name__)

    def _exp(self, arg: sp.Expr) -> Fraction:
        """exp(c * u) = E(u)^c with c the rational content of the argument: SymPy merges
        exp(x)^2 into exp(2 x), and the random E must obey the same law."""
        content, primitive = _content(arg)
        power = content * self.exp_root
        if power.q != 1:
            raise _Inexact("exp root")
        return self.random("exp", self(primitive)) ** int(power)

class _Inexact(Exception):
    pass


def _content(arg: sp.Expr) -> tuple[sp.Rational, sp.Expr]:
    content, primitive = arg.as_content_primitive()
    if primitive.could_extract_minus_sign():
        content, primitive = -content, -primitive
    return sp.Rational(content), primitive


def _exp_root(*exprs: sp.Expr) -> int:
    """The least common denominator of the contents of every exp argument (one walk over the
    shared sub-trees: `atoms` would walk every repeated sub-tree again)."""
    root, seen, stack = 1, set(), [sp.sympify(e) for e in exprs]
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        if isinstance(e, sp.exp):
            root = sp.ilcm(root, _content(e.args[0])[0].q)
        stack.extend(e.args)
    return int(root)


def _points(symbols: list[sp.Symbol], count: int, seed: int) -> list[dict[sp.Symbol, Fraction]]:
    rng = random.Random(seed)
    return [{s: Fraction(rng.randrange(1, SCALE), rng.randrange(1, 2**20)) for s in symbols}
            for _ in range(count)]


class _MpEval(_Evaluator):
    """The true value of an expression at one point with mpmath, memoized over the shared
    sub-trees (printing whole gradient trees for `lambdify` cost seconds per entry)."""

    FUNCTIONS: ClassVar[dict[type, Any]] = {
        sp.exp: mpmath.exp, sp.log: mpmath.log, sp.tanh: mpmath.tanh, sp.sin: mpmath.sin,
        sp.cos: mpmath.cos, sp.erf: mpmath.erf, sp.Abs: abs, fn.Abs: abs,
        sp.sign: mpmath.sign,
        sp.floor: mpmath.floor, sp.Max: max, sp.Min: min, fn.Max: max, fn.Min: min,
        fn.Floor: mpmath.floor, fn.Ceil: mpmath.ceil, fn.Round: mpmath.nint,  # nint: tie to even
        sp.Heaviside: lambda x, h0=sp.S.Half: (mpmath.mpf(h0.p) / h0.q if x == 0
                                               else mpmath.mpf(int(x > 0))),
    }

    def __init__(self, point: dict[sp.Symbol, Any]) -> None:
        self.point = point
        self.memo: dict[sp.Basic, Any] = {}

    def _eval(self, e: sp.Basic) -> Any:
        if e.is_Symbol:
            return self.point[e]
        if e.is_Rational:
            return mpmath.mpf(int(e.p)) / int(e.q)
        if e.is_Number or e.is_NumberSymbol:
            return mpmath.mpf(sp.Float(e, mpmath.mp.dps + 5))
        if e.is_Add:
            return mpmath.fsum(self(a) for a in e.args)
        if e.is_Mul:
            out = mpmath.mpf(1)
            for a in e.args:
                out *= self(a)
            return out
        if e.is_Pow:
            base, exponent = e.args
            if exponent.is_Integer:
                return self(base) ** int(exponent)
            return mpmath.power(self(base), self(exponent))
        if type(e) in self.FUNCTIONS:
            return self.FUNCTIONS[type(e)](*(self(a) for a in e.args))
        if isinstance(e, sp.Piecewise):
            for value, cond in e.args:
                if cond == sp.true or self._truth(cond):
                    return self(value)
            raise _Inexact("piecewise with no branch")
        if type(e) in fn.OPAQUE:
            return self(fn.elementary(e))
        raise _Inexact(type(e).__name__)



def _mp_equal(a: sp.Expr, b: sp.Expr, symbols: list[sp.Symbol], seed: int) -> float:
    """The largest |a - b| at 3 random real points, with 60 significant digits. A point where
    either side leaves the reals (a root or log of a negative param) is drawn again: there the
    kernels compute NaN on both sides, and mpmath's complex values do not compare."""
    rng = random.Random(seed)
    worst, checked = 0.0, 0
    with mpmath.workdps(60):
        for _ in range(_MP_DRAWS):
            point = [mpmath.mpf(rng.uniform(-1.5, 1.5)) for _ in symbols]
            pair = _mp_values(a, b, symbols, point)
            if pair is None:
                continue
            da, db = pair
            worst = max(worst, float(abs(da - db) / max(1, abs(da))))
            checked += 1
            if checked == 3:
                return worst
    raise _OutsideDomain(f"{checked} of {_MP_DRAWS} random points kept both sides real")


_MP_DRAWS = 60  # random points tried for 3 real ones


class _OutsideDomain(Exception):
    pass


def _mp_values(a: sp.Expr, b: sp.Expr, symbols: list[sp.Symbol], point: list[Any]
               ) -> tuple[Any, Any] | None:
    """(a, b) at one point, or None where either is not real there."""
    try:
        evaluate = _MpEval(dict(zip(symbols, point)))
        values = (evaluate(a), evaluate(b))
    except _Inexact:  # a function the evaluator does not know: print and lambdify
        fa = sp.lambdify(symbols, fn.elementary(a), modules="mpmath")
        fb = sp.lambdify(symbols, fn.elementary(b), modules="mpmath")
        try:
            values = (fa(*point), fb(*point))
        except TypeError:  # a comparison of a complex value
            return None
    except TypeError:  # a comparison (min, a condition) of a complex value
        return None
    if any(isinstance(v, mpmath.mpc) for v in values):
        return None
    return values


def compare(naive: sp.Expr, derived: sp.Expr, seed: int = 0,
            symbols: list[sp.Symbol] | None = None, root: int | None = None
            ) -> tuple[bool, str, str]:
    """(equal?, method, detail) for one gradient entry. `symbols` (a superset of the free
    symbols) and `root` (see _exp_root) may be computed once for many entries: a root too small
    for an entry only sends it to the mpmath check."""
    naive, derived = sp.sympify(naive), sp.sympify(derived)
    if symbols is None:
        symbols = sorted(naive.free_symbols | derived.free_symbols, key=lambda s: s.name)
    try:
        root = _exp_root(naive, derived) if root is None else root
        for n, point in enumerate(_points(symbols, 3, seed)):
            if _Oracle(point, n, root)(naive) != _Oracle(point, n, root)(derived):
                raise _Inexact("differs")
        bound = _degree(naive) + _degree(derived)
        return True, "exact", f"3 points, P(wrong) <= ({bound}/2^61)^3"
    except (_Inexact, ZeroDivisionError):
        pass
    err = _mp_equal(naive, derived, symbols, seed)
    if naive.has(sp.Float) or derived.has(sp.Float):
        # float64 constants (2^(-8 (h + 1) / heads), computed from concrete positions) bound
        # the agreement near 1e-16; a wrong gradient differs far above that
        detail = (f"max rel. difference {err:.1e} (float64 constants: tolerance "
                  f"{FLOAT_CONSTANT_TOLERANCE:.0e})")
        return err < FLOAT_CONSTANT_TOLERANCE, "mpmath-60", detail
    return err < 1e-40, "mpmath-60", f"max rel. difference {err:.1e}"


def _degree(e: sp.Basic) -> int:
    """A bound on the total degree of numerator and denominator, every function application
    counted as a fresh variable (what the random evaluation sees)."""
    if e.is_Symbol:
        return 1
    if e.is_Number:
        return 0
    if e.is_Pow and e.args[1].is_Integer:
        return abs(int(e.args[1])) * _degree(e.args[0])
    if e.is_Add or e.is_Mul:
        return sum(_degree(a) for a in e.args)
    if isinstance(e, sp.Piecewise):
        return max(_degree(v) for v, _ in e.args)
    return 1


# ---- numeric checks ----------------------------------------------------------------------


def _numeric_inputs(spec: ir.Spec, dtype: Any, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    rng = np.random.default_rng(seed)
    heads, kv_heads = _numeric_heads(spec)
    sizes = {"B": 2, "heads": heads, "kv_heads": kv_heads, "n_q": 13, "n_k": 13, "d": 5,
             "dv": 3, "n": 13}
    arrays = {
        "q": rng.standard_normal((2, heads, 13, 5)).astype(dtype),
        "k": rng.standard_normal((2, kv_heads, 13, 5)).astype(dtype),
        "v": rng.standard_normal((2, kv_heads, 13, 3)).astype(dtype),
    }
    extra: dict[str, np.ndarray] = {}
    # scalar params (scales, temperatures) and what softcap reads are drawn in [0.5, ...):
    # a softcap <= 0 is refused at call time
    in_softcap = {n.name for n in ir.walk(spec.softcap)
                  if isinstance(n, (ir.Name, ir.Subscript))} if spec.softcap is not None else set()
    for p in spec.params:
        value = rng.standard_normal(_shape(p.dims, sizes)) * 0.5
        positive = not p.dims or p.name in in_softcap
        extra[p.name] = np.abs(value) + 0.5 if positive else value
    for x in spec.indices:
        shape = (2, *_shape(x.dims, sizes))
        extra[x.name] = np.sort(rng.integers(0, 4, size=shape), axis=-1)
    return arrays, extra


def _numeric_heads(spec: ir.Spec) -> tuple[int, int]:
    """(heads, kv_heads) as the call-time checks accept them, grouped where the spec allows."""
    if spec.kv_heads is not None:
        return spec.heads or 2 * spec.kv_heads, spec.kv_heads
    if spec.heads is not None:
        return spec.heads, spec.heads  # heads alone: k and v carry as many heads as q
    return 4, 2


def _lse_adjoint(spec: ir.Spec, lse: np.ndarray | None, rng: np.random.Generator
                 ) -> np.ndarray | None:
    """A random dlse for softmax specs, 0 on rows with lse = -inf (their lse is a constant)."""
    if lse is None or spec.normalize.kind is not ir.NormKind.SOFTMAX:
        return None
    return np.where(np.isfinite(lse), rng.standard_normal(lse.shape), 0).astype(lse.dtype)


def finite_differences(kernel: Any, spec: ir.Spec, seed: int = 0) -> tuple[float, str]:
    """float64 directional central differences of sum(out * G) (+ sum(lse * G_lse), softmax),
    like gradcheck's fast mode."""
    arrays, extra = _numeric_inputs(spec, np.float64, seed)
    rng = np.random.default_rng(seed + 1)
    out, lse = kernel.forward(arrays["q"], arrays["k"], arrays["v"], return_lse=True, **extra)
    G = rng.standard_normal(out.shape)
    G_lse = _lse_adjoint(spec, lse, rng)
    grads = kernel.backward(arrays["q"], arrays["k"], arrays["v"], G, dlse=G_lse, **extra)
    worst, where_ = 0.0, ""
    names = ["q", "k", "v", *(p.name for p in spec.params)]
    for name in names:
        base = arrays.get(name, extra.get(name))
        direction = rng.standard_normal(np.shape(base))
        eps = 1e-6

        def loss(value: np.ndarray, name: str = name) -> float:
            args = {**arrays, **extra, name: value}
            q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
            out, lse = kernel.forward(q, k, v, return_lse=True, **args)
            extra_term = 0.0 if G_lse is None else float(np.sum(np.where(G_lse != 0, lse, 0) *
                                                                G_lse))
            return float(np.sum(out * G)) + extra_term

        fd = (loss(base + eps * direction) - loss(base - eps * direction)) / (2 * eps)
        analytic = float(np.sum(grads[name] * direction))
        err = abs(fd - analytic) / max(1.0, abs(fd))
        if err > worst:
            worst, where_ = err, name
    return worst, where_


def compare_targets(reference: Any, kernel: Any, spec: ir.Spec, dtype: Any, seed: int = 0
                    ) -> float:
    """The largest difference of out, lse and every gradient between a target and the reference."""
    arrays, extra = _numeric_inputs(spec, dtype, seed)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    out_r, lse_r = reference.forward(q, k, v, return_lse=True, **extra)
    out_t, lse_t = kernel.forward(q, k, v, return_lse=True, **extra)
    rng = np.random.default_rng(seed + 2)
    G = rng.standard_normal(out_r.shape).astype(dtype)
    G_lse = _lse_adjoint(spec, lse_r, rng)
    g_r = reference.backward(q, k, v, G, dlse=G_lse, **extra)
    g_t = kernel.backward(q, k, v, G, out=out_t, lse=lse_t, dlse=G_lse, **extra)
    pairs = [(out_r, out_t)] + ([(lse_r, lse_t)] if lse_r is not None else [])
    pairs += [(g_r[n], g_t[n]) for n in g_r]
    worst = 0.0
    for a, b in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        finite = np.isfinite(a)
        if not np.array_equal(finite, np.isfinite(b)) or not np.array_equal(a[~finite],
                                                                             b[~finite]):
            return float("inf")
        if finite.any():
            scale = max(1.0, float(np.max(np.abs(a[finite]))))
            worst = max(worst, float(np.max(np.abs(a[finite] - b[finite]))) / scale)
    return worst


# ---- the whole verification ---------------------------------------------------------------

TOLERANCE = {"float64": 1e-10, "float32": 2e-4}


def _mask_constants(mask: sp.Basic) -> list[int]:
    """Integer literals of the mask's comparisons (window widths, image widths), also where
    SymPy holds them as a factor 1/c (floor(i/16))."""
    found: set[int] = set()
    for atom in mask.atoms(sp.core.relational.Relational):
        found |= {abs(int(n)) for n in atom.atoms(sp.Integer) if abs(int(n)) > 1}
        found |= {int(r.q) for r in atom.atoms(sp.Rational) if abs(r.p) == 1 and r.q > 1}
    return sorted(found)


def _replace_constants(mask: sp.Basic, mapping: dict[int, int]) -> sp.Basic:
    table: dict[sp.Basic, sp.Basic] = {}
    for old, new in mapping.items():
        table[sp.Integer(old)] = sp.Integer(new)
        table[sp.Integer(-old)] = sp.Integer(-new)
        if new:
            table[sp.Rational(1, old)] = sp.Rational(1, new)
    return mask.xreplace(table)


def shrink_mask(deriv: Derivation) -> tuple[Derivation, dict[int, int]]:
    """The derivation with mask constants replaced by small ones where that exercises more
    mask clauses at the proof sizes (a window of 128 does nothing at n = 3; a window of 2 does).
    The gradient formulas do not depend on those constants, only on which pairs are allowed."""
    if deriv.mask is None:
        return deriv, {}
    sizes = _proof_sizes(deriv.spec)
    setup, _ = proof_setup(deriv)

    def score(candidate: Derivation) -> tuple[int, int]:
        fixed = {name: setup.params[name] for name in _mask_params(candidate)}
        exercised, _ = _exercised(candidate, sizes, setup.indices, fixed)
        whole = _mask_values(candidate, sizes, setup.indices, fixed)
        return (int(whole == {True, False}), exercised)

    best_score, best, best_map = score(deriv), deriv, {}
    constants = _mask_constants(deriv.mask)[:3]
    for values in itertools.product(range(3, -1, -1), repeat=len(constants)):
        mapping = dict(zip(constants, values))
        if any(v == 0 and sp.Rational(1, c) in deriv.mask.atoms(sp.Rational)
               for c, v in mapping.items()):
            continue
        try:  # i % 4 with 4 -> 0 is a modulus of 0: SymPy raises as it builds the mask
            mask = _replace_constants(deriv.mask, mapping)
            if mask in (sp.true, sp.false) or mask.has(sp.zoo, sp.nan):
                continue
            candidate = dataclasses.replace(deriv, mask=mask)
            value = score(candidate)
        except (TypeError, ZeroDivisionError):
            continue
        if value > best_score:
            best_score, best, best_map = value, candidate, mapping
    return best, best_map


def _mask_values(deriv: Derivation, sizes: dict[str, int], indices: dict[str, np.ndarray],
                 fixed: dict[str, np.ndarray]) -> set[bool]:
    """The values the whole mask takes over the proof pairs."""
    naive = Naive(deriv, sizes, {}, indices, fixed)
    assert deriv.mask is not None
    return {bool(deriv.mask.xreplace(naive.scalar_env(b, h, i, j)))
            for b, h, i, j in np.ndindex(sizes["B"], sizes["heads"], sizes["n_q"],
                                         sizes["n_k"])}


def prove(deriv: Derivation, report: Report) -> None:
    start = time.perf_counter()
    deriv, replaced = shrink_mask(deriv)
    setup, dead = proof_setup(deriv)
    s = setup.sizes
    report.notes.append(
        f"proof sizes: B=1, heads={s['heads']}, kv_heads={s['kv_heads']}, "
        f"n_q={s['n_q']}, n_k={s['n_k']}, d={s['d']}, dv={s['dv']}")
    if replaced:
        shown = ", ".join(f"{old} -> {new}" for old, new in replaced.items())
        report.notes.append(f"mask constants for the proof: {shown}, so its clauses admit and "
                            f"exclude pairs at these sizes (allowed = {sp.sstr(deriv.mask)})")
    for atom in dead:
        report.notes.append(f"mask clause '{sp.sstr(atom)}' is constant at the proof sizes "
                            "(not exercised by the proof)")
    for name in sorted(_mask_params(deriv)):
        shown = ", ".join(map(str, setup.params[name].flat))
        report.notes.append(f"param '{name}' is read by the mask or a subscript: the proof "
                            f"holds it at [{shown}] (its gradient is checked by finite "
                            "differences only)")
    rows = naive_loss_rows(deriv, setup)
    row_symbols = [row.free_symbols for row in rows]
    derived = derived_gradients(deriv, setup)
    fixed = _mask_params(deriv)
    inputs = {"q": setup.q, "k": setup.k, "v": setup.v,
              **{name: a for name, a in setup.params.items() if name not in fixed}}
    adjoints = (setup.G,) if setup.G_lse is None else (setup.G, setup.G_lse)
    symbols = sorted({x for a in (*inputs.values(), *adjoints) for x in a.flat},
                     key=lambda x: x.name)
    root = _exp_root(*rows, *(e for g in derived.values() for e in np.asarray(g).flat))
    for name, array in inputs.items():
        t0 = time.perf_counter()
        ok, methods, details = True, set(), []
        for idx in np.ndindex(*array.shape):
            x = array[idx]
            # d/dx sum(rows) = sum of d row/dx over the rows that hold x
            naive = sp.Add(*(sp.diff(row, x) for row, free in zip(rows, row_symbols)
                             if x in free))
            same, method, detail = compare(naive, derived[name][idx], seed=len(details),
                                           symbols=symbols, root=root)
            ok &= same
            methods.add(method)
            if not same or not details:
                details.append(detail if same else f"entry {idx}: {detail}")
        method = "+".join(sorted(methods))
        report.checks.append(Check(f"proof d{name}", ok, method, details[-1],
                                   time.perf_counter() - t0))
    report.notes.append(f"proof total {time.perf_counter() - start:.1f} s")


def target_names(targets: str | Iterable[str]) -> tuple[str, ...]:
    """"numpy,cpu", ["numpy", "cpu"] or ("cpu",) -> ("numpy", "cpu"); unknown names raise."""
    if isinstance(targets, str):
        targets = targets.split(",")
    try:
        names = tuple(t.strip() for t in targets if t.strip())
    except (TypeError, AttributeError):
        raise TypeError(f"targets: expected a comma-separated string or a list of target "
                        f"names, got {targets!r}") from None
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(TARGETS)}")
    return names


def _attempt(report: Report, what: str, run: Callable[[], Any],
             progress: Callable[[str], None] = quiet) -> Any:
    """run(), or None with a report line saying what could not be checked and why (a table
    smaller than the check's sizes, an index array reading past a table, a modulus of 0)."""
    progress(what)
    t0 = time.perf_counter()
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a report line
        text = " ".join(str(exc).split())  # one line, even for multi-line messages
        why = f"{type(exc).__name__}: {text[:300]}"
        report.checks.append(Check(what, False, "not run", f"could not be checked: {why}",
                                   time.perf_counter() - t0, ran=False))
        return None


def verify(spec: ir.Spec, targets: str | Iterable[str] = ("numpy",), proof: bool = True,
           progress: Callable[[str], None] = quiet) -> Report:
    """Prove the gradients and check each target against the numpy reference; `progress` is
    called with the name of each check before it runs (the cli's progress line)."""
    from .runtime.build import compile_spec

    names = target_names(targets)
    deriv = derive(spec)
    report = Report(spec.name)
    if proof:
        _attempt(report, "proof", lambda: prove(deriv, report), progress)
    reference = _attempt(report, "numpy reference", lambda: compile_spec(spec, "numpy"),
                         progress)
    if reference is None:
        return report
    t0 = time.perf_counter()
    found = _attempt(report, "numpy vs finite differences",
                     lambda: finite_differences(reference, spec), progress)
    if found is not None:
        err, where_ = found
        report.checks.append(Check("numpy vs finite differences", err < 1e-6, "float64",
                                   f"max rel. error {err:.1e} (d{where_})",
                                   time.perf_counter() - t0))
    for target in names:
        if target != "numpy":
            _check_target(report, reference, spec, target, progress)
    return report


def _check_target(report: Report, reference: Any, spec: ir.Spec, target: str,
                  progress: Callable[[str], None]) -> None:
    from .runtime.build import compile_spec

    kernel = _attempt(report, f"{target} vs numpy", lambda: compile_spec(spec, target),
                      progress)
    if kernel is None:
        return
    for dtype in (np.float64, np.float32):
        name = np.dtype(dtype).name
        what = f"{target} vs numpy ({name})"
        t0 = time.perf_counter()
        err = _attempt(report, what, lambda dtype=dtype: compare_targets(reference, kernel,
                                                                         spec, dtype),
                       progress)
        if err is not None:
            report.checks.append(Check(what, err <= TOLERANCE[name], name,
                                       f"max rel. error {err:.1e}", time.perf_counter() - t0))
