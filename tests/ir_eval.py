"""An independent oracle: LANGUAGE.md section 1 evaluated by walking the checked IR, pair by pair.

It shares nothing with code generation (no SymPy, no printer, no runtime): a direct reading of
the contract, with loops over b, h, i, j and NumPy 1-D arrays over the feature axis. Slow and
readable, for tests only (the differential fuzzer's reference).

    result = evaluate(spec, q, k, v, params={...}, indices={...})
    result.out, result.lse (None unless softmax), result.weights

Semantics it commits to, each from the contract: g(h) = h // (heads // kv_heads); `n` means
n_q; `//` and `%` are Python's; `/` and `^` give floats; `floor`, `ceil`, `round` (half to even)
give integers; a masked pair and the branch `where` does not pick are never evaluated (so a NaN
there cannot reach the result) while a NaN logit at an allowed pair propagates to out and lse
(as in PyTorch); a pair whose weight is exactly 0 adds nothing to out (docs/language.md (x2),
so a NaN in v read only by such pairs stays there, unlike PyTorch's 0 * NaN); an empty row gives out = 0 and lse = -inf; `sum` gives out = 0
where the row's sum is 0; a subscript out of range is a ValueError naming the array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from attndsl import ir
from attndsl.ir import Kind, NormKind

Value = Any  # int, bool, np.float64 or a 1-D float64 array


@dataclass
class Result:
    out: np.ndarray  # [B, heads, n_q, dv]
    lse: np.ndarray | None  # [B, heads, n_q], softmax only
    weights: np.ndarray  # [B, heads, n_q, n_k], 0 where not allowed


# ---- the functions of the language, on a float or a 1-D array --------------------------------


def _sigmoid(x: Value) -> Value:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _softplus(x: Value) -> Value:
    x = np.asarray(x, dtype=np.float64)
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _gelu(x: Value) -> Value:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _elu(x: Value) -> Value:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _to_int(f: Callable[[float], float]) -> Callable[[Value], Value]:
    def apply(x: Value) -> Value:
        if np.ndim(x):
            return f(np.asarray(x, dtype=np.float64))
        return int(f(float(x)))
    return apply


def _round_half_even(x: Value) -> Value:
    return np.round(x) if np.ndim(x) else round(x)  # both round half to even


def _min(a: Value, b: Value) -> Value:
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return np.minimum(a, b)  # a NaN propagates (Python's min would depend on the order)


def _max(a: Value, b: Value) -> Value:
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return np.maximum(a, b)


FUNCTIONS: dict[str, Callable[..., Value]] = {
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(np.float64(x)),
    "abs": lambda x: abs(x),  # keeps an integer an integer
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    "relu": lambda x: _max(x, 0.0),
    "elu": _elu,
    "gelu": _gelu,
    "sin": np.sin,
    "cos": np.cos,
    "min": _min,
    "max": _max,
    "clamp": lambda x, lo, hi: _min(_max(x, lo), hi),
    "floor": _to_int(math.floor),
    "ceil": _to_int(math.ceil),
    "round": _round_half_even,
}


# ---- one pair ---------------------------------------------------------------------------------


@dataclass
class Pair:
    """Everything an expression may read at one (b, h, i, j)."""

    b: int
    h: int
    i: int
    j: int
    g: int
    q: np.ndarray
    k: np.ndarray
    sizes: Mapping[str, int]
    params: Mapping[str, np.ndarray]
    indices: Mapping[str, np.ndarray]
    s: float | None = None


# f(0) = 0 that SymPy evaluates when it builds f(0) (its own functions; attndsl's relu, elu,
# gelu and norm stay unevaluated, so a NaN times relu(0) is still NaN)
_ZERO_AT_ZERO = ("tanh", "sin", "sqrt", "abs", "sum")


def _folds_to_zero(node: ir.Expr) -> bool:
    """Whether SymPy folds `node` to 0 whatever its operands hold (docs/language.md (x3)):
    x - x, 0 * x, x * 0, 0 / x, -0, 0 ^ c (c > 0), tanh(0), sum(0), a literal 0."""
    if isinstance(node, ir.Num):
        return float(node.text) == 0
    if isinstance(node, ir.Unary) and node.op == "-":
        return _folds_to_zero(node.operand)
    if isinstance(node, ir.Call):
        return node.func in _ZERO_AT_ZERO and _folds_to_zero(node.args[0])
    if not isinstance(node, ir.Binary):
        return False
    if node.op == "-":
        return node.left == node.right
    if node.op == "*":
        return _folds_to_zero(node.left) or _folds_to_zero(node.right)
    if node.op == "^":
        return (_folds_to_zero(node.left) and isinstance(node.right, ir.Num)
                and float(node.right.text) > 0)
    return node.op == "/" and _folds_to_zero(node.left)


class Evaluator:
    """Evaluates checked (let-inlined, typed) expressions at one pair."""

    def __call__(self, node: ir.Expr, at: Pair) -> Value:
        value = getattr(self, "_" + type(node).__name__.lower())(node, at)
        return _as_kind(value, node.type)

    def _num(self, node: ir.Num, at: Pair) -> Value:
        return int(node.text) if node.is_int else np.float64(float(node.text))

    def _name(self, node: ir.Name, at: Pair) -> Value:
        name = node.name
        fixed = {"q": at.q, "k": at.k, "i": at.i, "j": at.j, "h": at.h, "b": at.b, "s": at.s}
        if name in fixed:
            return fixed[name]
        if name == "n":
            return at.sizes["n_q"]
        if name in at.sizes and name != "B":  # B is no spec name: a param may be called B
            return at.sizes[name]
        if name in at.params:
            value = at.params[name]
            return np.float64(value) if value.ndim == 0 else value  # a scalar or a vector
        if name in at.indices:
            return int(at.indices[name][at.b])  # an index without DIMS has shape [B]
        raise KeyError(f"ir_eval: unknown name {name!r}")

    def _unary(self, node: ir.Unary, at: Pair) -> Value:
        value = self(node.operand, at)
        return (not value) if node.op == "not" else -value

    def _binary(self, node: ir.Binary, at: Pair) -> Value:
        op = node.op
        if op == "@":
            assert isinstance(node.right, ir.Name)
            return self(node.left, at) @ at.params[node.right.name]
        left = self(node.left, at)
        if op == "and":
            return bool(left) and bool(self(node.right, at))
        if op == "or":
            return bool(left) or bool(self(node.right, at))
        right = self(node.right, at)
        if _folds_to_zero(node):  # docs/language.md (x3): x - x, 0 * x, 0 / x are 0, NaN or not
            shape = np.broadcast(left, right).shape
            integers = all(isinstance(x, (int, np.integer)) for x in (left, right))
            return np.zeros(shape) if shape else (0 if integers else 0.0)
        if op == "." and (_folds_to_zero(node.left) or _folds_to_zero(node.right)):
            return np.float64(0.0)
        return _BINARY[op](left, right)

    def _call(self, node: ir.Call, at: Pair) -> Value:
        func = node.func
        if func == "where":  # only the picked branch is evaluated
            cond, yes, no = node.args
            return self(yes, at) if self(cond, at) else self(no, at)
        args = [self(a, at) for a in node.args]
        if func == "dot" and any(_folds_to_zero(a) for a in node.args):
            return np.float64(0.0)  # docs/language.md (x3): dot(k, q - q) is 0
        if func == "dot":
            return np.float64(np.sum(args[0] * args[1]))
        if func == "sum":
            return np.float64(np.sum(args[0]))
        if func == "norm":
            return np.float64(math.sqrt(float(np.sum(args[0] * args[0]))))
        if func not in FUNCTIONS:
            raise KeyError(f"ir_eval: no meaning for function {func!r}")
        with np.errstate(all="ignore"):
            return FUNCTIONS[func](*args)

    def _subscript(self, node: ir.Subscript, at: Pair) -> Value:
        subs = [int(self(s, at)) for s in node.indices]
        if node.name in at.params:
            array = at.params[node.name]
            lead: list[int] = []
        else:
            array = at.indices[node.name]
            lead = [at.b]  # index arrays carry the batch axis
        for axis, sub in enumerate(subs):
            size = array.shape[len(lead) + axis]
            if not 0 <= sub < size:
                raise ValueError(f"subscript {axis} of '{node.name}' is out of range: got {sub}, "
                                 f"the array has size {size} on that axis")
        value = array[tuple(lead + subs)]
        if node.name in at.indices:
            return int(value)
        return np.float64(value) if np.ndim(value) == 0 else np.asarray(value, dtype=np.float64)


def _power(a: Value, b: Value) -> Value:
    with np.errstate(all="ignore"):
        return np.power(np.float64(a) if not np.ndim(a) else a, np.float64(b) if not np.ndim(b)
                        else b)


def _divide(a: Value, b: Value) -> Value:
    with np.errstate(all="ignore"):
        return np.divide(np.float64(a) if not np.ndim(a) else a, b)


def _arith(f: Callable[[Value, Value], Value]) -> Callable[[Value, Value], Value]:
    def apply(a: Value, b: Value) -> Value:
        with np.errstate(all="ignore"):
            return f(a, b)
    return apply


_BINARY: dict[str, Callable[[Value, Value], Value]] = {
    "+": _arith(lambda a, b: a + b),
    "-": _arith(lambda a, b: a - b),
    "*": _arith(lambda a, b: a * b),
    "/": _divide,
    "^": _power,
    "//": lambda a, b: int(a) // int(b),  # Python's floor division
    "%": lambda a, b: int(a) % int(b),  # Python's sign of the divisor
    ".": lambda a, b: np.float64(np.sum(a * b)),
    "==": lambda a, b: bool(a == b),
    "!=": lambda a, b: bool(a != b),
    "<": lambda a, b: bool(a < b),
    "<=": lambda a, b: bool(a <= b),
    ">": lambda a, b: bool(a > b),
    ">=": lambda a, b: bool(a >= b),
}


def _as_kind(value: Value, typ: ir.Type | None) -> Value:
    """Holds each value to the kind the checker gave its node."""
    if typ is None:
        return value
    if typ.kind is Kind.INT:
        return int(value)
    if typ.kind is Kind.BOOL:
        return bool(value)
    if typ.kind is Kind.FLOAT:
        return np.float64(value)
    return np.asarray(value, dtype=np.float64)


# ---- the whole spec ---------------------------------------------------------------------------


def sizes_of(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec: ir.Spec,
             params: Mapping[str, np.ndarray],
             indices: Mapping[str, np.ndarray]) -> dict[str, int]:
    B, heads, n_q, d = q.shape
    sizes = {"B": B, "heads": heads, "kv_heads": k.shape[1], "n_q": n_q, "n_k": k.shape[2],
             "d": d, "dv": v.shape[3]}
    for decl, lead in [(p, 0) for p in spec.params] + [(x, 1) for x in spec.indices]:
        array = params[decl.name] if lead == 0 else indices[decl.name]
        for axis, dim in enumerate(decl.dims):
            if isinstance(dim, str) and dim not in sizes and dim != "n":
                sizes[dim] = np.shape(array)[lead + axis]  # a fresh size such as r
    return sizes


def logit(spec: ir.Spec, at: Pair, ev: Evaluator) -> float:
    """softcap(score * scale + bias) at one pair."""
    x = ev(spec.score, at)
    if spec.scale is not None:
        x = x * ev(spec.scale, at)
    if spec.bias is not None:
        x = x + ev(spec.bias, at)
    if spec.softcap is not None:
        cap = ev(spec.softcap, at)
        with np.errstate(all="ignore"):
            x = cap * np.tanh(x / cap)
    return np.float64(x)


def _row_weights(spec: ir.Spec, x: np.ndarray, allowed: np.ndarray,
                 pairs: list[Pair | None], ev: Evaluator, sink_pair: Pair
                 ) -> tuple[np.ndarray, float | None]:
    """The weights of one row from its logits, and its lse (softmax only). `sink_pair` is
    the row at key 0, where a sink (one logit per row: it never reads j) is evaluated."""
    kind = spec.normalize.kind
    w = np.zeros_like(x)
    if spec.normalize.sink is not None:  # one more key, with no value, at the row's logit
        sink = float(ev(spec.normalize.sink, sink_pair))
        m = float(np.max(np.append(x[allowed], sink)))  # NaN propagates
        e = np.where(allowed, np.exp(np.where(allowed, x - m, 0.0)), 0.0)
        total = float(np.sum(e)) + math.exp(sink - m)
        return e / total, m + math.log(total)
    if kind is NormKind.SOFTMAX:
        if not allowed.any():
            return w, -math.inf
        m = float(np.max(x[allowed]))  # NaN propagates
        e = np.where(allowed, np.exp(np.where(allowed, x - m, 0.0)), 0.0)
        total = float(np.sum(e))
        return e / total, m + math.log(total)
    if kind is NormKind.SUM:
        total = float(np.sum(x[allowed]))
        return (w if total == 0 else np.where(allowed, x / (total or 1.0), 0.0)), None
    if kind is NormKind.NONE:
        return np.where(allowed, x, 0.0), None
    assert spec.normalize.expr is not None
    for j, pair in enumerate(pairs):
        if pair is not None:
            pair.s = x[j]
            w[j] = ev(spec.normalize.expr, pair)
    return w, None


def evaluate(spec: ir.Spec, q: np.ndarray, k: np.ndarray, v: np.ndarray,
             params: Mapping[str, Any] | None = None,
             indices: Mapping[str, Any] | None = None) -> Result:
    """out, lse and weights of a checked spec, pair by pair (LANGUAGE.md section 1)."""
    assert spec.checked, "ir_eval needs a checked spec (attndsl.parse)"
    params = {n: np.asarray(a, dtype=np.float64) for n, a in (params or {}).items()}
    indices = {n: np.asarray(a, dtype=np.int64) for n, a in (indices or {}).items()}
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    sizes = sizes_of(q, k, v, spec, params, indices)
    B, heads, n_q, n_k, dv = (sizes[s] for s in ("B", "heads", "n_q", "n_k", "dv"))
    group = heads // sizes["kv_heads"]
    ev = Evaluator()
    out = np.zeros((B, heads, n_q, dv))
    lse = np.zeros((B, heads, n_q))
    weights = np.zeros((B, heads, n_q, n_k))
    for b in range(B):
        for h in range(heads):
            g = h // group
            for i in range(n_q):
                x = np.zeros(n_k)
                allowed = np.zeros(n_k, dtype=bool)
                pairs: list[Pair | None] = [None] * n_k
                for j in range(n_k):
                    at = Pair(b, h, i, j, g, q[b, h, i], k[b, g, j], sizes, params, indices)
                    if spec.mask is not None and not ev(spec.mask, at):
                        continue  # a masked pair is never evaluated
                    allowed[j] = True
                    pairs[j] = at
                    x[j] = logit(spec, at, ev)
                row = Pair(b, h, i, 0, g, q[b, h, i], k[b, g, 0], sizes, params, indices)
                w, row_lse = _row_weights(spec, x, allowed, pairs, ev, row)
                weights[b, h, i] = w
                lse[b, h, i] = row_lse if row_lse is not None else np.nan
                # docs/language.md (x2): a pair whose weight is exactly 0 (masked, underflowed,
                # relu'd) adds nothing, so a NaN in v read only by such pairs stays there
                live = allowed & (w != 0)
                out[b, h, i] = w[live] @ v[b, g][live] if live.any() else 0.0
    is_softmax = spec.normalize.kind is NormKind.SOFTMAX
    return Result(out, lse if is_softmax else None, weights)


def loss(spec: ir.Spec, q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray,
         params: Mapping[str, Any], indices: Mapping[str, Any]) -> float:
    """sum(out * dout): the scalar whose gradient `Kernel.backward` returns."""
    return float(np.sum(evaluate(spec, q, k, v, params, indices).out * dout))
