"""Scalar functions generated Numba kernels call as `fx.name(x)`: one float type in, the same out.

Each is a Numba overload whose constants are typed like its argument, so float32 math never
drifts into float64. Kinks follow LANGUAGE.md 3: relu'(0) = 0, a max/min tie splits the
gradient (H(0) = 1/2), clamp passes the gradient on the closed interval [lo, hi].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import types
from numba.extending import overload


def _stub(name: str, arity: int) -> Callable[..., Any]:
    def fail() -> Any:
        raise NotImplementedError(f"fx.{name} is only callable from Numba-compiled code")

    stubs = {1: lambda x: fail(), 2: lambda a, b: fail(), 3: lambda x, lo, hi: fail()}
    stub = stubs[arity]
    stub.__name__ = name
    return stub


def _float(*args: Any) -> type | None:
    """The NumPy float type of the arguments, or None when they are not all floats."""
    if not all(isinstance(a, types.Float) for a in args):
        return None
    return np.dtype(str(args[0])).type


def _define(name: str, arity: int, make: Callable[[type], Callable[..., Any]],
            inline: str = "always") -> Callable:
    """A stub callable from Numba code, typed per float type by `make(np.float32 | float64)`."""
    stub = _stub(name, arity)

    def build(*args: Any) -> Any:
        kind = _float(*args)
        if kind is None:
            return None
        return make(kind)

    typers = {1: lambda x: build(x), 2: lambda a, b: build(a, b),
              3: lambda x, lo, hi: build(x, lo, hi)}
    overload(stub, inline=inline)(typers[arity])
    return stub


def _exp(F: type) -> Callable[..., Any]:
    return lambda x: math.exp(x)


def _tanh(F: type) -> Callable[..., Any]:
    """float32: tanh(x) = 1 - 2 / (2^(2 x log2 e) + 1) through the vectorizing exp2 (absolute
    error ~1e-7; libm's tanhf does not vectorize here); float64: math.tanh."""
    if F is not np.float32:
        return lambda x: math.tanh(x)
    from .cpu_intrinsics import exp2_f32, fmax, keep_nan

    one, two, scale, cap = F(1), F(2), F(2 * 1.4426950408889634), F(64)

    def tanh(x):  # type: ignore[no-untyped-def]
        # min(2 x log2 e, 64): 2^64 already gives 1 and keeps exp2's exponent in range (below
        # -126 exp2 gives 0 itself: -1)
        y = -fmax(-(x * scale), -cap)
        return keep_nan(x, one - two / (exp2_f32(y) + one))  # the clamp drops a NaN

    return tanh


def _sigmoid(F: type) -> Callable[..., Any]:
    one = F(1)

    def sigmoid(x):  # type: ignore[no-untyped-def]
        if x >= 0:
            return one / (one + math.exp(-x))
        e = math.exp(x)
        return e / (one + e)

    return sigmoid


def _softplus(F: type) -> Callable[..., Any]:
    zero = F(0)

    def softplus(x):  # type: ignore[no-untyped-def]
        # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)): no overflow, no threshold
        if x > zero:
            return x + math.log1p(math.exp(-x))
        return math.log1p(math.exp(x))

    return softplus


def _gelu(F: type) -> Callable[..., Any]:
    half, one, r2 = F(0.5), F(1), F(0.7071067811865476)
    return lambda x: x * (one + math.erf(x * r2)) * half


def _gelu_grad(F: type) -> Callable[..., Any]:
    half, one, r2, pdf = F(0.5), F(1), F(0.7071067811865476), F(0.3989422804014327)
    return lambda x: (one + math.erf(x * r2)) * half + x * math.exp(-half * x * x) * pdf


def _step(F: type) -> Callable[..., Any]:
    one, zero = F(1), F(0)

    def step(x):  # type: ignore[no-untyped-def]
        if x > zero:
            return one
        return zero

    return step


def _in_range(F: type) -> Callable[..., Any]:
    one, zero = F(1), F(0)

    def in_range(x, lo, hi):  # type: ignore[no-untyped-def]
        if lo <= x <= hi:
            return one
        return zero

    return in_range


def _heaviside(F: type) -> Callable[..., Any]:
    one, half, zero = F(1), F(0.5), F(0)

    def heaviside(x):  # type: ignore[no-untyped-def]
        if x > zero:
            return one
        if x < zero:
            return zero
        if x == zero:
            return half
        return x  # NaN, as NumPy's heaviside

    return heaviside


exp = _define("exp", 1, _exp)
log = _define("log", 1, lambda F: lambda x: math.log(x))
sqrt = _define("sqrt", 1, lambda F: lambda x: math.sqrt(x))
# Inlined at the Numba IR level, which trips Numba's pedantic NumbaIRAssumptionWarning for its
# exp2 call in kernel loops (harmless); inline="never" silences it but made softcap's backward
# ~15% slower.
tanh = _define("tanh", 1, _tanh)
sin = _define("sin", 1, lambda F: lambda x: math.sin(x))
cos = _define("cos", 1, lambda F: lambda x: math.cos(x))
def _abs(F: type) -> Callable[..., Any]:
    zero = F(0)

    def absolute(x):  # type: ignore[no-untyped-def]
        if x >= zero:
            return x
        return -x

    return absolute


def _sign(F: type) -> Callable[..., Any]:
    one, zero = F(1), F(0)

    def sign(x):  # type: ignore[no-untyped-def]
        if x > zero:
            return one
        if x < zero:
            return -one
        if x == zero:
            return zero
        return x  # NaN, as NumPy's sign

    return sign


def _pick(F: type, larger: bool) -> Callable[..., Any]:
    # a NaN in either argument wins, as in NumPy's maximum/minimum (`a >= b` alone drops a NaN a)
    def maximum(a, b):  # type: ignore[no-untyped-def]
        if a >= b or a != a:  # noqa: PLR0124 - a NaN test (math.isnan: float64 only)
            return a
        return b

    def minimum(a, b):  # type: ignore[no-untyped-def]
        if a <= b or a != a:  # noqa: PLR0124 - a NaN test (math.isnan: float64 only)
            return a
        return b

    if larger:
        return maximum
    return minimum


def _clamp(F: type) -> Callable[..., Any]:
    def clamp(x, lo, hi):  # type: ignore[no-untyped-def]
        return minimum(maximum(x, lo), hi)  # a NaN in x, lo or hi wins, as in NumPy

    return clamp


def _relu(F: type) -> Callable[..., Any]:
    zero = F(0)

    def relu(x):  # type: ignore[no-untyped-def]
        if x <= zero:
            return zero
        return x  # and a NaN, as NumPy's maximum(x, 0)

    return relu


def _elu(F: type) -> Callable[..., Any]:
    """float32: cpu_intrinsics.elu_f32, the bits of the NumPy reference's float32 elu (it
    vectorizes; libm's expm1f does not); float64: math.expm1."""
    if F is np.float32:
        from .cpu_intrinsics import elu_f32

        return lambda x: elu_f32(x)
    zero = F(0)

    def elu(x):  # type: ignore[no-untyped-def]
        if x > zero:
            return x
        return math.expm1(x)

    return elu


def _elu_grad(F: type) -> Callable[..., Any]:
    """float32: through the vectorizing exp2 (cpu_intrinsics.elu_grad_f32); float64: math.exp."""
    if F is np.float32:
        from .cpu_intrinsics import elu_grad_f32

        return lambda x: elu_grad_f32(x)
    one, zero = F(1), F(0)

    def elu_grad(x):  # type: ignore[no-untyped-def]
        if x > zero:
            return one
        return math.exp(x)

    return elu_grad


def _norm_grad(F: type) -> Callable[..., Any]:
    half, zero = F(0.5), F(0)

    def norm_grad(x):  # type: ignore[no-untyped-def]
        if x > zero:
            return half / math.sqrt(x)
        return zero  # norm'(0) = 0

    return norm_grad


nan = math.nan  # SymPy's 1/0 in a `where` branch not taken
abs = _define("abs", 1, _abs)  # the spec function's name
sign = _define("sign", 1, _sign)
floor = _define("floor", 1, lambda F: lambda x: np.floor(x))
ceil = _define("ceil", 1, lambda F: lambda x: np.ceil(x))
rint = _define("rint", 1, lambda F: lambda x: np.rint(x))  # the spec's round: a tie to even
# The spec's floor/ceil/round as integers (subscripts): math.floor and round() return int64
ifloor = _define("ifloor", 1, lambda F: lambda x: math.floor(x))
iceil = _define("iceil", 1, lambda F: lambda x: math.ceil(x))
iround = _define("iround", 1, lambda F: lambda x: round(x))
maximum = _define("maximum", 2, lambda F: _pick(F, True))
minimum = _define("minimum", 2, lambda F: _pick(F, False))
heaviside = _define("heaviside", 1, _heaviside)
step = _define("step", 1, _step)
in_range = _define("in_range", 3, _in_range)
relu = _define("relu", 1, _relu)
sigmoid = _define("sigmoid", 1, _sigmoid)
softplus = _define("softplus", 1, _softplus)
elu = _define("elu", 1, _elu)
elu_grad = _define("elu_grad", 1, _elu_grad)
gelu = _define("gelu", 1, _gelu)
gelu_grad = _define("gelu_grad", 1, _gelu_grad)
norm = _define("norm", 1, lambda F: lambda x: math.sqrt(x))
norm_grad = _define("norm_grad", 1, _norm_grad)
clamp = _define("clamp", 3, _clamp)
