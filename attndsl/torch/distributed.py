"""Ring attention (context parallelism) for every spec, on torch.distributed (docs/distributed.md).

    import attndsl.torch as at
    out = at.distributed.ring_attention(spec, q, k, v, group=None, layout="zigzag", **params)

Each rank holds one shard of the sequence: its rows of q, k, v and of every per-position
index array and input. Key shards (k, v and the key-side arrays) travel around the ring with
`torch.distributed.batch_isend_irecv`, the next transfer posted before the current step's
kernels run. Every step runs the spec's own kernels (the `attndsl::attention` ops) at the
shards' global offsets, on a shard program of the spec (ring_spec.py), and the partial results
merge by the normalizer: softmax through lse, `sum` through numerators and denominators,
everything else by adding. The backward runs the same steps with the merged out and lse (exact
FlashAttention-style partial gradients): dq stays local, dk, dv and key-side input gradients
travel back to their owner, and the gradients of replicated params are all-reduced.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
import torch.distributed as dist

from attndsl import ir
from attndsl.intervals import Interval, interval
from attndsl.runtime.kernel import Validator, check_names
from attndsl.symbolic import POSITIONS

from .linear_scan import Features, SumGrad, evaluate, linear_scan, raise_together, scan_features
from .module import Attention
from .ops import ENTRIES, FLOATS, Entry, _param, attention_backward_op, attention_op, spec_handle
from .ring_spec import RingSpec, ring_spec

LAYOUTS = ("contiguous", "zigzag")
_RINGS: dict[str, tuple[RingSpec, dict[str, str]]] = {}  # handle -> shard programs, handles
_SCANS: dict[str, Features | None] = {}  # handle -> the linear path's features, if evaluable


# ---- layouts ------------------------------------------------------------------------------------


def chunk_sizes(n: int, world_size: int, layout: str = "contiguous") -> list[list[int]]:
    """The default split of n positions: per rank, the lengths of its chunks in local order.
    contiguous: one chunk per rank, n // P each, the first n % P ranks one more; zigzag: 2P
    chunks sized the same way, rank r holding chunks r and 2P-1-r."""
    _check_layout(layout)
    parts = world_size if layout == "contiguous" else 2 * world_size
    if n < parts:
        raise ValueError(f"ring_attention: {n} positions cannot give each of the {parts} "
                         f"{'ranks' if layout == 'contiguous' else 'zigzag chunks'} one")
    sizes = [n // parts + (c < n % parts) for c in range(parts)]
    if layout == "contiguous":
        return [[s] for s in sizes]
    return [[sizes[r], sizes[parts - 1 - r]] for r in range(world_size)]


def chunk_bounds(n: int, world_size: int, layout: str = "contiguous"
                 ) -> list[list[tuple[int, int]]]:
    """Per rank, its chunks as global (start, stop), in local order."""
    sizes = chunk_sizes(n, world_size, layout)
    order = [(r, c) for r in range(world_size) for c in range(len(sizes[r]))]
    if layout == "zigzag":  # global order of chunks: rank 0's first, rank 1's first, ...
        order = [(r, 0) for r in range(world_size)] + [(r, 1) for r in
                                                       reversed(range(world_size))]
    bounds: list[list[tuple[int, int]]] = [[(0, 0)] * len(s) for s in sizes]
    start = 0
    for r, c in order:
        bounds[r][c] = (start, start + sizes[r][c])
        start += sizes[r][c]
    return bounds


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous",
          dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s shard of a whole-sequence tensor along `dim` (2 for q, k, v), as
    `ring_attention` expects it with the default split (`chunk_sizes`)."""
    bounds = chunk_bounds(x.shape[dim], world_size, layout)[rank]
    return torch.cat([x.narrow(dim, a, b - a) for a, b in bounds], dim=dim)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, got "
                         f"{layout!r}")


# ---- one call's plan ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Arg:
    """A param, input or index as the ring moves it: `side` is "replicated" (the same on every
    rank), "query" (this rank's positions, sliced per query chunk), "key" (travels with k and
    v) or "both" (an [n]-array: read as the query copy here and travelling as the key copy)."""

    name: str
    value: torch.Tensor
    side: str
    axis: int  # the sequence axis of a positional array
    is_float: bool


