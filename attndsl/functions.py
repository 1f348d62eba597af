"""The spec language's functions as SymPy functions, each with its derivative beside it.

Kinks follow PyTorch (LANGUAGE.md 3): relu'(0) = 0, clamp passes the gradient on [lo, hi],
max/min split a tie 1/2-1/2 (SymPy's Heaviside(0) = 1/2), abs'(0) = sign(0) = 0.
Functions stay opaque (unevaluated) so the proof can treat each as an independent symbol;
`elementary` rewrites them into exp/log/erf for numeric cross-checks.
"""

from __future__ import annotations

from fractions import Fraction

import sympy as sp


class Sigmoid(sp.Function):
    """sigmoid(x) = 1 / (1 + exp(-x))"""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        s = Sigmoid(self.args[0])
        return s * (1 - s)


class Softplus(sp.Function):
    """softplus(x) = log(1 + exp(x)), computed stably with no threshold"""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return Sigmoid(self.args[0])


class Step(sp.Function):
    """step(x) = 1 if x > 0 else 0: the derivative of relu, 0 at the kink as in PyTorch"""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.S.Zero


class Relu(sp.Function):
    """relu(x) = max(x, 0)"""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return Step(self.args[0])


class EluGrad(sp.Function):
    """elu'(x) = 1 if x > 0 else exp(x)"""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        x = self.args[0]
        return (1 - Step(x)) * sp.exp(x)


class Elu(sp.Function):
    """elu(x) = x if x > 0 else exp(x) - 1  (alpha = 1)"""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return EluGrad(self.args[0])


class GeluGrad(sp.Function):
    """gelu'(x) = Phi(x) + x * phi(x)"""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        x = self.args[0]
        pdf = sp.exp(-x**2 / 2) / sp.sqrt(2 * sp.pi)
        return 2 * pdf - x**2 * pdf


class Gelu(sp.Function):
    """gelu(x) = x * Phi(x) = x * (1 + erf(x / sqrt(2))) / 2, the exact form"""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return GeluGrad(self.args[0])


class InRange(sp.Function):
    """1 if lo <= x <= hi else 0: clamp's derivative in x (closed interval, as PyTorch)"""

    nargs = 3

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.S.Zero


class Clamp(sp.Function):
    """clamp(x, lo, hi) = min(max(x, lo), hi)"""

    nargs = 3

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        x, lo, hi = self.args
        if argindex == 1:
            return InRange(x, lo, hi)
        if argindex == 2:
            return Step(lo - x)
        return Step(x - hi)


class NormGrad(sp.Function):
    """d sqrt(r)/dr = 1 / (2 sqrt(r)) for r > 0, and 0 at r = 0: with dr/du = 2u this makes
    norm'(0) = 0, as LANGUAGE.md asks (PyTorch's subgradient)."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        r = self.args[0]
        return -NormGrad(r) / (2 * r)

    def _latex(self, printer: sp.printing.latex.LatexPrinter, exp: str | None = None) -> str:
        text = rf"\frac{{1}}{{2 \sqrt{{{printer._print(self.args[0])}}}}}"
        return rf"\left({text}\right)^{{{exp}}}" if exp else text


class Norm(sp.Function):
    """norm(u) = sqrt(r) of r = sum_f u_f^2, with the derivative of NormGrad."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return NormGrad(self.args[0])

    def _latex(self, printer: sp.printing.latex.LatexPrinter, exp: str | None = None) -> str:
        text = rf"\sqrt{{{printer._print(self.args[0])}}}"
        return rf"\left({text}\right)^{{{exp}}}" if exp else text


class Abs(sp.Abs):
    """abs(x), differentiated as sign(x) * x': every value of the language is real, but SymPy
    cannot tell that of relu(x) or sqrt(x), and then writes abs' with re, im and atan2, which
    no printer knows (`abs(cos(relu(x)))`, `abs(norm(u))`)."""

    @classmethod
    def eval(cls, arg: sp.Expr) -> sp.Expr | None:
        if arg.is_extended_real is not None or arg is sp.nan:
            return super().eval(arg)
        # SymPy would rewrite abs(exp(u)) as exp(re(u)), and a constant it cannot call real
        # (abs(sqrt(softplus(0.5) + 0.25)), fuzz seed 4000) with re and im as well
        return None

    def _eval_derivative(self, x: sp.Symbol) -> sp.Expr:
        return sp.sign(self.args[0]) * sp.diff(self.args[0], x)


