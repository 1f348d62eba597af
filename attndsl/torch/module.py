"""`Attention`: an nn.Module owning a spec's params as nn.Parameters (docs/torch.md).

A param's shape comes from its initial value when one is given, else from the spec's dims: the
spec's own `heads`/`kv_heads`, integer literals, and sizes passed by keyword (`heads=8`, `d=64`,
`r=16`). Default initialization by shape, when no value is given:

  scalar (`param tau`)                             1
  first dim heads or kv_heads (slopes, sinks,      0 (ALiBi and relative biases start neutral,
    relative-position tables)                         a sink starts as "softmax off by one")
  anything else (`[d, r]`, `[d, d]`, `[r]`)         normal(0, 1 / sqrt(first dim)), from torch's
                                                      global generator (torch.manual_seed)

Parameters are created in torch's default dtype (`.to(torch.float64)` converts them); the
kernels cast them to q's dtype and return each gradient in its param's own dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attndsl import ir

from .ops import ENTRIES, apply, spec_handle

SIZES = ("heads", "kv_heads", "d", "dv", "n", "n_q", "n_k")


class Attention(nn.Module):
    """`Attention(spec, **sizes_and_initial_params)`; `forward(q, k, v, **inputs_and_indices)`
    (and q_offset=, k_offset=) returns out [B, heads, n_q, dv] (or (out, lse) with
    `return_lse=True`)."""

    def __init__(self, spec: Any, **sizes_and_params: Any) -> None:
        super().__init__()
        self.handle = spec_handle(spec)
        self.spec = ENTRIES[self.handle].spec
        learnable = [p for p in self.spec.params if not p.batched]
        sizes = _sizes(self.spec, learnable, sizes_and_params)
        values = {}
        for p in learnable:  # given values first: their shapes bind sizes (r of Wq[d, r])
            if p.name in sizes_and_params:
                value = torch.as_tensor(sizes_and_params[p.name]).detach().clone()
                if not value.is_floating_point():
                    value = value.to(torch.get_default_dtype())
                _bind(p, tuple(value.shape), sizes)
                values[p.name] = value
        for p in learnable:
            if hasattr(self, p.name):
                raise ValueError(f"param {p.name!r} clashes with an nn.Module attribute; "
                                 "rename it in the spec to use it in attndsl.torch.Attention")
            value = values[p.name] if p.name in values else initial_value(p, _shape(p, sizes))
            self.register_parameter(p.name, nn.Parameter(value))
        self.names = tuple(p.name for p in learnable)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                return_lse: bool = False, **inputs_and_indices: Any) -> Any:
        return apply(self.handle, q, k, v, return_lse=return_lse,
                     **self.arguments(inputs_and_indices))

    def arguments(self, inputs_and_indices: dict[str, Any]) -> dict[str, Any]:
        """The module's params and the call's inputs and index arrays, by name."""
        own = sorted(set(inputs_and_indices) & set(self.names))
        if own:
            raise TypeError(f"{', '.join(own)}: owned by the module as parameters; pass only "
                            "inputs and index arrays to forward")
        return {**{name: getattr(self, name) for name in self.names}, **inputs_and_indices}

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}{list(getattr(self, n).shape)}" for n in self.names)
        return f"spec={self.spec.name!r}" + (f", {shapes}" if shapes else "")


def initial_value(p: ir.Param, shape: tuple[int, ...]) -> torch.Tensor:
    """The documented default of a param with no initial value (module docstring)."""
    dtype = torch.get_default_dtype()
    if not shape:
        return torch.ones((), dtype=dtype)
    if p.dims[0] in ("heads", "kv_heads"):
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype) / math.sqrt(shape[0])


def _sizes(spec: ir.Spec, learnable: list[ir.Param], given: dict[str, Any]) -> dict[str, int]:
    """The sizes the params' shapes may read: the spec's heads and kv_heads, and keywords."""
    fresh = {d for p in learnable for d in p.dims if isinstance(d, str) and d not in SIZES}
    names = {p.name for p in learnable}
    unexpected = sorted(set(given) - names - fresh - set(SIZES))
    if unexpected:
        inputs = {p.name for p in spec.params if p.batched} | {x.name for x in spec.indices}
        why = ("inputs and index arrays are passed to forward" if set(unexpected) & inputs
               else f"the spec's params are {', '.join(sorted(names)) or 'none'}")
        raise TypeError(f"unexpected argument{'s' if len(unexpected) > 1 else ''} "
                        f"{', '.join(unexpected)}; {why}")
    sizes: dict[str, int] = {}
    for name in (*SIZES, *sorted(fresh)):
        if name in given:
            value = given[name]
            if not isinstance(value, int) or value < 1:
                raise TypeError(f"{name}: a size must be a positive int, got {value!r}")
            sizes[name] = value
    for name, declared in (("heads", spec.heads), ("kv_heads", spec.kv_heads or spec.heads)):
        if declared is not None:
            if sizes.get(name, declared) != declared:
                raise ValueError(f"{name}: the spec has {name} {declared}, got {sizes[name]}")
            sizes[name] = declared
    if "n" in sizes:
        sizes.setdefault("n_q", sizes["n"])
        sizes.setdefault("n_k", sizes["n"])
    return sizes


def _shape(p: ir.Param, sizes: dict[str, int]) -> tuple[int, ...]:
    missing = list(dict.fromkeys(d for d in p.dims if isinstance(d, str) and d not in sizes))
    if missing:
        given = ", ".join(f"{d}=..." for d in missing)
        raise TypeError(f"{p.name}{_dims(p)}: its shape needs {', '.join(missing)}; pass "
                        f"{given} or an initial value {p.name}=...")
    return tuple(d if isinstance(d, int) else sizes[d] for d in p.dims)


def _bind(p: ir.Param, shape: tuple[int, ...], sizes: dict[str, int]) -> None:
    """Check a given value's shape against the param's dims, binding sizes not yet known."""
    bound = dict(sizes)
    for dim, got in zip(p.dims, shape):
        if isinstance(dim, str):
            bound.setdefault(dim, got)
    need = [d if isinstance(d, int) else bound[d] for d in p.dims]
    if list(shape) != need:
        raise ValueError(f"{p.name}: expected shape [{', '.join(map(str, need))}], got "
                         f"[{', '.join(map(str, shape))}]")
    sizes.update(bound)


def _dims(p: ir.Param) -> str:
    return f"[{', '.join(map(str, p.dims))}]" if p.dims else ""
