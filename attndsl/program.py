"""The pair program: what the fused kernels compute for one pair, in order, for every backend.

Forward, per pair of a tile the mask leaves open (plan.MaskAtom decides the tiles):

  Allow       the mask: a pair it rejects is never evaluated further (its NaNs stay out)
  Reduce      each pair reduction r = sum_f body, in node order: a GEMM A . B (a backend may
              compute a whole tile of it at once) or an explicit loop over the features
  Logit       x, over the reductions, row scalars, lookups and positions
  Accumulate  the normalizer strategy's part: the weight ACC (acc += ACC * v_j), the running
              state's update and, for an online softmax, the rescale (normalizers.py)

Then once per row the strategy's finish (out = SCALE * acc, the saved lse or z).

Backward, per allowed pair: what one pair adds to which adjoint.

Given dS (d loss / d logit of the pair, the normalizer strategy's `dscore`), the chain rule
through the logit reaches every pair-kernel node the logit reads. Every backend prints these
steps in this order; the backends differ only in where an adjoint lives (cpu: tile buffers for
the GEMMs, per-row locals, the task's copy; cuda: registers of the thread owning the row) and in
which kernel adds it (cuda: key-side adjoints in attn_bwd_dkdv, the others in attn_bwd_dq).

  Gather   ga_<node> = dS * d logit / d node (or 0) for a node that loop bodies read: the loops
           below add to it, so it is complete only after them
  Loop     for each explicit pair loop, readers before what they read (reverse node order):
           g = its adjoint; per feature f, every input the body reads += g * d body / d input
  Gemm     the adjoint of a GEMM pair reduction A . B (dA += g B, dB += g A)
  Add      every other node with an adjoint (row scalars, param lookups) += its adjoint

An adjoint is `Source`: dS * partial, or the gathered local when loops read the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from . import normalizers
from .normalizers import Normalizer
from .plan import KernelPlan
from .symbolic import Node, Reduction


@dataclass(frozen=True)
class Allow:
    mask: sp.Basic


@dataclass(frozen=True)
class Reduce:
    reduction: Reduction

    @property
    def gemm(self) -> bool:
        return self.reduction.gemm is not None


@dataclass(frozen=True)
class Logit:
    value: sp.Expr


@dataclass(frozen=True)
class Accumulate:
    norm: Normalizer


ForwardStep = Allow | Reduce | Logit | Accumulate


def forward_steps(plan: KernelPlan) -> list[ForwardStep]:
    """The per-pair forward of `plan`, in the order every backend evaluates it."""
    steps: list[ForwardStep] = []
    if plan.deriv.mask is not None:
        steps.append(Allow(plan.deriv.mask))
    steps += [Reduce(r) for r in plan.gemms + plan.loops]
    steps.append(Logit(plan.deriv.logit))
    steps.append(Accumulate(normalizers.of(plan.deriv)))
    return steps


@dataclass(frozen=True)
class Source:
    """A node's adjoint at one pair: dS * `partial` (None: 0), or its gathered local."""

    node: Node
    partial: sp.Expr | None
    gathered: bool


@dataclass(frozen=True)
class Gather:
    source: Source  # the local's start: dS * partial, or 0


@dataclass(frozen=True)
class Loop:
    loop: Reduction
    source: Source  # g, the loop's adjoint
    reads: tuple[tuple[sp.Symbol, sp.Expr], ...]  # (input, d body_f / d input) per feature


@dataclass(frozen=True)
class Gemm:
    gemm: Reduction
    source: Source


@dataclass(frozen=True)
class Add:
    source: Source  # added to the adjoint of source.node


Step = Gather | Loop | Gemm | Add


def backward_steps(plan: KernelPlan) -> list[Step]:
    """The per-pair backward of `plan`, in the order every backend prints it."""
    grads, deriv = plan.grads, plan.deriv

    def source(symbol: sp.Symbol) -> Source:
        return Source(deriv.node(symbol), grads.dlogit.get(symbol),  # type: ignore[arg-type]
                      gathered=symbol in plan.nested)

    def has_adjoint(symbol: sp.Symbol) -> bool:
        return symbol in grads.dlogit or symbol in plan.nested

    steps: list[Step] = [Gather(Source(deriv.node(s), grads.dlogit.get(s), False))  # type: ignore[arg-type]
                         for s in plan.nested]
    reductions = {r.symbol for r in plan.loops + plan.gemms}
    for r in reversed(plan.loops):
        if has_adjoint(r.symbol):
            steps.append(Loop(r, source(r.symbol), tuple(grads.partials.get(r.name, []))))
    for r in plan.gemms:
        if has_adjoint(r.symbol):
            steps.append(Gemm(r, source(r.symbol)))
    for symbol in grads.dlogit:
        if symbol not in reductions:
            steps.append(Add(source(symbol)))
    for symbol in plan.nested:  # read only inside loop bodies: no direct term in the logit
        if symbol not in reductions and symbol not in grads.dlogit:
            steps.append(Add(source(symbol)))
    return steps