class SafeDiv(sp.Function):
    """a / b, and 0 where b == 0 (a normalizer's row with no allowed key, or a `sum` row that
    adds up to 0); a NaN b gives NaN. NumPy prints it as safe_div: a where evaluates both
    branches, and the proof's exact 1 / 0 raises. Kernels print the ternary (its Piecewise)."""

    nargs = 2

    @classmethod
    def eval(cls, a: sp.Expr, b: sp.Expr) -> sp.Expr | None:  # type: ignore[override]
        if b.is_zero:
            return sp.S.Zero
        if b.is_zero is False:  # known nonzero (a number, or exp(...) sums in the tests)
            return a / b
        return None

    def _eval_rewrite_as_Piecewise(self, a: sp.Expr, b: sp.Expr, **kwargs: object) -> sp.Expr:
        return sp.Piecewise((a / b, sp.Ne(b, 0)), (sp.S.Zero, True))


def _constants(args: tuple) -> bool:
    """Numbers SymPy can order: gelu(1/4) is a number it cannot evaluate, so cannot compare."""
    return all(sp.sympify(a).is_comparable for a in args)


class Max(sp.Max):
    """max, folded only when every argument is a constant. SymPy otherwise drops an argument
    from assumptions on the differences, and gets some wrong: 1.14 finds
    1/(3 max(j - i, 1/2)) - 1/4 >= 0, so min(that, 0.25) became 0.25 at every pair."""

    def __new__(cls, *args: sp.Expr, **options: object) -> sp.Expr:
        if _constants(args):  # no symbols, no assumptions: SymPy's own class folds them
            return sp.Max(*args)
        return super().__new__(cls, *args, evaluate=False)


class Min(sp.Min):
    """min, folded only when every argument is a constant (see Max)."""

    def __new__(cls, *args: sp.Expr, **options: object) -> sp.Expr:
        if _constants(args):  # no symbols, no assumptions: SymPy's own class folds them
            return sp.Min(*args)
        return super().__new__(cls, *args, evaluate=False)


class Mod(sp.Mod):
    """x % m, folded only for numbers: SymPy 1.14 rewrites Mod(3 * Mod(j, 4), 7) as
    Mod(3 * Mod(j, 4)**2, 7), a wrong value at j = 2 (silently wrong subscripts)."""

    @classmethod
    def eval(cls, p: sp.Expr, q: sp.Expr) -> sp.Expr | None:
        if (p.is_number and q.is_number) or q == 0:  # q == 0 raises, as SymPy's does
            return sp.Mod.eval(p, q)
        return None


class _ToInteger:
    """floor/ceil: a float to an integer with gradient 0 (SymPy's own leave d/dx unevaluated),
    printed by its spec name and, in LaTeX, between its brackets."""

    word, left, right = "", "", ""

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.S.Zero

    def _sympystr(self, printer: sp.printing.str.StrPrinter) -> str:
        return f"{self.word}({printer._print(self.args[0])})"  # type: ignore[attr-defined]

    def _latex(self, printer: sp.printing.latex.LatexPrinter, exp: str | None = None) -> str:
        inner = printer._print(self.args[0])  # type: ignore[attr-defined]
        text = rf"\left{self.left}{{{inner}}}\right{self.right}"
        return rf"{text}^{{{exp}}}" if exp else text


class Floor(_ToInteger, sp.floor):
    """floor(x): a float to an integer; gradient 0."""

    word, left, right = "floor", r"\lfloor", r"\rfloor"


class Ceil(_ToInteger, sp.ceiling):
    """ceil(x): a float to an integer; gradient 0."""

    word, left, right = "ceil", r"\lceil", r"\rceil"


