"""Arrays to run a spec on when the user gives none: seeded q, k, v and params, and index
arrays (documents along a sequence axis, a prefix of a quarter of the keys). `attndsl show`,
`plot`, `bench` and the cpu tile measurement (runtime/tiles.py) all run on these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import ir

DEMO_DOCUMENTS = 4  # the built-in demo of an index over a sequence axis: 4 equal documents
FREE_SIZE = 4  # a size name the spec leaves free (`r` of `param F[d, r]`)


def documents(n: int, count: int) -> np.ndarray:
    """Ids 0..count-1 of `count` documents of (nearly) equal length packed into n positions."""
    return (np.arange(n) * count // n).astype(np.int64)


def parse_index(text: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """An --index value: `docs:K` (K equal documents along the last axis) or a comma list of
    integers, one per element (a single integer fills the array)."""
    if text.startswith("docs:"):
        count = text[5:]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--index {name}={text}: expected docs:K with K a positive integer")
        return np.broadcast_to(documents(shape[-1], int(count)), shape).copy()
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--index {name}={text}: expected integers separated by commas, or "
                         "docs:K") from None
    if len(values) == 1:
        return np.full(shape, values[0], dtype=np.int64)
    if len(values) != int(np.prod(shape)):
        raise ValueError(f"--index {name}: got {len(values)} values, the array has shape "
                         f"{list(shape)} ({int(np.prod(shape))} values)")
    return np.asarray(values, dtype=np.int64).reshape(shape)


def _shape(dims: tuple[ir.Dim, ...], sizes: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else sizes.get(d, FREE_SIZE) for d in dims)


def sequence_axis(dims: tuple[ir.Dim, ...]) -> bool:
    return bool(dims) and dims[-1] in ("n", "n_q", "n_k")


def demo_index(index: ir.Index, sizes: Mapping[str, int]) -> np.ndarray:
    """The built-in demo: DEMO_DOCUMENTS equal documents along a sequence axis, else n_k // 4
    everywhere (a prefix of a quarter of the keys)."""
    shape = _shape(index.dims, sizes)
    if sequence_axis(index.dims):
        return np.broadcast_to(documents(shape[-1], DEMO_DOCUMENTS), shape).copy()
    return np.full(shape, sizes["n_k"] // 4, dtype=np.int64)


def demo_params(spec: ir.Spec, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random params and inputs (seeded): N(0, 0.25), scalars and softcap parts in [0.5, ...) as
    in verification (a softcap <= 0 is refused at call time)."""
    rng = np.random.default_rng(seed)
    softcap = {n.name for n in ir.walk(spec.softcap)
               if isinstance(n, (ir.Name, ir.Subscript))} if spec.softcap is not None else set()
    params = {}
    for p in spec.params:
        value = rng.standard_normal(_shape(p.dims, sizes)) * 0.5  # an input's dims start at B
        params[p.name] = np.abs(value) + 0.5 if not p.spec_dims or p.name in softcap else value
    return params


@dataclass
class Inputs:
    """q, k, v and the params and index arrays of one call."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    extra: dict[str, np.ndarray]


def heads_of(spec: ir.Spec, at_least: int = 1) -> tuple[int, int]:
    """(heads, kv_heads): the spec's, else the fewest that give `at_least` query heads (one
    key/value head per query head unless the spec fixes kv_heads)."""
    if spec.heads is not None:
        return spec.heads, spec.kv_heads or spec.heads
    kv_heads = spec.kv_heads or max(1, at_least)
    return kv_heads * -(-max(1, at_least) // kv_heads), kv_heads


def demo_inputs(spec: ir.Spec, n_q: int, n_k: int, d: int = 16, dv: int = 16, batch: int = 1,
                indices: Mapping[str, str] | None = None, seed: int = 0,
                heads: tuple[int, int] | None = None) -> Inputs:
    """Seeded random q, k, v [batch, heads, n, d] (float64) and params; index arrays from
    `indices` (NAME -> an --index value) or the built-in demo. `heads`: (heads, kv_heads),
    else `heads_of(spec)`."""
    heads, kv_heads = heads or heads_of(spec)
    sizes = {"B": batch, "heads": heads, "kv_heads": kv_heads, "n_q": n_q, "n_k": n_k,
             "n": n_q, "d": d, "dv": dv}
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, n_q, d))
    k = rng.standard_normal((batch, kv_heads, n_k, d))
    v = rng.standard_normal((batch, kv_heads, n_k, dv))
    extra = demo_params(spec, sizes, seed + 1)
    given = dict(indices or {})
    unknown = sorted(set(given) - {x.name for x in spec.indices})
    if unknown:
        raise ValueError(f"--index {unknown[0]}: the spec has no index array of that name "
                         f"(it has: {', '.join(x.name for x in spec.indices) or 'none'})")
    for x in spec.indices:
        shape = _shape(x.dims, sizes)
        extra[x.name] = (parse_index(given[x.name], shape, x.name) if x.name in given
                         else demo_index(x, sizes))
    return Inputs(q, k, v, extra)
