"""KernelPrinter: SymPy expression -> Python source. Backends differ only by the tables."""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp
from sympy.printing.precedence import precedence
from sympy.printing.pycode import PythonCodePrinter

from .. import functions as fn

# Spec-level function -> the name of the backend's implementation (after the module prefix).
ARRAY_FUNCTIONS: dict[type, str] = {
    sp.exp: "exp", sp.log: "log", sp.tanh: "tanh", sp.sin: "sin", sp.cos: "cos",
    sp.sign: "sign", sp.Abs: "abs", fn.Abs: "abs", sp.Heaviside: "heaviside", sp.floor: "floor",
    fn.Sigmoid: "sigmoid", fn.Softplus: "softplus", fn.Relu: "relu", fn.Step: "step",
    fn.Elu: "elu", fn.EluGrad: "elu_grad", fn.Gelu: "gelu", fn.GeluGrad: "gelu_grad",
    fn.Clamp: "clamp", fn.InRange: "in_range", fn.Norm: "norm", fn.NormGrad: "norm_grad",
    fn.Floor: "floor", fn.Ceil: "ceil", fn.Round: "round", fn.SafeDiv: "safe_div",
}
RELATIONS = {"<": "less", "<=": "less_equal", ">": "greater", ">=": "greater_equal",
             "==": "equal", "!=": "not_equal"}


def integer_valued(e: sp.Basic) -> bool:
    """Integer-valued in the spec's sense. SymPy cannot tell for i % (n_k - 4) or z // w (is
    the divisor 0?), but the checker lets `//` and `%` take integers only. SymPy calls sign(x)
    an integer for any real x, but the sign of a float NaN is NaN: only an integer's is."""
    if isinstance(e, (sp.floor, sp.ceiling, fn.Round)):
        return True
    if isinstance(e, sp.sign):
        return integer_valued(e.args[0])
    if e.is_integer and not e.has(sp.sign):
        return True
    if isinstance(e, (sp.Mod, sp.Add, sp.Mul, sp.Max, sp.Min, sp.Abs)):
        return all(integer_valued(a) for a in e.args)
    if isinstance(e, sp.Piecewise):
        return all(integer_valued(value) for value, _ in e.args)
    return False


def integer_division(e: sp.floor) -> tuple[sp.Basic, sp.Basic] | sp.Piecewise | None:
    """floor(a / b) of integers as (a, b) for `a // b`; a divisor `where(...)` (SymPy moves
    1/where into the branches) as a where of such floors; None for a float argument."""
    num, den = e.args[0].as_numer_denom()
    if den != 1 and integer_valued(num) and integer_valued(den):
        return num, den
    folded = sp.piecewise_fold(e.args[0])
    if isinstance(folded, sp.Piecewise):
        return sp.Piecewise(*((sp.floor(v), c) for v, c in folded.args))
    return None