@dataclasses.dataclass
class _Plan:
    ring: RingSpec
    handles: dict[str, str]  # "step", "own", "unmasked" -> op handle
    group: Any
    rank: int
    world: int
    chunks: list[list[tuple[int, int]]]  # per rank, its chunks as global (start, stop)
    n: int
    args: list[_Arg]
    dv: int

    @property
    def next_peer(self) -> int:
        return _global(self.group, (self.rank + 1) % self.world)

    @property
    def prev_peer(self) -> int:
        return _global(self.group, (self.rank - 1) % self.world)

    def source(self, step: int) -> int:
        return (self.rank - step) % self.world

    def floats(self) -> list[_Arg]:
        return [a for a in self.args if a.is_float]


def _global(group: Any, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _ring_of(handle: str) -> tuple[RingSpec, dict[str, str]]:
    if handle not in _RINGS:
        ring = ring_spec(ENTRIES[handle].spec)
        cpu = ENTRIES[handle].cpu_target
        programs = {"step": ring.step, "own": ring.own, "unmasked": ring.unmasked}
        handles = {name: _register(program, cpu) for name, program in programs.items()
                   if program is not None}
        _RINGS[handle] = (ring, handles)
    return _RINGS[handle]


def _register(program: ir.Spec, cpu_target: str) -> str:
    """The op handle of a shard program, served on the CPU by the user's spec's target (the
    handle scheme of ops.spec_handle: name, digest of the checked spec, cpu target)."""
    digest = hashlib.sha256(repr(program).encode()).hexdigest()[:16]
    handle = f"{program.name}-{digest}-{cpu_target}"
    ENTRIES.setdefault(handle, Entry(program, cpu_target))
    return handle


def _side(ring: RingSpec, decl: ir.Param | ir.Index, value: torch.Tensor) -> tuple[str, int]:
    """How the ring moves an array (_Arg.side, "gather" for an index or input whose one
    sequence axis holds the whole sequence: gathered from the ranks' shards), and the axis of
    its shard's positions in `value` (-1: none)."""
    role = ring.roles[decl.name]
    shift = value.ndim - len(decl.dims)  # an index may omit its batch axis
    for side in ("query", "key", "both"):
        if side in role:
            return side, role.index(side) + shift
    if "whole" in role and not (isinstance(decl, ir.Param) and not decl.batched):
        return "gather", role.index("whole") + shift
    return "replicated", -1


def _arguments(ring: RingSpec, given: dict[str, Any], compute: torch.dtype,
               device: torch.device) -> tuple[list[_Arg], str | None]:
    """This rank's params, inputs and indices as the ring moves them, and what is wrong with
    them (None: nothing), for every rank to agree on before anything moves."""
    base, args = ring.base, []
    try:
        for p in base.params:
            value = _param(p.name, given[p.name], compute, device)
            args.append(_Arg(p.name, value, *_side(ring, p, value), True))
        for x in base.indices:
            value = torch.as_tensor(given[x.name])
            if value.dtype.is_floating_point or value.dtype == torch.bool:
                raise TypeError(f"{x.name}: expected an integer array, got {value.dtype}")
            value = value.to(device=device, dtype=torch.int64)
            args.append(_Arg(x.name, value, *_side(ring, x, value), False))
    except (TypeError, ValueError, RuntimeError) as e:
        return [], f"{type(e).__name__}: {e}"
    return args, None


def _whole(args: list[_Arg], chunks: list[list[tuple[int, int]]], rank: int, group: Any
           ) -> list[_Arg]:
    """`args` with each "gather" array replaced by the whole sequence, assembled from every
    rank's shard (an input keeps its gradient: _Gathered), and then replicated."""
    out = []
    for a in args:
        if a.side == "gather":
            whole = _Gathered.apply(a.value, a.axis, chunks, rank, group)
            a = dataclasses.replace(a, value=whole, side="replicated", axis=-1)
        out.append(a)
    return out


class _Gathered(torch.autograd.Function):
    """The whole sequence along `axis` from every rank's shard (chunks in global order); the
    backward hands this rank the rows of its own chunks from the whole array's gradient,
    which the ring has already summed over the ranks (a replicated array's gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, axis: int, chunks: list[list[tuple[int, int]]],
                rank: int, group: Any) -> torch.Tensor:
        lengths = [sum(b - a for a, b in c) for c in chunks]
        padded = torch.zeros(_resized(x, axis, max(lengths)), dtype=x.dtype, device=x.device)
        padded.narrow(axis, 0, x.shape[axis]).copy_(x)
        parts = [torch.empty_like(padded) for _ in chunks]
        dist.all_gather(parts, padded, group=group)
        whole = x.new_empty(_resized(x, axis, sum(lengths)))
        for part, rank_chunks in zip(parts, chunks):
            for s, (a, b) in zip(_local_slices(rank_chunks), rank_chunks):
                whole.narrow(axis, a, b - a).copy_(_narrow(part, axis, s))
        ctx.axis, ctx.own = axis, chunks[rank]
        return whole

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        mine = torch.cat([grad.narrow(ctx.axis, a, b - a) for a, b in ctx.own], dim=ctx.axis)
        return mine, None, None, None, None


def _key_rows(ring: RingSpec, k: torch.Tensor, args: list[_Arg], group: Any
              ) -> tuple[list[_Arg], str | None]:
    """The hoisted key-side row terms of this rank's keys (ring_spec's key rows), computed
    once here with autograd (their gradients come home with dk and flow into k and the
    params; a param's part is summed over the ranks), then travelling with k and v; and
    what went wrong computing them (None: nothing), for every rank to agree on."""
    if not ring.key_rows:
        return [], None
    values: dict[str, torch.Tensor] = {"k": k, "d": torch.tensor(k.shape[-1], dtype=k.dtype)}
    world = dist.get_world_size(group)
    for a in args:
        if a.side == "replicated" and a.is_float:
            needs_sum = world > 1 and a.value.requires_grad
            values[a.name] = SumGrad.apply(group, a.value) if needs_sum else a.value
    rows = []
    try:
        for name, term in ring.key_rows.items():
            value = evaluate(term, values)
            if term.type is not None and term.type.kind is not ir.Kind.VECTOR:
                value = value.squeeze(-1)
            rows.append(_Arg(name, value.expand(k.shape[:3] + value.shape[3:]), "key", 2, True))
    except (RuntimeError, ValueError, TypeError) as e:  # shapes: the others agree to raise
        return [], f"{type(e).__name__}: computing {ir.to_text(term)}: {e}"
    return rows, None


# ---- validation every rank agrees on, before any transfer ---------------------------------------


def _local_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: list[_Arg],
                   ring: RingSpec, total: int | None = None) -> str | None:
    """What is wrong with this rank's arguments (None: nothing): shapes and dtypes, checked
    by the step program's own Validator on zero-stride stand-ins (no data read, any device);
    `total`: the whole sequence's length, which every whole axis holds."""
    try:
        n = q.shape[2] if q.ndim == 4 else -1
        if not (k.ndim == v.ndim == 4 and k.shape[2] == n and v.shape[2] == n):
            raise ValueError(f"q, k, v: a rank holds the same positions of q, k and v, so "
                             f"q.shape[2] == k.shape[2] == v.shape[2]; got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        for a in args:
            if a.side != "replicated" and a.value.shape[a.axis] != n:
                raise ValueError(f"{a.name}: its sequence axis ({a.axis}) holds this rank's "
                                 f"{n} positions, got shape {tuple(a.value.shape)}")
        for a in args:
            role = ring.roles.get(a.name, ())
            shift = a.value.ndim - len(role)
            for axis in (x + shift for x, r in enumerate(role) if r == "whole"):
                if a.side != "gather" and a.value.shape[axis] != total:
                    raise ValueError(f"{a.name}: its axis {axis} holds the whole sequence on "
                                     f"every rank ({total} positions), got shape "
                                     f"{tuple(a.value.shape)}")
        extra = {}
        for a in args:  # a gathered array will hold the whole sequence
            stand_in = _stand_in(a.value) if a.side != "gather" else _stand_in(torch.empty(
                _resized(a.value, a.axis, total or 0), dtype=a.value.dtype, device="meta"))
            extra[a.name] = stand_in
            if a.name in ring.key_copies:
                extra[ring.key_copies[a.name]] = stand_in
        if ring.size_index is not None:
            extra[ring.size_index] = _stand_in(torch.ones(q.shape[0], dtype=torch.int64))
        Validator(ring.step)(*(_stand_in(t) for t in (q, k, v)), extra)
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _stand_in(t: torch.Tensor) -> Any:
    import numpy as np

    dtype = torch.empty((), dtype=t.dtype).numpy().dtype
    return np.broadcast_to(np.ones((), dtype), tuple(t.shape))


def _agree(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: list[_Arg], ring: RingSpec,
           layout: str, group: Any, problem: str | None = None) -> list[int]:
    """Every rank's length, once every rank's arguments passed: else every rank raises the
    same ValueError (one collective, so a bad rank never leaves the others waiting)."""
    world = dist.get_world_size(group)
    total = None  # the whole length, which whole axes must hold: known after one gather
    if any("whole" in role for role in ring.roles.values()):
        lengths: list[Any] = [None] * world
        dist.all_gather_object(lengths, int(q.shape[2]) if q.ndim == 4 else 0, group=group)
        total = sum(lengths)
    problem = problem or _local_problem(q, k, v, args, ring, total)
    mine = {"problem": problem, "n": int(q.shape[2]) if q.ndim == 4 else 0,
            "shape": (tuple(q.shape[:2]) + tuple(k.shape[1:2]) + (q.shape[-1], v.shape[-1]))
            if problem is None else None, "dtype": str(q.dtype)}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    bad = [(r, m["problem"]) for r, m in enumerate(everyone) if m["problem"] is not None]
    if bad:
        said = "; ".join(f"rank {r}: {p}" for r, p in bad)
        raise ValueError(f"ring_attention: bad arguments on {len(bad)} of {world} ranks ({said})")
    for what, meaning in (("shape", "(B, heads, kv_heads, d, dv)"), ("dtype", "q's dtype")):
        seen = [m[what] for m in everyone]
        if len(set(seen)) > 1:
            raise ValueError(f"ring_attention: ranks disagree on {meaning}: "
                             + ", ".join(f"rank {r} {x}" for r, x in enumerate(seen)))
    lengths = [m["n"] for m in everyone]
    if layout == "zigzag":
        want = [sum(s) for s in chunk_sizes(sum(lengths), world, layout)]
        if lengths != want:
            raise ValueError(f"ring_attention: layout 'zigzag' needs the split of "
                             f"chunk_sizes({sum(lengths)}, {world}, 'zigzag'): rank lengths "
                             f"{want}, got {lengths} (attndsl.torch.distributed.shard makes it)")
    return lengths


def _chunks(lengths: list[int], layout: str) -> list[list[tuple[int, int]]]:
    if layout == "zigzag":
        return chunk_bounds(sum(lengths), len(lengths), layout)
    starts = [sum(lengths[:r]) for r in range(len(lengths))]
    return [[(s, s + n)] for s, n in zip(starts, lengths)]


# ---- transport ----------------------------------------------------------------------------------


class _Transfer:
    """One ring hop of a list of tensors: send ours to the next rank, receive the previous
    rank's into fresh buffers shaped by `shapes` (posted at once, waited on by `wait`)."""

    def __init__(self, plan: _Plan, tensors: list[torch.Tensor],
                 shapes: list[tuple[int, ...]]) -> None:
        self.received = [torch.empty(s, dtype=t.dtype, device=t.device)
                         for t, s in zip(tensors, shapes)]
        ops = [dist.P2POp(dist.isend, t.contiguous(), plan.next_peer, plan.group)
               for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, plan.prev_peer, plan.group) for r in self.received]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for request in self.requests:
            request.wait()
        return self.received


def _resized(t: torch.Tensor, axis: int, n: int) -> tuple[int, ...]:
    shape = list(t.shape)
    shape[axis] = n
    return tuple(shape)


# ---- the steps ----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Keys:
    """A visiting key shard: k, v and the key-side arrays of rank `owner`."""

    owner: int
    tensors: list[torch.Tensor]  # k, v, then the key-side args in plan order
    names: list[str]  # "k", "v", then the names the shard program reads them by
    axes: list[int]


def _own_keys(plan: _Plan, k: torch.Tensor, v: torch.Tensor) -> _Keys:
    tensors, names, axes = [k, v], ["k", "v"], [2, 2]
    for a in plan.args:
        if a.side in ("key", "both"):
            tensors.append(a.value)
            names.append(plan.ring.key_copies.get(a.name, a.name))
            axes.append(a.axis)
    return _Keys(plan.rank, tensors, names, axes)


def _next_keys(plan: _Plan, keys: _Keys) -> tuple[_Transfer, int]:
    owner = (keys.owner - 1) % plan.world
    return _Transfer(plan, keys.tensors, _shapes(plan, keys.tensors, keys.axes, owner)), owner


def _shapes(plan: _Plan, tensors: list[torch.Tensor], axes: list[int], owner: int
            ) -> list[tuple[int, ...]]:
    """The shapes of `tensors` (sequence along `axes`) for rank `owner`'s shard."""
    n = sum(b - a for a, b in plan.chunks[owner])
    return [_resized(t, axis, n) for t, axis in zip(tensors, axes)]


def _pairs(plan: _Plan, owner: int, keys: _Keys | None = None) -> list[tuple[int, int, str]]:
    """(local query chunk, key chunk of `owner`, program) for one step. A pair the mask hides
    entirely is left out (causal: the shards after ours; document ids: a shard whose ids
    cannot meet ours, bounded from the least and greatest id each side holds, with the key
    side's ids read from the visiting `keys`), unless it counts the sink; a causal linear spec
    runs fully visible pairs unmasked (its prefix-sum kernel needs q_offset == k_offset,
    which only a chunk against itself has)."""
    ring, pairs = plan.ring, []
    for a, (q0, q1) in enumerate(plan.chunks[plan.rank]):
        for c, (k0, k1) in enumerate(plan.chunks[owner]):
            program = "own" if (owner == plan.rank and a == c) else "step"
            seen = ring.visible(q0, q1, k0, k1, _lookup_bounds(plan, a, keys, c))
            if seen == "none" and (program == "step" or ring.own is ring.step):
                continue
            if ring.causal_linear and k0 != q0:
                assert seen == "all", (q0, q1, k0, k1)
                program = "unmasked"
            pairs.append((a, c, program))
    return pairs


def _lookup_bounds(plan: _Plan, a: int, keys: _Keys | None, c: int) -> dict[Any, Interval]:
    """For each lookup the mask reads, an interval holding every value it reads for query
    chunk a against key chunk c: a positional array read at i (or j) by the chunk's own
    rows, a replicated one by all of its values. Lookups left out are unknown."""
    i, j = POSITIONS["i"], POSITIONS["j"]
    by_name = {arg.name: arg for arg in plan.args}
    visiting = {} if keys is None else dict(zip(keys.names, zip(keys.tensors, keys.axes)))
    known: dict[Any, Interval] = {}
    for symbol, (array, subscripts) in plan.ring.lookups.items():
        value: torch.Tensor | None = None
        if array == plan.ring.size_index:
            value = torch.tensor(plan.n)
        elif keys is not None and array in visiting:  # a key-side array: this step's chunk c
            t, axis = visiting[array]
            if _read_at(subscripts, j):
                value = _narrow(t, axis, _local_slices(plan.chunks[keys.owner])[c])
        elif array in by_name:
            arg = by_name[array]
            if arg.side == "replicated":
                value = arg.value
            elif arg.side in ("query", "both") and _read_at(subscripts, i):
                value = _narrow(arg.value, arg.axis, _local_slices(plan.chunks[plan.rank])[a])
        if value is not None and value.numel():
            span = interval(value.min().item(), value.max().item())
            if span is not None:
                known[symbol] = span
    return known


def _read_at(subscripts: tuple[Any, ...], position: Any) -> bool:
    """The subscripts read the sequence axis at exactly `position` (i or j) and no other
    axis at a position (a head h or a constant may index the others)."""
    i, j = POSITIONS["i"], POSITIONS["j"]
    return position in subscripts and all(
        s == position or not ({i, j} & s.free_symbols) for s in subscripts)


def _local_slices(chunks: list[tuple[int, int]]) -> list[slice]:
    start, out = 0, []
    for a, b in chunks:
        out.append(slice(start, start + b - a))
        start += b - a
    return out


def _narrow(t: torch.Tensor, axis: int, s: slice) -> torch.Tensor:
    return t.narrow(axis, s.start, s.stop - s.start)


def _pair_args(plan: _Plan, program: str, a: int, keys: _Keys, c: int, ones: bool,
               q: torch.Tensor) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
    """The op's (q, k, v, params, indices, q_offset, k_offset) for query chunk a against key
    chunk c of the visiting shard."""
    qs = _local_slices(plan.chunks[plan.rank])[a]
    ks = _local_slices(plan.chunks[keys.owner])[c]
    values: dict[str, torch.Tensor] = {}
    for arg in plan.args:
        if arg.side == "replicated":
            values[arg.name] = arg.value
        elif arg.side in ("query", "both"):
            values[arg.name] = _narrow(arg.value, arg.axis, qs)
    for name, t, axis in zip(keys.names, keys.tensors, keys.axes):
        values[name] = _narrow(t, axis, ks)
    if plan.ring.size_index is not None:
        values[plan.ring.size_index] = torch.full((q.shape[0],), plan.n, dtype=torch.int64)
    spec = ENTRIES[plan.handles[program]].spec
    k_c, v_c = values.pop("k"), values.pop("v")
    if ones:  # `sum` runs as `none` on [v, 1]: the last column is the row's denominator
        v_c = torch.cat([v_c, v_c.new_ones(v_c.shape[:3] + (1,))], dim=3)
    params = [values[p.name] for p in spec.params]
    indices = [_host(values[x.name]) for x in spec.indices]
    offsets = (torch.tensor(plan.chunks[plan.rank][a][0]),
               torch.tensor(plan.chunks[keys.owner][c][0]))
    return [_narrow(q, 2, qs).contiguous(), k_c.contiguous(), v_c.contiguous(),
            [p.contiguous() for p in params], indices], *offsets


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if not t.is_cuda else t.cpu()  # index arrays are read on the host


def _ring_steps(plan: _Plan, k: torch.Tensor, v: torch.Tensor, visit: Any) -> _Keys:
    """Run `visit(keys)` on every key shard as it comes by, the next hop already posted."""
    keys = _own_keys(plan, k, v)
    for step in range(plan.world):
        hop = _next_keys(plan, keys) if step < plan.world - 1 else None
        visit(keys)
        if hop is not None:
            transfer, owner = hop
            keys = _Keys(owner, transfer.wait(), keys.names, keys.axes)
    return keys


def _guarded(failed: list[Exception]) -> Any:
    """A step's compute that, once one raised, is skipped: the ring keeps moving (no rank
    is left waiting on a hop) and `_raise_together` reports the error on every rank."""

    def wrap(compute: Any) -> Any:
        def run(*args: Any) -> None:
            if failed:
                return
            try:
                compute(*args)
            except (ValueError, TypeError, IndexError, ArithmeticError, RuntimeError) as e:
                failed.append(e)  # re-raised on every rank by _raise_together

        return run

    return wrap


def _raise_together(plan: _Plan, failed: list[Exception]) -> None:
    """After the ring: every rank raises if any rank's kernels raised (one all_gather)."""
    raise_together(plan.group, failed, "a step")


# ---- forward: partial results merged by the normalizer -----------------------------------------


def _forward(plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, lse, z): lse for softmax (else empty), z the `sum` denominators (else None)."""
    merge = plan.ring.merge
    B, H, n = q.shape[:3]
    width = plan.dv + (merge == "ratio")
    acc = q.new_zeros((B, H, n, width))
    lse = q.new_full((B, H, n), float("-inf")) if merge == "lse" else None
    slices = _local_slices(plan.chunks[plan.rank])
    failed: list[Exception] = []

    @_guarded(failed)
    def visit(keys: _Keys) -> None:
        nonlocal lse
        for a, c, program in _pairs(plan, keys.owner, keys):
            tensors, q_off, k_off = _pair_args(plan, program, a, keys, c, merge == "ratio", q)
            out_s, lse_s = attention_op(plan.handles[program], *tensors, q_off, k_off)
            rows = slices[a]
            if merge == "lse":
                assert lse is not None
                lse[:, :, rows], acc[:, :, rows] = _merge_lse(lse[:, :, rows], acc[:, :, rows],
                                                              lse_s, out_s)
            else:
                acc[:, :, rows] += out_s

    _ring_steps(plan, k, v, visit)
    _raise_together(plan, failed)
    if merge == "ratio":
        z = acc[..., -1]
        out = torch.where(z[..., None] != 0, acc[..., :-1] / torch.where(z == 0, 1, z)[..., None],
                          0.0)
        return out, q.new_empty((0,)), z
    return acc, (lse if lse is not None else q.new_empty((0,))), None


def _merge_lse(lse: torch.Tensor, out: torch.Tensor, lse_s: torch.Tensor, out_s: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmax partials of the same rows as one: weights exp(lse_x - lse) <= 1, never the
    exp of a large number; a row empty in both stays lse = -inf, out = 0 (no NaN)."""
    new = torch.logaddexp(lse, lse_s)
    empty = new == float("-inf")
    safe = torch.where(empty, 0.0, new)
    w, w_s = torch.exp(lse - safe), torch.exp(lse_s - safe)
    merged = out * w[..., None] + out_s * w_s[..., None]
    return new, torch.where(empty[..., None], 0.0, merged)


# ---- backward: the same steps with the merged rows ----------------------------------------------


def _backward(plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, z: torch.Tensor | None, dout: torch.Tensor,
              dlse: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    merge = plan.ring.merge
    slices = _local_slices(plan.chunks[plan.rank])
    row_out, row_dout = (out, dout) if z is None else _ratio_adjoint(out, dout, z)
    dq = torch.zeros_like(q)
    grads = {a.name: torch.zeros_like(a.value) for a in plan.floats()
             if a.side in ("replicated", "query", "both")}
    key_floats = [0, 1] + [i + 2 for i, a in enumerate(
        x for x in plan.args if x.side in ("key", "both")) if a.is_float]
    pending: _Transfer | None = None  # the next shard's gradient from the ranks before us
    home: list[torch.Tensor] = []  # one rank: its keys' gradient, never sent
    failed: list[Exception] = []

    def visit(keys: _Keys) -> None:
        nonlocal pending
        part = [torch.zeros_like(keys.tensors[i]) for i in key_floats]
        names = [keys.names[i] for i in key_floats]
        _guarded(failed)(contributions)(keys, part, names)
        if pending is not None:  # the running sum from the ranks before, ours added in place
            received = pending.wait()
            for t, p in zip(received, part):
                t.add_(p)
            part = received
        if plan.world == 1:
            home.extend(part)
            return
        axes = [keys.axes[i] for i in key_floats]
        pending = _Transfer(plan, part, _shapes(plan, part, axes, (keys.owner - 1) % plan.world))

    def contributions(keys: _Keys, part: list[torch.Tensor], names: list[str]) -> None:
        kslices = _local_slices(plan.chunks[keys.owner])
        for a, c, program in _pairs(plan, keys.owner, keys):
            tensors, q_off, k_off = _pair_args(plan, program, a, keys, c, merge == "ratio", q)
            rows = slices[a]
            given_dlse = dlse[:, :, rows].contiguous() if dlse is not None else None
            dq_s, dk_s, dv_s, dparams = attention_backward_op(
                plan.handles[program], *tensors, q_off, k_off,
                row_out[:, :, rows].contiguous(),
                lse[:, :, rows].contiguous() if merge == "lse" else lse,
                row_dout[:, :, rows].contiguous(), given_dlse)
            dq[:, :, rows] += dq_s
            _narrow(part[0], 2, kslices[c]).add_(dk_s)
            _narrow(part[1], 2, kslices[c]).add_(dv_s[..., :plan.dv])
            spec = ENTRIES[plan.handles[program]].spec
            by_name = dict(zip((p.name for p in spec.params), dparams))
            for i, name in enumerate(names[2:], start=2):
                axis = keys.axes[key_floats[i]]
                _narrow(part[i], axis, kslices[c]).add_(by_name[name])
            for arg in plan.floats():
                if arg.side == "replicated":
                    grads[arg.name] += by_name[arg.name]
                elif arg.side in ("query", "both"):
                    _narrow(grads[arg.name], arg.axis, rows).add_(by_name[arg.name])

    _ring_steps(plan, k, v, visit)
    # after the last hop, our own keys' gradient comes home
    own = home if pending is None else pending.wait()
    _raise_together(plan, failed)
    _sum_over_ranks(plan, grads, [a.name for a in plan.floats() if a.side == "replicated"])
    return (dq, own[0], own[1], *_float_grads(plan, grads, own[2:]))


def _ratio_adjoint(out: torch.Tensor, dout: torch.Tensor, z: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, dout) for the `none` program of a `sum` spec: the adjoint of [N, Z] through
    out = N / Z is [dout / Z, -rowsum(dout * out) / Z] (0 where Z = 0, as out is)."""
    inv = torch.where(z == 0, 0.0, 1 / torch.where(z == 0, 1, z))[..., None]
    row_dout = torch.cat([dout * inv, -(dout * out).sum(-1, keepdim=True) * inv], dim=3)
    return torch.zeros_like(row_dout), row_dout  # `none` reads no out


def _sum_over_ranks(plan: _Plan, grads: dict[str, torch.Tensor], names: list[str]) -> None:
    """Replace each named gradient by its sum over the ranks: one all_reduce for all."""
    if not names or plan.world == 1:
        return
    flat = torch.cat([grads[n].reshape(-1) for n in names])
    dist.all_reduce(flat, group=plan.group)
    start = 0
    for n in names:
        size = grads[n].numel()
        grads[n] = flat[start:start + size].view_as(grads[n])
        start += size


def _float_grads(plan: _Plan, grads: dict[str, torch.Tensor], key_side: list[torch.Tensor]
                 ) -> list[torch.Tensor]:
    """Each float param's and input's gradient, in plan order: an [n] input's is its query
    part plus its key part brought home."""
    copies = [plan.ring.key_copies.get(a.name, a.name) for a in plan.args
              if a.side in ("key", "both") and a.is_float]
    came_home = dict(zip(copies, key_side))
    result = []
    for a in plan.floats():
        copy = plan.ring.key_copies.get(a.name, a.name)
        if a.side == "key":
            result.append(came_home[copy])
        elif a.side == "both":
            result.append(grads[a.name] + came_home[copy])
        else:
            result.append(grads[a.name])
    return result


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                *floats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse, z = _forward(plan, q, k, v)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, *(() if z is None else (z,)))
        if plan.ring.merge != "lse":
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None
                 ) -> tuple[Any, ...]:
        plan = ctx.plan
        q, k, v, out, lse, *rest = ctx.saved_tensors
        z = rest[0] if rest else None
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        if plan.ring.merge != "lse":
            dlse = None
        grads = _backward(plan, q, k, v, out, lse, z, dout, dlse)
        return (None, *grads)


# ---- the API ------------------------------------------------------------------------------------


def ring_attention(spec: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   group: Any = None, layout: str = "contiguous", return_lse: bool = False,
                   **params_and_indices: Any) -> Any:
    """Attention of `spec` over a sequence sharded across the ranks of `group` (default: the
    world): this rank's q [B, heads, n_r, d], k, v [B, kv_heads, n_r, d / dv], and its shard of
    every per-position index array and input; params are the same on every rank. Returns this
    rank's rows of out (and lse with `return_lse=True`; None for normalizers other than
    softmax), equal to `attndsl.torch.attention` on the whole sequence. Differentiable; every
    rank must call it (and its backward) together. docs/distributed.md."""
    return _apply(spec_handle(spec), q, k, v, group=group, layout=layout,
                  return_lse=return_lse, **params_and_indices)


def _apply(handle: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any,
           layout: str, return_lse: bool, **params_and_indices: Any) -> Any:
    _check_layout(layout)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (docs/distributed.md)")
    ring, handles = _ring_of(handle)
    base = ring.base
    check_names([p.name for p in base.params] + [x.name for x in base.indices],
                params_and_indices)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a float torch.Tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    compute = q.dtype if q.dtype in FLOATS else torch.float32
    q_, k_, v_ = (t.to(compute).contiguous() for t in (q, k, v))
    args, problem = _arguments(ring, params_and_indices, compute, q.device)
    rows, problem = ([], problem) if problem else _key_rows(ring, k_, args, group)
    lengths = _agree(q_, k_, v_, args + rows, ring, layout, group, problem)
    chunks, rank = _chunks(lengths, layout), dist.get_rank(group)
    args = _whole(args, chunks, rank, group)
    if handle not in _SCANS:
        _SCANS[handle] = scan_features(base)
    features = _SCANS[handle]
    if features is not None:  # linear attention: prefix states, no ring
        out = linear_scan(base, features, handles["step"], q_, k_, v_,
                          {a.name: a.value for a in args}, chunks, rank, group).to(q.dtype)
        return (out, None) if return_lse else out
    plan = _Plan(ring, handles, group, rank, dist.get_world_size(group), chunks, sum(lengths),
                 args + rows, v_.shape[3])
    out, lse = _Ring.apply(plan, q_, k_, v_, *(a.value for a in plan.floats()))
    out = out.to(q.dtype)
    if not return_lse:
        return out
    return out, (lse if ring.merge == "lse" else None)


class RingAttention(Attention):
    """`RingAttention(spec, group=None, layout="contiguous", **sizes_and_initial_params)`: the
    `Attention` module (it owns the spec's params) whose forward is `ring_attention` over
    `group`. Keep its params equal on every rank (same seed or a broadcast): their gradients
    are all-reduced, so every rank's optimizer step stays the same."""

    def __init__(self, spec: Any, *, group: Any = None, layout: str = "contiguous",
                 **sizes_and_params: Any) -> None:
        super().__init__(spec, **sizes_and_params)
        _check_layout(layout)
        self.group, self.layout = group, layout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                return_lse: bool = False, **inputs_and_indices: Any) -> Any:
        return _apply(self.handle, q, k, v, group=self.group, layout=self.layout,
                      return_lse=return_lse, **self.arguments(inputs_and_indices))