class Round(sp.Function):
    """round(x): the nearest integer, a tie to the even one (Python, NumPy); gradient 0.
    Integers are not pulled out of the argument: round(1 + 1/2) = 2 but 1 + round(1/2) = 1."""

    nargs = 1
    is_integer = True

    @classmethod
    def eval(cls, x: sp.Expr) -> sp.Expr | None:
        if x.is_integer:
            return x
        if x.is_Rational:
            return sp.Integer(round(Fraction(int(x.p), int(x.q))))
        if x.is_Float:
            return sp.Integer(round(float(x)))
        if x.is_number and x.is_real:  # irrational: never a tie
            return sp.floor(x + sp.S.Half)
        if x.is_number and x.has(*OPAQUE):  # clamp(5/3, -2, 2), relu(1/2): their value first
            return cls(elementary(x))  # (it was left unevaluated; fuzz seed 9400)
        return None

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.S.Zero

    def _latex(self, printer: sp.printing.latex.LatexPrinter, exp: str | None = None) -> str:
        text = rf"\operatorname{{round}}{{\left({printer._print(self.args[0])}\right)}}"
        return rf"{text}^{{{exp}}}" if exp else text


ROUNDING = (Floor, Ceil, Round)  # float -> integer, gradient 0

# Spec function name -> how to build it from SymPy arguments.
SPEC_FUNCTIONS = {
    "exp": sp.exp,
    "log": sp.log,
    "sqrt": sp.sqrt,
    "rsqrt": lambda x: 1 / sp.sqrt(x),
    "abs": Abs,
    "tanh": sp.tanh,
    "sigmoid": Sigmoid,
    "softplus": Softplus,
    "relu": Relu,
    "elu": Elu,
    "gelu": Gelu,
    "sin": sp.sin,
    "cos": sp.cos,
    "min": Min,
    "max": Max,
    "clamp": Clamp,
    "floor": Floor,
    "ceil": Ceil,
    "round": Round,
}

OPAQUE = (Sigmoid, Softplus, Step, Relu, Elu, EluGrad, Gelu, GeluGrad, InRange, Clamp, Norm,
          NormGrad)


def _evalf_elementary(self: sp.Function, prec: int) -> sp.Expr | None:
    """A number for an opaque function of numbers, through its elementary form. SymPy has no
    mpmath function of these names, and without this evalf of `sigmoid(1/2)` deep inside a
    constant fell back to as_real_imag, which handed the same expression back: it recursed
    until RecursionError, and the proof of `scale max(sqrt(1 + sigmoid(0.5)), 0.5)` could not
    run (fuzz seed 8700). Symbolic arguments stay unevaluated (the proof needs them opaque)."""
    if not all(a.is_number for a in self.args):
        return None
    return elementary(self)._eval_evalf(prec)


for _opaque in OPAQUE:
    _opaque._eval_evalf = _evalf_elementary  # type: ignore[attr-defined]


def elementary(expr: sp.Expr) -> sp.Expr:
    """`expr` with every opaque function written in exp/log/erf/Piecewise (for mpmath checks)."""

    def step(x: sp.Expr) -> sp.Expr:
        return sp.Piecewise((1, x > 0), (0, True))

    table = {
        Sigmoid: lambda x: 1 / (1 + sp.exp(-x)),
        Softplus: lambda x: sp.log(1 + sp.exp(x)),
        Step: step,
        Relu: lambda x: sp.Piecewise((x, x > 0), (0, True)),
        Elu: lambda x: sp.Piecewise((x, x > 0), (sp.exp(x) - 1, True)),
        EluGrad: lambda x: sp.Piecewise((1, x > 0), (sp.exp(x), True)),
        Gelu: lambda x: x * (1 + sp.erf(x / sp.sqrt(2))) / 2,
        GeluGrad: lambda x: (1 + sp.erf(x / sp.sqrt(2))) / 2
        + x * sp.exp(-x**2 / 2) / sp.sqrt(2 * sp.pi),
        InRange: lambda x, lo, hi: sp.Piecewise((1, sp.And(x >= lo, x <= hi)), (0, True)),
        Clamp: lambda x, lo, hi: sp.Min(sp.Max(x, lo), hi),
        Norm: sp.sqrt,
        NormGrad: lambda r: sp.Piecewise((1 / (2 * sp.sqrt(r)), r > 0), (0, True)),
    }
    for _ in range(3):  # nested opaque functions
        expr = expr.replace(lambda e: type(e) in table, lambda e: table[type(e)](*e.args))
    return expr
