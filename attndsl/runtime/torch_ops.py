"""The `xp` namespace of runtime/numpy_ops.py over PyTorch tensors, forward only.

`attndsl bench` runs the generated NumPy reference's `forward` with it: an eager PyTorch
evaluation of any spec (every pair materialized, as the reference does), whose gradients come
from torch.autograd. Floats are computed in `dtype`; positions and index arrays stay integers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

Value = Any  # a tensor or a Python number


class TorchOps:
    """One namespace per float dtype: the generated code reads `xp.exp`, `xp.inf`, ..."""

    inf, nan, pi = math.inf, math.nan, math.pi

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    def t(self, x: Value) -> torch.Tensor:
        """A number as a 0-d tensor (a float one in `dtype`, so it never promotes a tensor)."""
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, bool):
            return torch.tensor(x)
        return torch.tensor(x, dtype=torch.int64 if isinstance(x, int) else self.dtype)

    def floats(self, x: Value) -> torch.Tensor:
        x = self.t(x)
        return x if x.is_floating_point() else x.to(self.dtype)

    # ---- numbers --------------------------------------------------------------------------

    def to_float(self, x: Value) -> torch.Tensor:
        return self.floats(x)

    def rational(self, p: int, q: int) -> float:
        return p / q

    def exp(self, x: Value) -> torch.Tensor:
        return torch.exp(self.floats(x))

    def log(self, x: Value) -> torch.Tensor:
        return torch.log(self.floats(x))

    def sqrt(self, x: Value) -> torch.Tensor:
        return torch.sqrt(self.floats(x))

    def tanh(self, x: Value) -> torch.Tensor:
        return torch.tanh(self.floats(x))

    def sin(self, x: Value) -> torch.Tensor:
        return torch.sin(self.floats(x))

    def cos(self, x: Value) -> torch.Tensor:
        return torch.cos(self.floats(x))

    def sign(self, x: Value) -> torch.Tensor:
        return torch.sign(self.t(x))

    def abs(self, x: Value) -> torch.Tensor:
        return torch.abs(self.t(x))

    def maximum(self, a: Value, b: Value) -> torch.Tensor:
        return torch.maximum(*self._common(a, b))

    def minimum(self, a: Value, b: Value) -> torch.Tensor:
        return torch.minimum(*self._common(a, b))

    def _common(self, a: Value, b: Value) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.t(a), self.t(b)
        dtype = torch.promote_types(a.dtype, b.dtype)
        return a.to(dtype), b.to(dtype)

    def where(self, c: Value, x: Value, y: Value) -> torch.Tensor:
        return torch.where(self.t(c), *self._common(x, y))

    def floor(self, x: Value) -> torch.Tensor:
        return torch.floor(self.floats(x))

    def ceil(self, x: Value) -> torch.Tensor:
        return torch.ceil(self.floats(x))

    def round(self, x: Value) -> torch.Tensor:
        return torch.round(self.floats(x))  # half to even, as numpy.rint

    def less(self, a: Value, b: Value) -> torch.Tensor:
        return torch.lt(self.t(a), self.t(b))

    def less_equal(self, a: Value, b: Value) -> torch.Tensor:
        return torch.le(self.t(a), self.t(b))

    def greater(self, a: Value, b: Value) -> torch.Tensor:
        return torch.gt(self.t(a), self.t(b))

    def greater_equal(self, a: Value, b: Value) -> torch.Tensor:
        return torch.ge(self.t(a), self.t(b))

    def equal(self, a: Value, b: Value) -> torch.Tensor:
        return torch.eq(self.t(a), self.t(b))

    def not_equal(self, a: Value, b: Value) -> torch.Tensor:
        return torch.ne(self.t(a), self.t(b))

    def logical_and(self, a: Value, b: Value) -> torch.Tensor:
        return torch.logical_and(self.t(a), self.t(b))

    def logical_or(self, a: Value, b: Value) -> torch.Tensor:
        return torch.logical_or(self.t(a), self.t(b))

    def logical_not(self, a: Value) -> torch.Tensor:
        return torch.logical_not(self.t(a))

    def sigmoid(self, x: Value) -> torch.Tensor:
        return torch.sigmoid(self.floats(x))

    def softplus(self, x: Value) -> torch.Tensor:
        x = self.floats(x)
        return torch.logaddexp(torch.zeros_like(x), x)  # no threshold, as the language says

    def relu(self, x: Value) -> torch.Tensor:
        return torch.relu(self.floats(x))  # relu'(0) = 0

    def elu(self, x: Value) -> torch.Tensor:
        return F.elu(self.floats(x))

    def gelu(self, x: Value) -> torch.Tensor:
        return F.gelu(self.floats(x))  # the exact erf form

    def norm(self, r: Value) -> torch.Tensor:
        return torch.sqrt(self.floats(r))

    def clamp(self, x: Value, lo: Value, hi: Value) -> torch.Tensor:
        return self.minimum(self.maximum(x, lo), hi)

    # ---- layout: [B, heads, n_q, n_k, features] ---------------------------------------------

    def positions(self, B: int, heads: int, n_q: int, n_k: int, q_offset: Any = 0,
                  k_offset: Any = 0) -> tuple[torch.Tensor, ...]:
        """numpy_ops.positions on torch: b, h, i, j, then the offsets [B, 1, 1, 1, 1]."""
        q_off = torch.as_tensor(q_offset, dtype=torch.int64).expand(B).reshape(B, 1, 1, 1, 1)
        k_off = torch.as_tensor(k_offset, dtype=torch.int64).expand(B).reshape(B, 1, 1, 1, 1)
        return (torch.arange(B).reshape(B, 1, 1, 1, 1),
                torch.arange(heads).reshape(1, heads, 1, 1, 1),
                q_off + torch.arange(n_q).reshape(1, 1, n_q, 1, 1),
                k_off + torch.arange(n_k).reshape(1, 1, 1, n_k, 1), q_off, k_off)

    def kv_head_of(self, heads: int, kv_heads: int) -> torch.Tensor:
        return torch.arange(heads) // (heads // kv_heads)

    def query_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :, None, :]

    def key_rows(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if g.numel() == x.shape[1]:
            return x[:, :, None, :, :]
        return x[:, g][:, :, None, :, :]

    def full(self, x: Value, shape: Sequence[int]) -> torch.Tensor:
        return torch.broadcast_to(self.t(x), tuple(shape))

    def lookup(self, array: torch.Tensor, name: str, subscripts: Sequence[Value],
               vector: bool = False, batched: bool = False) -> torch.Tensor:
        """array[subscripts]; a subscript out of range is a ValueError naming the array."""
        subs = [self.t(s).long() for s in subscripts]
        if vector:
            subs = [s[..., 0] if s.ndim == 5 else s for s in subs]
        for axis, s in enumerate(subs):
            if s.numel() and (int(s.min()) < 0 or int(s.max()) >= array.shape[axis]):
                raise ValueError(f"subscript {axis - batched} of '{name}' is out of range")
        return array[tuple(subs)] if subs else array

    def reduce(self, body: torch.Tensor) -> torch.Tensor:
        return torch.sum(body, dim=-1, keepdim=True)

    def gemm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a[:, :, :, 0, :], b[:, :, 0].transpose(-1, -2))[..., None]

    def project(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, w)

    def pair_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)

    # ---- normalizers ------------------------------------------------------------------------

    def keymax(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.amax(x, dim=-2, keepdim=True).detach()  # the shift cancels in every gradient
        return torch.where(m == -math.inf, torch.zeros_like(m), m)

    def keysum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sum(x, dim=-2, keepdim=True)

    def rowsum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sum(x, dim=-1, keepdim=True)

    def safe_div(self, x: Value, z: torch.Tensor) -> torch.Tensor:
        zero = z == 0
        return torch.where(zero, torch.zeros_like(z), self.floats(x) / torch.where(zero, 1, z))

    def log_sum(self, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        empty = l == 0
        return torch.where(empty, -math.inf, m + torch.log(torch.where(empty, 1, l)))



def _number_or(name: str) -> Any:
    """A unary function: math's on a Python number, TorchOps' on a tensor."""
    def apply(self: TorchOps, x: Value) -> Value:
        if isinstance(x, torch.Tensor):
            return getattr(TorchOps, name)(self, x)
        return getattr(math, name)(x) if name != "abs" else abs(x)
    return apply


class FlexOps(TorchOps):
    """Inside flex_attention's score_mod and mask_mod, traced by torch.compile: numbers stay
    Python numbers (a tensor created inside score_mod fails in inductor's lowering), and
    subscripts are read without the range check (a data-dependent branch breaks the graph)."""

    exp, log, sqrt, tanh = (_number_or(n) for n in ("exp", "log", "sqrt", "tanh"))
    sin, cos, abs = (_number_or(n) for n in ("sin", "cos", "abs"))

    def t(self, x: Value) -> Value:  # type: ignore[override]
        return x

    def floats(self, x: Value) -> Value:  # type: ignore[override]
        if isinstance(x, torch.Tensor):
            return x if x.is_floating_point() else x.to(self.dtype)
        return float(x)

    def maximum(self, a: Value, b: Value) -> Value:
        return self._bound(a, b, "min", max)

    def minimum(self, a: Value, b: Value) -> Value:
        return self._bound(a, b, "max", min)

    def _bound(self, a: Value, b: Value, side: str, pick: Any) -> Value:
        if not isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor):
                return pick(a, b)
            a, b = b, a
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, **{side: b})  # maximum(x, 8) is clamp(x, min=8)
        return torch.maximum(a, b) if side == "min" else torch.minimum(a, b)

    def where(self, c: Value, x: Value, y: Value) -> Value:
        return torch.where(c, x, y)

    def less(self, a: Value, b: Value) -> Value:
        return a < b

    def less_equal(self, a: Value, b: Value) -> Value:
        return a <= b

    def greater(self, a: Value, b: Value) -> Value:
        return a > b

    def greater_equal(self, a: Value, b: Value) -> Value:
        return a >= b

    def equal(self, a: Value, b: Value) -> Value:
        return a == b

    def not_equal(self, a: Value, b: Value) -> Value:
        return a != b

    def lookup(self, array: torch.Tensor, name: str, subscripts: Sequence[Value],
               vector: bool = False, batched: bool = False) -> torch.Tensor:
        subs = tuple(s.long() if isinstance(s, torch.Tensor) else int(s) for s in subscripts)
        return array[subs] if subs else array
