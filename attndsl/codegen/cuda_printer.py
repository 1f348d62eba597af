"""CudaPrinter: SymPy -> Numba CUDA scalar code that stays in the kernel's float type.

Three contexts, because Numba promotes int64 with float32 to float64:
  * float (`num`): every integer-valued subexpression is converted with `F(...)`, every number
    is a module-level constant (`C3 = F(0.01)`), `1 / x` is `ONE / x`;
  * integer (`int_`): subscripts and `//`, `%`, integer min/max/abs, printed as Python ints;
  * boolean (`bool_`): masks and `where` conditions; a comparison of two integers stays integer.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp

from .. import functions as fn
from .printer import integer_division, integer_valued

MATH = {sp.exp: "math.exp", sp.log: "math.log", sp.tanh: "math.tanh", sp.sin: "math.sin",
        sp.cos: "math.cos"}
# Special functions, inlined: a cuda.jit device function needs a GPU to compile (numba-cuda asks
# the current device for its compute capability), which PTX checks on a CPU machine cannot give.
INLINE = {
    # a NaN argument gives NaN, as in NumPy (the last branch is reached only by 0 or NaN)
    sp.sign: "(ONE if {0} > ZERO else (-ONE if {0} < ZERO else (ZERO if {0} == ZERO else {0})))",
    sp.Heaviside: "(ONE if {0} > ZERO else (ZERO if {0} < ZERO else (HALF if {0} == ZERO else "
                  "{0})))",  # H(0) = 1/2
    fn.Sigmoid: "(ONE / (ONE + math.exp(-{0})))",
    fn.Softplus: "(max({0}, ZERO) + math.log1p(math.exp(-abs({0}))))",  # stable, no threshold
    fn.Relu: "(ZERO if {0} <= ZERO else {0})",  # NaN stays NaN (max may drop it on a GPU)
    fn.Step: "(ONE if {0} > ZERO else ZERO)",
    fn.Elu: "({0} if {0} > ZERO else math.expm1({0}))",
    fn.EluGrad: "(ONE if {0} > ZERO else math.exp({0}))",
    fn.Gelu: "(HALF * {0} * (ONE + math.erf({0} * RSQRT2)))",
    fn.GeluGrad: "(HALF * (ONE + math.erf({0} * RSQRT2)) + {0} * math.exp(-HALF * {0} * {0})"
                 " * RSQRT2PI)",
    fn.InRange: "(ONE if ({0} >= {1} and {0} <= {2}) else ZERO)",
    fn.Norm: "math.sqrt({0})",
    fn.NormGrad: "(HALF / math.sqrt({0}) if {0} > ZERO else ZERO)",  # norm'(0) = 0
}
# floor/ceil/round of a float. On the device math.floor of a float32 is a float32 (the
# simulator's is a Python int), so integers go through int(...); the builtin round() would
# convert float32 to float64, so round is floor(x + 1/2), one less at an odd tie.
ROUNDING = {fn.Floor: "math.floor", fn.Ceil: "math.ceil", fn.Round: "round"}
COMPARE = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
# constants every generated module defines in its header (numba_cuda.Emitter.module)
MODULE_CONSTANTS = {"0.0": "ZERO", "1.0": "ONE", "0.5": "HALF", "-inf": "NEG_INF"}


class CudaPrinter:
    def __init__(self, names: Mapping[sp.Symbol, str], consts: dict[str, str]) -> None:
        self.names = dict(names)
        self.consts = consts  # constant name -> Python float literal, shared per module

    def with_names(self, extra: Mapping[sp.Symbol, str]) -> CudaPrinter:
        return CudaPrinter({**self.names, **extra}, self.consts)

    def const(self, value: sp.Expr) -> str:
        literal = repr(float(value))
        if literal in MODULE_CONSTANTS:
            return MODULE_CONSTANTS[literal]
        if literal in ("inf", "-inf", "nan"):  # what `F(...)` in the module header can read
            literal = literal.replace("inf", "np.inf").replace("nan", "np.nan")
        for name, text in self.consts.items():
            if text == literal:
                return name
        name = f"C{len(self.consts)}"
        self.consts[name] = literal
        return name

    def symbol(self, e: sp.Symbol) -> str:
        if e not in self.names:
            raise NotImplementedError(f"no CUDA name for symbol '{e}'")
        return self.names[e]

    # ---- float context ----
    def num(self, e: sp.Basic) -> str:
        if e in (sp.nan, sp.zoo):  # 1/0 of SymPy on a branch not taken: printed, never read
            return self.const(sp.nan)
        if e.is_Number or e in (sp.pi, sp.E):
            return self.const(e)
        if type(e) in ROUNDING:
            return self._rounded(e)
        if integer_valued(e) and not isinstance(e, sp.Symbol) and not (
                isinstance(e, (sp.Add, sp.Mul)) and e.has(*ROUNDING)):
            return f"F({self.int_(e)})"
        if isinstance(e, sp.Symbol):
            text = self.symbol(e)
            return f"F({text})" if e.is_integer else text
        if isinstance(e, sp.Add):
            return self._add(e, self.num)
        if isinstance(e, sp.Mul):
            return self._mul(e)
        if isinstance(e, sp.Pow):
            return self._pow(e)
        if isinstance(e, (sp.Max, sp.Min)):
            return self._nan_fold("max" if isinstance(e, sp.Max) else "min", e.args)
        if isinstance(e, fn.Clamp):  # min(max(x, lo), hi), a NaN bound kept as NumPy's clip
            x, lo, hi = e.args
            return self._bound("min", self._bound("max", self.num(x), lo), hi)
        if isinstance(e, sp.Abs):
            return f"abs({self.num(e.args[0])})"
        if isinstance(e, sp.floor):
            return f"F(math.floor({self.num(e.args[0])}))"
        if isinstance(e, sp.Piecewise):
            return self._piecewise(e, self.num)
        if isinstance(e, fn.SafeDiv):  # a ternary: only one branch runs
            return self.num(e.rewrite(sp.Piecewise))
        if type(e) in MATH:
            return f"{MATH[type(e)]}({self.num(e.args[0])})"
        if type(e) in INLINE:
            return self._inline(e)
        raise NotImplementedError(f"no CUDA printer rule for {type(e).__name__}: {e}")

    def _inline(self, e: sp.Basic) -> str:
        args = [self.num(a) for a in e.args]
        return INLINE[type(e)].format(*[a if _simple(a) else f"({a})" for a in args])

    def _rounded(self, e: sp.Basic) -> str:
        """floor/ceil/round in float math: a NaN, an inf or a float beyond 2^52 (already an
        integer) is returned as it is, where the int64 conversion would garble it."""
        x = self.num(e.args[0])
        x = x if _simple(x) else f"({x})"
        return f"(F({self._integer_rounding(e, x)}) if abs({x}) < {self.const(2**52)} else {x})"

    def _integer_rounding(self, e: sp.Basic, x: str) -> str:
        if not isinstance(e, fn.Round):
            return f"int({ROUNDING[type(e)]}({x}))"
        up = f"({x} + HALF)"
        floor = f"math.floor({up})"
        return f"(int({floor}) - (1 if ({floor} == {up} and int({floor}) % 2 != 0) else 0))"

    def _add(self, e: sp.Add, each) -> str:  # type: ignore[no-untyped-def]
        terms = list(e.as_ordered_terms())
        text = each(terms[0])
        for term in terms[1:]:
            if term.could_extract_minus_sign():
                text += f" - {each(-term)}"
            else:
                text += f" + {each(term)}"
        return f"({text})"

    def _mul(self, e: sp.Mul) -> str:
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return f"(-{self.num(rest)})"
        if coeff != 1:
            return f"({self.const(coeff)} * {self.num(rest)})"
        num: list[str] = []
        den: list[str] = []
        for factor in e.args:
            base, exponent = factor.as_base_exp()
            if isinstance(factor, sp.Pow) and exponent.is_number and exponent < 0:
                den.append(self.num(sp.Pow(base, -exponent)))
            else:
                num.append(self.num(factor))
        top = " * ".join(num) if num else "ONE"
        if not den:
            return f"({top})"
        bottom = den[0] if len(den) == 1 else f"({' * '.join(den)})"
        return f"({top} / {bottom})"

    def _pow(self, e: sp.Pow) -> str:
        base, exponent = e.args
        if exponent == sp.S.Half:
            return f"math.sqrt({self.num(base)})"
        if exponent.is_number and exponent < 0:
            return f"(ONE / {self.num(sp.Pow(base, -exponent))})"
        if exponent.is_Integer and 1 <= exponent <= 4:
            b = self.num(base)
            return "(" + " * ".join([b] * int(exponent)) + ")"
        if exponent.is_Rational and exponent.q == 2 and exponent.p <= 9:
            return f"({self.num(sp.Pow(base, exponent - sp.S.Half))} * math.sqrt({self.num(base)}))"
        return f"math.pow({self.num(base)}, {self.num(exponent)})"

    def _fold(self, name: str, args: tuple[sp.Basic, ...], each) -> str:  # type: ignore[no-untyped-def]
        text = each(args[0])
        for arg in args[1:]:
            text = f"{name}({text}, {each(arg)})"
        return text

    def _nan_fold(self, name: str, args: tuple[sp.Basic, ...]) -> str:
        """Float max/min that keep a NaN from any argument, as NumPy's maximum/minimum: the
        builtins keep only a NaN in first place (max(a, NaN) is a), so each later argument b
        is tested itself. The longest text goes first, printed once."""
        texts = sorted((self.num(a) for a in args), key=len, reverse=True)
        text = texts[0]
        for b in texts[1:]:
            text = self._nan_keep(name, text, b)
        return text

    def _bound(self, name: str, a: str, bound: sp.Basic) -> str:
        """max/min(a, bound): a bound that may be NaN (not a number literal) is tested."""
        if bound.is_number and bound.is_finite:
            return f"{name}({a}, {self.num(bound)})"
        return self._nan_keep(name, a, self.num(bound))

    @staticmethod
    def _nan_keep(name: str, a: str, b: str) -> str:
        """max/min(a, b) keeping a NaN b (a NaN a the builtin keeps: it comes first)."""
        return f"({b} if {b} != {b} else {name}({a}, {b}))"

    def _piecewise(self, e: sp.Piecewise, each) -> str:  # type: ignore[no-untyped-def]
        if not isinstance(e, sp.Piecewise):  # Piecewise((x, True)) of the last branch is x
            return each(e)
        (value, cond), *rest = e.args
        if not rest or cond == sp.true:
            return each(value)
        other = sp.Piecewise(*rest)  # one (value, True) pair left evaluates to the value
        return f"({each(value)} if {self.bool_(cond)} else {each(other)})"

    # ---- integer context ----
    def int_(self, e: sp.Basic) -> str:
        if e.is_Integer:
            return str(int(e))
        if e.is_zero:  # SymPy proved it (Min(0, Max(0, i)) / 50): no integer rule for 1/50
            return "0"
        if isinstance(e, sp.Symbol):
            return self.symbol(e)
        if isinstance(e, sp.Add):
            return self._add(e, self.int_)
        if isinstance(e, sp.Mul):
            coeff, rest = e.as_coeff_Mul()
            if coeff == -1:
                return f"(-{self.int_(rest)})"
            return "(" + " * ".join(self.int_(a) for a in e.args) + ")"
        if isinstance(e, sp.Pow) and e.args[1].is_Integer and e.args[1] > 0:
            return "(" + " * ".join([self.int_(e.args[0])] * int(e.args[1])) + ")"
        if isinstance(e, sp.Pow) and e.args[1].is_integer and e.args[1].is_nonnegative:
            return f"({self.int_(e.args[0])} ** {self.int_(e.args[1])})"  # SymPy: an integer
        if type(e) in ROUNDING:
            x = self.num(e.args[0])
            return self._integer_rounding(e, x if _simple(x) else f"({x})")
        if isinstance(e, sp.floor):
            split = integer_division(e)
            if isinstance(split, tuple):
                return f"({self.int_(split[0])} // {self.int_(split[1])})"
            if split is not None:
                return self.int_(split)
        if isinstance(e, sp.Mod):
            return f"({self.int_(e.args[0])} % {self.int_(e.args[1])})"
        if isinstance(e, (sp.Max, sp.Min)):
            return self._fold("max" if isinstance(e, sp.Max) else "min", e.args, self.int_)
        if isinstance(e, sp.Abs):
            return f"abs({self.int_(e.args[0])})"
        if isinstance(e, sp.Piecewise):
            return self._piecewise(e, self.int_)
        if isinstance(e, sp.sign):  # SymPy: the sign of a real is an integer (abs's derivative)
            return self._integer_sign(e.args[0])
        raise NotImplementedError(f"no CUDA integer rule for {type(e).__name__}: {e}")

    def _integer_sign(self, arg: sp.Basic) -> str:
        """-1, 0 or 1 as a Python int; the argument is compared in its own type."""
        exact = integer_valued(arg)
        x = self.int_(arg) if exact else self.num(arg)
        x = x if _simple(x) else f"({x})"
        zero = "0" if exact else "ZERO"
        return f"(1 if {x} > {zero} else (-1 if {x} < {zero} else 0))"

    # ---- boolean context ----
    def bool_(self, e: sp.Basic) -> str:
        if e == sp.true:
            return "True"
        if e == sp.false:
            return "False"
        if isinstance(e, sp.And):
            return "(" + " and ".join(self.bool_(a) for a in e.args) + ")"
        if isinstance(e, sp.Or):
            return "(" + " or ".join(self.bool_(a) for a in e.args) + ")"
        if isinstance(e, sp.Not):
            return f"(not {self.bool_(e.args[0])})"
        if isinstance(e, sp.ITE):  # SymPy's form of `where(c, a, b) > 0`: a ternary of booleans
            cond, then, other = (self.bool_(a) for a in e.args)
            return f"({then} if {cond} else {other})"
        if isinstance(e, sp.core.relational.Relational):
            each = self.int_ if (integer_valued(e.lhs) and integer_valued(e.rhs)) else self.num
            return f"({each(e.lhs)} {COMPARE[e.rel_op]} {each(e.rhs)})"
        raise NotImplementedError(f"no CUDA boolean rule for {type(e).__name__}: {e}")


def _simple(text: str) -> bool:
    return text.isidentifier() or (text.startswith("(") and text.endswith(")"))