class KernelPrinter(PythonCodePrinter):
    """Prints with `module.name(...)` calls, symbols renamed through `names`.

    exact=True prints non-integer rationals as module.rational(p, q), so the same source runs
    over SymPy object arrays without turning 1/100 into a binary float.
    """

    def __init__(self, module: str, names: Mapping[sp.Symbol, str], exact: bool = False,
                 integer_division: bool = True) -> None:
        super().__init__({"fully_qualified_modules": False})
        self.module = module
        self.names = dict(names)
        self.exact = exact
        self.integer_division = integer_division

    def call(self, name: str, *args: sp.Basic) -> str:
        return f"{self.module}.{name}({', '.join(self._print(a) for a in args)})"

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        return self.names.get(expr, expr.name)

    def _print_Function(self, expr: sp.Function) -> str:
        name = ARRAY_FUNCTIONS.get(type(expr))
        if name is None:
            raise NotImplementedError(f"no printer rule for {type(expr).__name__}")
        return self.call(name, *expr.args)

    _print_exp = _print_log = _print_tanh = _print_sin = _print_cos = _print_Function
    _print_sign = _print_Abs = _print_Function
    # floor/ceil/round of a float: a float array of integer values (NaN stays NaN); lookups
    # and scatters turn such subscripts into integers
    _print_Floor = _print_Ceil = _print_Round = _print_Function

    def _print_Heaviside(self, expr: sp.Heaviside) -> str:
        return self.call("heaviside", expr.args[0])  # H(0) = 1/2: max/min split a tie

    def _print_floor(self, expr: sp.floor) -> str:
        split = integer_division(expr) if self.integer_division else None
        if isinstance(split, tuple):
            return f"({self._operand(split[0])} // {self._operand(split[1])})"
        if split is not None:
            return self._print(split)
        return self.call("floor", expr.args[0])

    def _print_Mod(self, expr: sp.Mod) -> str:
        return f"({self._operand(expr.args[0])} % {self._operand(expr.args[1])})"

    def _operand(self, e: sp.Basic) -> str:
        """An operand of `//` or `%`, parenthesized unless it is a name or a natural number:
        `(i + 1) // 3` must not print as `i + 1 // 3` (issue 8, item 4)."""
        text = self._print(e)
        if e.is_Symbol or (e.is_Integer and e >= 0):
            return text
        return f"({text})"

    def _print_Max(self, expr: sp.Max) -> str:
        return self._fold("maximum", expr.args)

    def _print_Min(self, expr: sp.Min) -> str:
        return self._fold("minimum", expr.args)

    def _fold(self, name: str, args: tuple[sp.Basic, ...]) -> str:
        text = self._print(args[0])
        for arg in args[1:]:
            text = f"{self.module}.{name}({text}, {self._print(arg)})"
        return text

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exponent = expr.args
        if exponent == sp.S.Half:
            return self.call("sqrt", base)
        if exponent == -sp.S.Half:
            return f"(1 / {self.call('sqrt', base)})"
        if exponent == -1:
            return f"(1 / {self.parenthesize(base, precedence(expr))})"
        if integer_valued(base) and integer_valued(exponent) and not (
                exponent.is_Integer and exponent >= 0):
            return f"{self._float_base(base)}**{self._print_exponent(exponent)}"
        return f"{self.parenthesize(base, precedence(expr))}**{self._print_exponent(exponent)}"

    def _float_base(self, base: sp.Basic) -> str:
        """An integer base of a power the language makes a float: NumPy refuses an integer
        array to a negative integer power (2 ^ (j - i))."""
        return self.call("to_float", base)

    def _print_exponent(self, exponent: sp.Basic) -> str:
        if exponent.is_Integer and exponent >= 0:
            return str(exponent)
        return f"({self._print(exponent)})"

    def _print_Rational(self, expr: sp.Rational) -> str:
        if self.exact:
            return f"{self.module}.rational({expr.p}, {expr.q})"
        return f"({expr.p} / {expr.q})"

    _print_Half = _print_Rational

    def _print_Float(self, expr: sp.Float) -> str:
        return repr(float(expr))

    def _print_Pi(self, expr: sp.Basic) -> str:
        return f"{self.module}.pi"

    def _print_Exp1(self, expr: sp.Basic) -> str:
        return self.call("exp", sp.S.One)

    def _print_Infinity(self, expr: sp.Basic) -> str:
        return f"{self.module}.inf"

    def _print_NegativeInfinity(self, expr: sp.Basic) -> str:
        return f"(-{self.module}.inf)"

    def _print_NaN(self, expr: sp.Basic) -> str:
        """d log(where(c, u, 0)) is 1/0 = nan on the branch not taken: printed, never read."""
        return f"{self.module}.nan"

    def _print_ComplexInfinity(self, expr: sp.Basic) -> str:
        return f"{self.module}.nan"  # zoo: 1/0 of SymPy, as above

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        (value, cond), *rest = expr.args
        if not rest or cond == sp.true:
            return self._print(value)
        return f"{self.module}.where({self._print(cond)}, {self._print(value)}, " \
               f"{self._print(sp.Piecewise(*rest))})"

    def _print_Relational(self, expr: sp.core.relational.Relational) -> str:
        return self.call(RELATIONS[expr.rel_op], expr.lhs, expr.rhs)

    def _print_And(self, expr: sp.And) -> str:
        return self._fold("logical_and", expr.args)

    def _print_Or(self, expr: sp.Or) -> str:
        return self._fold("logical_or", expr.args)

    def _print_Not(self, expr: sp.Not) -> str:
        return self.call("logical_not", expr.args[0])

    def _print_BooleanTrue(self, expr: sp.Basic) -> str:
        return "True"

    def _print_BooleanFalse(self, expr: sp.Basic) -> str:
        return "False"
