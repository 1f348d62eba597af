"""Linear attention across ranks without a ring: an exclusive scan of prefix states.

A spec on the linear path (plan.linear: logit = phi(q) . psi(k), normalize sum or none, no mask
or a causal one) needs no key shard to travel. Each chunk of keys folds into a state
S = sum_j psi(k_j) [v_j, 1]^T of F x (dv + 1) per key/value head; the states of all chunks are
gathered (one all_gather of P x chunks x B x kv_heads x F x (dv + 1) numbers), and a query chunk
adds phi(q_i)^T (the states of the chunks before it) to its own causal part, which the spec's
kernel computes at the chunk's offset (q_offset == k_offset, as the prefix-sum kernel needs).
Without a mask every chunk's state counts and no kernel runs.

phi and psi are evaluated here with torch operations from the spec's checked vector
expressions (q, k, params, numbers, arithmetic, `@`, and the functions below); a spec whose
features use anything else runs on the ring instead (`scan_features` returns None).
Gradients flow through torch's autograd: the gather's backward sums each state's gradient
over the ranks and returns it to the rank that owns it, and params' gradients are all-reduced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from attndsl import ir
from attndsl.ir import NormKind, Side
from attndsl.plan import make_plan

# the spec's functions as torch computes them (LANGUAGE.md 3: softplus without a threshold)
FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "abs": torch.abs, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu,
    "softplus": lambda x: torch.logaddexp(x, torch.zeros_like(x)), "elu": F.elu,
    "gelu": lambda x: F.gelu(x, approximate="none"), "sin": torch.sin, "cos": torch.cos,
}
# what ring attention's key rows (ring_spec.ROW_FUNCTIONS) use besides FUNCTIONS; reductions
# over the feature axis keep it, as size 1
ROW_ONLY: dict[str, Callable[..., torch.Tensor]] = {
    "dot": lambda u, w: (u * w).sum(-1, keepdim=True),
    "sum": lambda u: u.sum(-1, keepdim=True),
    "norm": lambda u: (u * u).sum(-1, keepdim=True).sqrt(),
    "min": torch.minimum, "max": torch.maximum,
}
ARITH = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div, "^": torch.pow}

Features = tuple[ir.Expr, ir.Expr]  # (phi over q, psi over k)


def scan_features(spec: ir.Spec) -> Features | None:
    """(phi, psi) of a linear-path spec whose features this module evaluates, else None."""
    plan = make_plan(spec)
    if plan.linear is None or spec.indices or any(p.batched for p in spec.params):
        return None
    if spec.scale is not None or spec.bias is not None or spec.softcap is not None:
        return None
    score = spec.score
    if isinstance(score, ir.Call) and score.func == "dot":
        pair = score.args
    elif isinstance(score, ir.Binary) and score.op == ".":
        pair = (score.left, score.right)
    else:
        return None
    sides = [e.type.side if e.type is not None else None for e in pair]
    if sides == [Side.KEY, Side.QUERY]:
        pair = pair[::-1]
    elif sides != [Side.QUERY, Side.KEY]:
        return None
    params = {p.name for p in spec.params}
    if not all(_supported(e, params) for e in pair):
        return None
    return pair[0], pair[1]


def _supported(e: ir.Expr, params: set[str]) -> bool:
    ok = (isinstance(e, ir.Num) or (isinstance(e, ir.Name) and e.name in ("q", "k", *params))
          or (isinstance(e, ir.Unary) and e.op == "-")
          or (isinstance(e, ir.Binary) and (e.op in ARITH or e.op == "@"))
          or (isinstance(e, ir.Call) and e.func in FUNCTIONS))
    return ok and all(_supported(c, params) for c in ir.children(e))


def evaluate(e: ir.Expr, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """A checked expression over the last axis, with torch operations: a vector keeps its
    feature axis, a scalar reduced from vectors keeps it as size 1 (so it broadcasts against
    them); `values` holds q or k, the params, and optionally "d"."""
    if isinstance(e, ir.Num):
        like = values.get("q", values.get("k"))
        assert like is not None
        return torch.tensor(float(e.text), dtype=like.dtype, device=like.device)
    if isinstance(e, ir.Name):
        return values[e.name]
    if isinstance(e, ir.Unary):
        return -evaluate(e.operand, values)
    if isinstance(e, ir.Binary):
        left, right = evaluate(e.left, values), evaluate(e.right, values)
        if e.op == ".":
            return ROW_ONLY["dot"](left, right)
        return left @ right if e.op == "@" else ARITH[e.op](left, right)
    assert isinstance(e, ir.Call)
    args = [evaluate(a, values) for a in e.args]
    return (ROW_ONLY.get(e.func) or FUNCTIONS[e.func])(*args)


class _Gather(torch.autograd.Function):
    """all_gather of one tensor per rank, stacked; the backward sums the gradient over the
    ranks (all_reduce) and keeps this rank's part."""

    @staticmethod
    def forward(ctx: Any, group: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.group, ctx.rank = group, dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad[ctx.rank]


class SumGrad(torch.autograd.Function):
    """The identity on a replicated param whose gradient is summed over the ranks."""

    @staticmethod
    def forward(ctx: Any, group: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad


def linear_scan(spec: ir.Spec, features: Features, step_handle: str, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, params: dict[str, torch.Tensor],
                chunks: list[list[tuple[int, int]]], rank: int, group: Any) -> torch.Tensor:
    """This rank's rows of out (docstring above); `chunks` per rank as global (start, stop)."""
    from .ops import apply

    if dist.get_world_size(group) > 1:
        params = {n: SumGrad.apply(group, p) if p.requires_grad else p
                  for n, p in params.items()}
    ratio = spec.normalize.kind is NormKind.SUM
    causal = spec.mask is not None
    heads, kv_heads = q.shape[1], k.shape[1]
    phi = evaluate(features[0], {"q": q, **params})
    psi = evaluate(features[1], {"q": q, "k": k, **params})
    values = torch.cat([v, v.new_ones(v.shape[:3] + (1,))], dim=3) if ratio else v
    mine, starts = _local(chunks[rank]), [a for a, _ in chunks[rank]]
    states = torch.stack([torch.einsum("bgnf,bgne->bgfe", psi[:, :, s], values[:, :, s])
                          for s in mine])
    gathered = _Gather.apply(group, states)  # [P, chunks, B, kv_heads, F, width]
    by_start = sorted((a, gathered[r, c]) for r, rank_chunks in enumerate(chunks)
                      for c, (a, _) in enumerate(rank_chunks))
    outs, failed = [], []  # type: list[torch.Tensor], list[Exception]
    for start, rows in zip(starts, mine):
        before = [s for a, s in by_start if not causal or a < start]
        acc = _at_heads(phi[:, :, rows], sum(before[1:], before[0]) if before else None,
                        heads, kv_heads, values.shape[3])
        if causal and not failed:  # the chunk against its own keys: the prefix-sum kernel
            try:
                acc = acc + apply(step_handle, q[:, :, rows], k[:, :, rows],
                                  values[:, :, rows], q_offset=start, k_offset=start, **params)
            except (ValueError, TypeError, IndexError, ArithmeticError, RuntimeError) as e:
                failed.append(e)  # raised on every rank below, so none waits in a backward
        outs.append(acc)
    raise_together(group, failed, "the linear scan's kernel")
    # every rank's graph reads the gather (an empty sum, exactly 0 and never NaN), so every
    # rank runs its backward's all_reduce, also the first rank of a causal scan
    acc = torch.cat(outs, dim=2) + gathered.narrow(-1, 0, 0).sum()
    if not ratio:
        return acc
    z = acc[..., -1:]
    return torch.where(z != 0, acc[..., :-1] / torch.where(z == 0, 1, z), 0.0)


def raise_together(group: Any, failed: list[Exception], what: str) -> None:
    """Every rank raises if any rank's `failed` holds an error (one all_gather_object): an
    error on some ranks never leaves the others waiting in a later collective."""
    mine = f"{type(failed[0]).__name__}: {failed[0]}" if failed else None
    world = dist.get_world_size(group)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    bad = [(r, said) for r, said in enumerate(everyone) if said is not None]
    if bad:
        said = "; ".join(f"rank {r}: {m}" for r, m in bad)
        raise ValueError(f"ring_attention: {what} failed on {len(bad)} of {world} ranks "
                         f"({said})") from (failed[0] if failed else None)


def _local(chunks: list[tuple[int, int]]) -> list[slice]:
    start, out = 0, []
    for a, b in chunks:
        out.append(slice(start, start + b - a))
        start += b - a
    return out


def _at_heads(phi: torch.Tensor, state: torch.Tensor | None, heads: int, kv_heads: int,
              width: int) -> torch.Tensor:
    """phi [B, heads, n, F] against the summed state [B, kv_heads, F, width] of its group."""
    if state is None:
        return phi.new_zeros(phi.shape[:3] + (width,))
    state = state.repeat_interleave(heads // kv_heads, dim=1)
    return torch.einsum("bhnf,bhfe->bhne", phi, state)
