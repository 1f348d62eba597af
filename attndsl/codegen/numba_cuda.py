"""KernelPlan -> Numba CUDA (`@cuda.jit`) forward and backward kernels, and their launcher.

The split is the CPU target's (docs/cuda.md):

  host prologue   the generated NumPy `rows` (hoisted per-row terms, O(n d)); skipped when the
                  pair kernel reads only q and k themselves (then device arrays never leave)
  attn_fwd        grid (query tiles, heads, B), one thread per query row; key-side inputs and V
                  staged in shared memory per key tile; online softmax (or the `sum` state,
                  or an element-wise normalizer) in registers; lse (or the row sum z) saved
  attn_bwd_preprocess   D = rowsum(dO * O)   (softmax, and `sum`: rowsum(P * dP) = rowsum(dO * O))
  attn_bwd_dkdv   grid (key tiles, kv_heads, B), one thread per key row, looping over the query
                  heads of its group: dV, dK and the adjoints of key-side inputs, no atomics
  attn_bwd_dq     grid (query tiles, heads, B): adjoints of query-side inputs, per-row partials
                  of constant inputs and of in-kernel param lookups, per-block partials of
                  lookups whose subscripts depend on both i and j (owner-computes, no atomics)
  host epilogue   the generated NumPy `rows_backward`, deterministic host sums of the partials

Sizes that shape local/shared arrays (tiles, feature sizes) are module constants of the
generated file; one file per configuration, cached on disk like every target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from .. import ir, normalizers, program
from ..ir import NormKind, Side
from ..plan import (
    TILE,
    KernelPlan,
    PairInput,
    corner_status_text,
    make_plan,
    scan_status_text,
    tile_status_text,
)
from ..symbolic import OFFSETS, POSITIONS, SIZES, Lookup, Reduction, S, Vec, local_subscripts
from . import numpy_ref
from .cuda_printer import CudaPrinter
from .source import SourceWriter

PRODUCTION_TILES = (64, 64, 32, 32)  # forward BQ, BK; backward BQ, BK (48 KiB smem, no spills)
DEFAULT_FEATURES = 64  # feature sizes assumed by emit_source / ptx() when none are given


# ---- what the kernels read and write ------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """A row-level value the pair kernels read: q, k, or a hoisted node from `rows`."""

    item: PairInput
    var: str  # the reference's variable name (q_rows, proj2, r3)

    @property
    def node(self) -> Vec | Reduction:
        return self.item.node

    @property
    def side(self) -> Side:
        return self.item.side

    @property
    def raw(self) -> str | None:
        return "q" if self.item.is_raw_query else "k" if self.item.is_raw_key else None

    @property
    def vector(self) -> bool:
        return isinstance(self.node, Vec)

    @property
    def arg(self) -> str:
        return self.raw or f"in_{self.var}"

    @property
    def size(self) -> str:
        return self.node.size if self.vector else ""


@dataclass
class Layout:
    plan: KernelPlan
    inputs: list[Input] = field(default_factory=list)
    arrays: list[str] = field(default_factory=list)  # params/indices read by in-kernel lookups
    grad_lookups: list[Lookup] = field(default_factory=list)  # param lookups with a gradient

    @property
    def spec(self) -> ir.Spec:
        return self.plan.spec

    def side(self, side: Side) -> list[Input]:
        return [x for x in self.inputs if x.side is side]

    def lookups_of(self, *sides: Side) -> list[Lookup]:
        return [x for x in self.grad_lookups if x.side in sides]

    @property
    def sizes(self) -> list[str]:
        """Feature size names that shape arrays: d, dv and every vector input's size."""
        names = ["d", "dv"]
        for x in self.inputs:
            if x.vector and x.size not in names:
                names.append(x.size)
        return names

    @property
    def has_state(self) -> bool:
        return self.plan.deriv.norm in (NormKind.SOFTMAX, NormKind.SUM)

    @property
    def needs_rows(self) -> bool:
        """False when the pair kernel reads only q and k: no host prologue/epilogue at all."""
        return bool(self.hoisted())

    def hoisted(self) -> list[Input]:
        """The inputs computed on the host (not q or k themselves), in argument order."""
        return [x for x in self.inputs if x.raw is None]

    def base_args(self) -> list[str]:
        return ["qoff", "koff", "q", "k", "v", *(x.arg for x in self.hoisted()),
                *(f"a_{a}" for a in self.arrays)]

    def dq_inputs(self) -> list[Input]:
        return [x for x in self.inputs if x.side in (Side.QUERY, Side.CONST)]

    def dq_lookups(self) -> list[Lookup]:
        """attn_bwd_dq's lookup adjoints in argument order (per-row partials, then per-block
        ones of pair lookups): the kernel, the launcher and the PTX signature all read this."""
        return self.lookups_of(Side.QUERY, Side.CONST) + self.lookups_of(Side.PAIR)

    def dq_outputs(self) -> list[str]:
        return [f"g_{x.var}" for x in self.dq_inputs()] + \
            [f"gl_{x.name}" for x in self.dq_lookups()]

    def dkdv_outputs(self) -> list[str]:
        outs = [f"g_{x.var}" for x in self.side(Side.KEY)]
        return outs + [f"gl_{x.name}" for x in self.lookups_of(Side.KEY)]


def make_layout(plan: KernelPlan) -> Layout:
    layout = Layout(plan)
    for item in plan.inputs:
        if item.side is Side.PAIR:
            raise NotImplementedError(f"a pair-level vector input {item.node.name}")
        layout.inputs.append(Input(item, numpy_ref.variable(item.node)))
    declared = [p.name for p in plan.spec.params] + [x.name for x in plan.spec.indices]
    used = {x.array for x in plan.lookups}
    layout.arrays = [a for a in declared if a in used]
    flowing: set[sp.Symbol] = set(plan.grads.dlogit)
    for r in plan.loops:
        flowing |= {s for s, _ in plan.grads.partials.get(r.name, [])}
    layout.grad_lookups = [x for x in plan.param_lookups if x.symbol in flowing]
    return layout


@dataclass(frozen=True)
class Config:
    dtype: str = "float32"
    bq: int = PRODUCTION_TILES[0]
    bk: int = PRODUCTION_TILES[1]
    bwd_bq: int = PRODUCTION_TILES[2]
    bwd_bk: int = PRODUCTION_TILES[3]
    sizes: tuple[tuple[str, int], ...] = ()  # feature size name -> value

    def size(self, name: str) -> int:
        return dict(self.sizes).get(name, DEFAULT_FEATURES)


SMEM_LIMIT = 48 * 1024  # static shared memory per block
ACC_REGISTERS = 128  # 32-bit registers a thread may spend on vector adjoint accumulators


def shared_accumulators(layout: Layout, c: Config) -> list[Input]:
    """attn_bwd_dkdv's per-head key-side vector adjoints kept in a shared row per thread
    instead of registers: dV and dK stay in registers, and the others move (largest first)
    until the rest fit in ACC_REGISTERS. Without this, a key-side input as wide as k (a rotary
    part rk[j] beside k) needs 3 x 64 accumulators and ptxas spills at 255 registers."""
    words = np.dtype(c.dtype).itemsize // 4
    per_head = sorted((x for x in layout.side(Side.KEY) if x.vector and x.raw != "k"),
                      key=lambda x: -c.size(x.size))
    total = words * (c.size("dv") + sum(c.size(x.size) for x in layout.side(Side.KEY)
                                        if x.vector))
    moved = []
    for x in per_head:
        if total <= words * ACC_REGISTERS:
            break
        moved.append(x)
        total -= words * c.size(x.size)
    return moved


def shared_bytes(layout: Layout, c: Config) -> dict[str, int]:
    """Static shared memory of each kernel for a configuration (as the emitter declares it)."""
    item = np.dtype(c.dtype).itemsize

    def width(side: Side, pad: int) -> int:
        return sum(c.size(x.size) + pad if x.vector else 1 for x in layout.side(side))

    const = sum(c.size(x.size) for x in layout.side(Side.CONST) if x.vector)
    pair = len(layout.lookups_of(Side.PAIR)) * c.bwd_bq * c.bwd_bk * (4 + item)
    dv = c.size("dv")
    accumulators = sum(c.size(x.size) + 1 for x in shared_accumulators(layout, c))
    return {
        "attn_fwd": item * (c.bk * (width(Side.KEY, 0) + dv) + const),
        "attn_bwd_dkdv": item * (c.bwd_bk * (width(Side.KEY, 1) + dv + 1 + accumulators)
                                 + c.bwd_bq * (width(Side.QUERY, 0) + dv + 2) + const),
        "attn_bwd_dq": item * (c.bwd_bq * (width(Side.QUERY, 1) + dv + 1)
                               + c.bwd_bk * (width(Side.KEY, 0) + dv) + const) + pair,
    }


def fit_tiles(layout: Layout, c: Config) -> Config:
    """Halve the tiles of a kernel until its static shared memory fits in 48 KiB."""
    import dataclasses

    while shared_bytes(layout, c)["attn_fwd"] > SMEM_LIMIT and min(c.bq, c.bk) > 1:
        c = dataclasses.replace(c, bq=max(1, c.bq // 2), bk=max(1, c.bk // 2))
    while max(shared_bytes(layout, c)[k] for k in ("attn_bwd_dkdv", "attn_bwd_dq")) > \
            SMEM_LIMIT and min(c.bwd_bq, c.bwd_bk) > 1:
        c = dataclasses.replace(c, bwd_bq=max(1, c.bwd_bq // 2), bwd_bk=max(1, c.bwd_bk // 2))
    return c


def size_const(name: str) -> str:
    return {"d": "D", "dv": "DV"}.get(name, f"SZ_{name}")


# ---- the generated module -----------------------------------------------------------------

JIT = '''\
def jit(threads):
    """cuda.jit with launch_bounds = the block size, so ptxas may use up to 255 registers."""
    return cuda.jit if SIM else cuda.jit(launch_bounds=threads)
'''

class Ctx:
    """Which rows a kernel owns (one per thread) and where every value lives."""

    def __init__(self, name: str, own: Side, own_shared: bool) -> None:
        self.name = name
        self.own = own  # QUERY (fwd, dq) or KEY (dkdv)
        self.other = Side.KEY if own is Side.QUERY else Side.QUERY
        self.own_shared = own_shared  # own rows in padded shared tiles (backward: registers)


class Emitter:
    def __init__(self, layout: Layout, config: Config) -> None:
        self.layout = layout
        self.plan = layout.plan
        self.deriv = layout.plan.deriv
        self.grads = layout.plan.grads
        self.fwd_steps = program.forward_steps(layout.plan)
        self.bwd_steps = program.backward_steps(layout.plan)
        self.norm = next(s.norm for s in self.fwd_steps if isinstance(s, program.Accumulate))
        self.config = config
        self.w = SourceWriter()
        self.consts: dict[str, str] = {}

    # ---- names ----
    def printer(self, ctx: Ctx) -> CudaPrinter:
        names: dict[sp.Symbol, str] = {s: n for n, s in POSITIONS.items()}
        # positions i, j are pi = qo + i, pj = ko + j: i and j index the call's rows and keys
        names.update({POSITIONS["i"]: "pi", POSITIONS["j"]: "pj", OFFSETS["q"]: "qo",
                      OFFSETS["k"]: "ko"})
        names.update({SIZES["d"]: "D", SIZES["dv"]: "DV", SIZES["n_q"]: "n_q",
                      SIZES["n_k"]: "n_k", SIZES["heads"]: "heads",
                      SIZES["kv_heads"]: "kv_heads", S: "x"})
        for x in self.layout.inputs:
            names[x.node.symbol] = self.access(x, ctx)
        for node in self.deriv.nodes:
            if isinstance(node, Lookup):
                names[node.symbol] = f"lk_{node.name}"
            elif isinstance(node, Reduction) and node.side is Side.PAIR:
                names[node.symbol] = f"rd_{node.name}"
        return CudaPrinter(names, self.consts)

    def access(self, x: Input, ctx: Ctx) -> str:
        if x.side is Side.CONST:
            return f"c_{x.var}[f]" if x.vector else f"v_{x.var}"
        if x.side is ctx.own:
            if not x.vector:
                return f"v_{x.var}"
            return f"o_{x.var}[t, f]" if ctx.own_shared else f"o_{x.var}[f]"
        return f"s_{x.var}[r, f]" if x.vector else f"s_{x.var}[r]"

    def head_of(self, x: Input) -> str:
        return "g" if x.raw == "k" else "h"

    def lookup_read(self, node: Lookup, p: CudaPrinter) -> str:
        subs = [p.int_(s) for s in local_subscripts(self.plan.spec, node.array, node.subscripts)]
        if node.is_param:
            return f"a_{node.array}[{', '.join(subs) or '0'}]"
        return f"a_{node.array}[{', '.join(['b', *subs])}]"

    def flat_index(self, node: Lookup, p: CudaPrinter) -> str:
        subs = [p.int_(s) for s in local_subscripts(self.plan.spec, node.array, node.subscripts)]
        if not subs:
            return "0"
        text = subs[0]
        for axis, s in enumerate(subs[1:], start=1):
            text = f"({text}) * a_{node.array}.shape[{axis}] + {s}"
        return text

    # ---- module ----
    def module(self) -> str:
        body = SourceWriter()
        self.w = body
        self.fwd()
        self.preprocess()
        self.dkdv()
        self.dq()
        if self.layout.plan.linear_path:
            LinearEmitter(self).emit()
        kernels = body.text()
        w = self.w = SourceWriter()
        d, c = self.deriv, self.config
        w(f'"""attndsl Numba CUDA kernels for \'{d.spec.name}\' (generated; do not edit).')
        w()
        w(f"spec hash {numpy_ref.spec_hash(d)}")
        w(f"x       = {sp.sstr(d.logit)}")
        w(f"allowed = {sp.sstr(d.mask) if d.mask is not None else 'every key'}")
        w(f"weights = {d.norm.value if d.norm_expr is None else sp.sstr(d.norm_expr)}")
        w(f"backward: {normalizers.of(d).rule}")
        w('"""')
        w()
        w("import math")
        w()
        w("import numpy as np")
        w("from numba import cuda, types")
        w("from numba.core import config as _nb_config")
        w()
        w(f"F = np.{c.dtype}  # every literal goes through F: a bare 0.5 is float64")
        w(f"DT = types.{c.dtype}")
        w("IT = types.int32")
        w(f"BQ, BK = {c.bq}, {c.bk}  # forward tiles: query rows (= threads), key rows")
        w(f"BQB, BKB = {c.bwd_bq}, {c.bwd_bk}  # backward tiles")
        for name in self.layout.sizes:
            w(f"{size_const(name)} = {c.size(name)}  # feature size {name}")
            w(f"{size_const(name)}_P = {c.size(name) + 1}  # padded: rows in shared memory "
              "without bank conflicts")
        w("SIM = _nb_config.ENABLE_CUDASIM  # the simulator's jit takes no launch_bounds")
        w("ZERO, ONE, HALF, NEG_INF = F(0.0), F(1.0), F(0.5), F(-np.inf)")
        w("RSQRT2, RSQRT2PI = F(1 / np.sqrt(2)), F(1 / np.sqrt(2 * np.pi))")
        for name, literal in self.consts.items():
            w(f"{name} = F({literal})")
        w()
        w()
        w.lines += JIT.splitlines()
        w()
        w()
        w.lines += kernels.splitlines()
        return w.text()

    # ---- pieces shared by the kernels ----
    def load_tile(self, arr: str, dst: str, head: str, start: str, n: str, width: str,
                  rows: str, threads: str) -> None:
        """Cooperative, coalesced copy of `rows` rows into a shared tile (zeros past n)."""
        w = self.w
        if width == "1":
            with w.block(f"for rr in range(t, {rows}, {threads}):"):
                w(f"{dst}[rr] = {arr}[b, {head}, {start} + rr, 0] if {start} + rr < {n} "
                  "else ZERO")
            return
        with w.block(f"for idx in range(t, {rows} * {width}, {threads}):"):
            w(f"rr, cc = idx // {width}, idx % {width}")
            w(f"{dst}[rr, cc] = {arr}[b, {head}, {start} + rr, cc] if {start} + rr < {n} "
              "else ZERO")

    def shared_tiles(self, side: Side, rows: str, pad: bool, prefix: str) -> None:
        w = self.w
        for x in self.layout.side(side):
            if x.vector:
                width = size_const(x.size) + ("_P" if pad else "")
                w(f"{prefix}_{x.var} = cuda.shared.array(({rows}, {width}), DT)")
            else:
                w(f"{prefix}_{x.var} = cuda.shared.array({rows}, DT)")

    def load_side(self, side: Side, prefix: str, start: str, n: str, rows: str,
                  threads: str) -> None:
        for x in self.layout.side(side):
            width = size_const(x.size) if x.vector else "1"
            self.load_tile(x.arg, f"{prefix}_{x.var}", self.head_of(x), start, n, width,
                           rows, threads)

    def const_inputs(self, threads: str) -> None:
        """Constant-side inputs (per b, h): vectors in shared memory, scalars in registers."""
        w = self.w
        vecs = [x for x in self.layout.side(Side.CONST) if x.vector]
        for x in vecs:
            w(f"c_{x.var} = cuda.shared.array({size_const(x.size)}, DT)")
        for x in vecs:
            with w.block(f"for cc in range(t, {size_const(x.size)}, {threads}):"):
                w(f"c_{x.var}[cc] = {x.arg}[b, h, 0, cc]")
        for x in self.layout.side(Side.CONST):
            if not x.vector:
                w(f"v_{x.var} = {x.arg}[b, h, 0, 0]")

    def own_scalars(self, ctx: Ctx, index: str, ok: str) -> None:
        for x in self.layout.side(ctx.own):
            if not x.vector:
                self.w(f"v_{x.var} = {x.arg}[b, {self.head_of(x)}, {index}, 0] if {ok} else ZERO")

    def lookups(self, p: CudaPrinter, sides: tuple[Side, ...], guard: str | None) -> None:
        for node in self.plan.lookups:
            if node.side in sides:
                read = self.lookup_read(node, p)
                if guard is not None:
                    zero = "ZERO" if node.is_param else "0"
                    read = f"{read} if {guard} else {zero}"
                self.w(f"lk_{node.name} = {read}")

    def tile_status(self, p: CudaPrinter, threads: str, i0: str, i1: str, j0: str,
                    j1: str) -> None:
        """any_: some pair of the tile is allowed; all_: every pair is. The rule of
        plan.MaskAtom: linear atoms from the corners, the others by a scan of the tile that
        the block shares (each thread some pairs, then a barrier vote), only when needed."""
        w, mask = self.w, self.deriv.mask
        if mask is None:
            w("any_, all_ = True, True")
            return
        corner = p.with_names({TILE["i_first"]: i0, TILE["i_last"]: i1,
                               TILE["j_first"]: j0, TILE["j_last"]: j1})
        states: dict[sp.Basic, str] = {}
        scanned = []
        for n, atom in enumerate(self.plan.mask_atoms):
            if not atom.linear:
                scanned.append((n, atom.relation))
                continue
            states[atom.relation] = f"ts_a{n}"
            w(f"ts_c{n} = " + " + ".join(f"int({corner.bool_(c)})" for c in atom.corners()))
            w(f"ts_a{n} = {corner_status_text(f'ts_c{n}')}  # {sp.sstr(atom.relation)}")
        w(f"status = {tile_status_text(mask, states)}")
        if scanned:
            with w.block("if status == 1:  # the same branch in every thread of the block"):
                self.scan_tile(p, threads, i0, i1, j0, j1, scanned, states)
                w(f"status = {tile_status_text(mask, states)}")
        w("any_ = status != 0")
        w("all_ = status == 2")

    def scan_tile(self, p: CudaPrinter, threads: str, i0: str, i1: str, j0: str, j1: str,
                  scanned: list[tuple[int, sp.Basic]], states: dict[sp.Basic, str]) -> None:
        """Whether some pair of the tile satisfies each scanned atom, and some does not."""
        w = self.w
        i, j = POSITIONS["i"], POSITIONS["j"]
        names: dict[sp.Symbol, str] = {i: "ts_i", j: "ts_j"}
        for node in self.plan.lookups:  # in node order: a subscript may read an earlier one
            if node.side is not Side.CONST:
                names[node.symbol] = f"({self.lookup_read(node, p.with_names(names))})"
        at = p.with_names(names)
        for n, _ in scanned:
            w(f"ts_t{n}, ts_f{n} = 0, 0")
        w(f"ts_w = {j1} - {j0} + 1")
        with w.block(f"for ts_p in range(t, ({i1} - {i0} + 1) * ts_w, {threads}):"):
            w(f"ts_i, ts_j = {i0} + ts_p // ts_w, {j0} + ts_p % ts_w")
            for n, relation in scanned:
                with w.block(f"if {at.bool_(relation)}:"):
                    w(f"ts_t{n} = 1")
                with w.block("else:"):
                    w(f"ts_f{n} = 1")
        for n, relation in scanned:
            states[relation] = f"ts_a{n}"
            w(f"ts_t{n}, ts_f{n} = cuda.syncthreads_or(ts_t{n}), cuda.syncthreads_or(ts_f{n})")
            w(f"ts_a{n} = {scan_status_text(f'ts_t{n}', f'ts_f{n}')}  # {sp.sstr(relation)}")

    def pair_prelude(self, p: CudaPrinter, ctx: Ctx, ok: str) -> None:
        """Reads the pair's other-side and pair lookups, then decides whether it is allowed."""
        w = self.w
        w(f"ok = {ok}")
        allow = [step for step in self.fwd_steps if isinstance(step, program.Allow)]
        other = [n for n in self.plan.lookups if n.side in (ctx.other, Side.PAIR)]
        if other or allow:
            with w.block("if ok:"):
                self.lookups(p, (ctx.other, Side.PAIR), None)
                for step in allow:
                    with w.block("if not all_:"):
                        w(f"ok = {p.bool_(step.mask)}")

    def logit(self, p: CudaPrinter) -> None:
        """The pair program's reductions and logit x (one thread computes the whole pair)."""
        w = self.w
        for step in self.fwd_steps:
            if isinstance(step, program.Reduce):
                r = step.reduction
                body = p.num(r.body) if r.gemm is None else \
                    f"{p.names[r.gemm[0].symbol]} * {p.names[r.gemm[1].symbol]}"
                w(f"rd_{r.name} = ZERO")
                with w.block(f"for f in range({size_const(r.size)}):"):
                    w(f"rd_{r.name} += {body}")
            elif isinstance(step, program.Logit):
                w(f"x = {p.num(step.value)}")

    def running(self, p: CudaPrinter, acc: str, x: str, m: str = "m") -> CudaPrinter:
        """The normalizer's symbols as the forward's locals: running state, ACC, X."""
        return p.with_names({normalizers.M: m, normalizers.M_NEW: "m_new", normalizers.L: "l",
                             normalizers.Z: "z", normalizers.ACC: acc, normalizers.X: x})

    def add_pair(self, p: CudaPrinter, pw: str, v_c: str) -> None:
        """acc += ACC * v_j and the running state's update (the Accumulate step)."""
        w = self.w
        w(f"{pw} = {p.num(self.norm.accumulate)}")
        for symbol, value in self.norm.update:
            w(f"{p.names[symbol]} = {p.num(value)}")
        with w.block(f"if {pw} != ZERO:  # 0 * a NaN v stays 0, as on cpu"), \
                w.block("for c in range(DV):"):
            w(f"acc[c] += {pw} * {v_c}")

    # ---- forward ----
    def fwd(self) -> None:
        w, lay, d = self.w, self.layout, self.deriv
        ctx = Ctx("fwd", Side.QUERY, own_shared=False)
        p = self.printer(ctx)
        sink = ["sink_rows"] if d.sink is not None else []  # [B, H, n_q], from the host
        args = ", ".join(lay.base_args() + ["out", "state", *sink])
        w("@jit(BQ)")
        with w.block(f"def attn_fwd({args}):"):
            w('"""One block per (query tile, head, batch), one thread per query row."""')
            self.kernel_head("BQ")
            w("i = q0 + t")
            w("pi = qo + i")
            w("row_ok = i < n_q")
            w("q1 = min(q0 + BQ, n_q) - 1  # the tile's last row")
            self.shared_tiles(Side.KEY, "BK", False, "s")
            w("s_v = cuda.shared.array((BK, DV), DT)")
            self.const_inputs("BQ")
            for x in lay.side(Side.QUERY):
                if x.vector:
                    sz = size_const(x.size)
                    w(f"o_{x.var} = cuda.local.array({sz}, DT)")
                    with w.block(f"for f in range({sz}):"):
                        w(f"o_{x.var}[f] = {x.arg}[b, h, i, f] if row_ok else ZERO")
            self.own_scalars(ctx, "i", "row_ok")
            self.lookups(p, (Side.CONST,), None)
            self.lookups(p, (Side.QUERY,), "row_ok")
            w("acc = cuda.local.array(DV, DT)")
            with w.block("for c in range(DV):"):
                w("acc[c] = ZERO")
            online = self.norm.rescale is not None  # softmax: the tile's max, then weights
            if online:
                w("s_r = cuda.local.array(BK, DT)")
                w("m = NEG_INF  # running max")
                w("l = ZERO  # running sum of exp(x - m)")
            elif normalizers.Z in self.norm.running:
                w("z = ZERO  # running sum of x over allowed keys")
            with w.block("for k0 in range(0, n_k, BK):"):
                w("k1 = min(k0 + BK, n_k) - 1")
                self.tile_status(p, "BQ", "(qo + q0)", "(qo + q1)", "(ko + k0)", "(ko + k1)")
                with w.block("if not any_:"):
                    w("continue  # the whole tile is masked (uniform across the block)")
                w("cuda.syncthreads()  # every thread is done with the previous tile")
                self.load_side(Side.KEY, "s", "k0", "n_k", "BK", "BQ")
                self.load_tile("v", "s_v", "g", "k0", "n_k", "DV", "BK", "BQ")
                w("cuda.syncthreads()")
                if online:
                    w("t_max = NEG_INF")
                with w.block("for r in range(BK):"):
                    w("j = k0 + r")
                    w("pj = ko + j")
                    w("x = NEG_INF" if online else "x = ZERO")
                    self.pair_prelude(p, ctx, "row_ok and j < n_k")
                    with w.block("if ok:"):
                        self.logit(p)
                        if online:  # a NaN logit wins (max() would drop it): out, lse NaN
                            with w.block("if x > t_max or x != x:"):
                                w("t_max = x")
                        else:
                            self.add_pair(self.running(p, "pw", "x"), "pw", "s_v[r, c]")
                    if online:
                        w("s_r[r] = x")
                if online:
                    self.online_tile(p)
            with w.block("if row_ok:"):
                # l > 0, 0 (no allowed key: out = 0, lse = -inf) or NaN (a NaN or +inf logit
                # at an allowed pair: out and lse NaN): the finish tests `!= 0`
                self.finish(p)
                with w.block("for c in range(DV):"):
                    w("out[b, h, i, c] = acc[c] * inv")
        w()
        w()

    def online_tile(self, p: CudaPrinter) -> None:
        """Softmax: the tile's max t_max joins the running max, acc and l are rescaled, then
        every key of the tile accumulates (masked keys hold x = -inf: weight 0)."""
        w = self.w
        with w.block("if t_max != NEG_INF:  # else every key of the tile is masked"):
            w("m_new = t_max if t_max > m or t_max != t_max else m  # NaN wins")
            assert self.norm.rescale is not None
            w(f"corr = {self.running(p, 'pw', 'x').num(self.norm.rescale)}  # m = -inf -> 0")
            w("l *= corr")
            with w.block("for c in range(DV):"):
                w("acc[c] *= corr")
            with w.block("for r in range(BK):"):
                self.add_pair(self.running(p, "pw", "s_r[r]", m="m_new"), "pw", "s_v[r, c]")
            w("m = m_new")

    def finish(self, p: CudaPrinter) -> None:
        """inv (out = inv * acc) and the saved row state, from the normalizer's finish."""
        norm = normalizers.of(self.deriv)
        names = {normalizers.M: "m", normalizers.L: "l", normalizers.Z: "z",
                 normalizers.SINK: "sink_rows[b, h, i]"}
        targets = {normalizers.SCALE: "inv", normalizers.SAVED: "state[b, h, i]"}
        for target, expr in norm.finish:
            name = targets.get(target, normalizers.local(target))
            self.w(f"{name} = {p.with_names(names).num(expr)}")
            names[target] = name
        if normalizers.SAVED not in dict(norm.finish):
            self.w("state[b, h, i] = ZERO")

    def kernel_head(self, threads: str) -> None:
        w = self.w
        w("t = cuda.threadIdx.x")
        w("b = cuda.blockIdx.z")
        w("h = cuda.blockIdx.y")
        w("heads, n_q = q.shape[1], q.shape[2]")
        w("kv_heads, n_k = k.shape[1], k.shape[2]")
        w("g = h // (heads // kv_heads)  # the key/value head of query head h")
        w("qo, ko = qoff[b], koff[b]  # position = offset + row (or column)")
        w(f"q0 = cuda.blockIdx.x * {threads}")

    # ---- backward ----
    def preprocess(self) -> None:
        w = self.w
        w("@jit(BQB)")
        with w.block("def attn_bwd_preprocess(out, dout, delta):"):
            w('"""D = rowsum(dO * O), the normalizer backward\'s per-row term."""')
            w("b, h = cuda.blockIdx.z, cuda.blockIdx.y")
            w("i = cuda.blockIdx.x * BQB + cuda.threadIdx.x")
            with w.block("if i < out.shape[2]:"):
                w("acc = ZERO")
                with w.block("for c in range(DV):"):
                    w("acc += dout[b, h, i, c] * out[b, h, i, c]")
                w("delta[b, h, i] = acc")
        w()
        w()

    def live(self, p: CudaPrinter, state: str) -> str:
        """The backward's test that a row has an allowed key (a NaN row is live)."""
        if self.norm.empty is None:
            return ""
        return f" and {state} != {p.num(self.norm.empty)}"

    def pair_grad(self, p: CudaPrinter, dp: str, state: str, delta: str) -> None:
        """pw (the weight after normalization, for dV) and dx = dS for an allowed pair."""
        norm = normalizers.of(self.deriv)
        self.w(f"# {norm.rule}")
        p = p.with_names({normalizers.X: "x", normalizers.SAVED: state, normalizers.WEIGHT: "pw",
                          normalizers.DP: dp, normalizers.DELTA: delta})
        self.w(f"pw = {p.num(norm.weight)}")
        self.w(f"dx = {p.num(norm.dscore)}")

    def is_target(self, symbol: sp.Symbol, ctx: Ctx) -> str | None:
        """How this kernel accumulates the adjoint of `symbol`: 'vec', 'scalar', 'pair' or None."""
        node = self.deriv.node(symbol)
        sides = {ctx.own} | ({Side.CONST} if ctx.own is Side.QUERY else set())
        x = next((x for x in self.layout.inputs if x.node.symbol == symbol), None)
        if x is not None:
            return ("vec" if x.vector else "scalar") if x.side in sides else None
        if isinstance(node, Lookup) and node in self.layout.grad_lookups:
            if node.side in sides:
                return "scalar"
            if node.side is Side.PAIR and ctx.own is Side.QUERY:
                return "pair"
        return None

    def adj(self, symbol: sp.Symbol) -> str:
        node = self.deriv.node(symbol)
        x = next((x for x in self.layout.inputs if x.node.symbol == symbol), None)
        if x is not None:
            return f"d_{x.var}"
        assert isinstance(node, Lookup)
        return f"dl_{node.name}"

    def accumulate(self, p: CudaPrinter, ctx: Ctx) -> None:
        """The pair program's backward steps (program.py) into this kernel's own adjoints."""
        w = self.w
        for step in self.bwd_steps:
            symbol = step.source.node.symbol
            if isinstance(step, program.Gather):
                if self.wanted(symbol, ctx):
                    partial = step.source.partial
                    w(f"ga_{step.source.node.name} = " +
                      ("ZERO" if partial is None else f"dx * {p.num(partial)}"))
            elif isinstance(step, program.Loop):
                self.loop_adjoint(p, ctx, step)
            elif isinstance(step, program.Gemm):
                self.gemm_adjoint(p, ctx, step)
            elif self.is_target(symbol, ctx):
                w(f"{self.adj(symbol)} += {self.source(p, step.source)}")

    def wanted(self, symbol: sp.Symbol, ctx: Ctx) -> bool:
        """Whether this kernel needs a gathered adjoint: a reduction's feeds its inputs."""
        return isinstance(self.deriv.node(symbol), Reduction) or \
            self.is_target(symbol, ctx) is not None

    @staticmethod
    def source(p: CudaPrinter, source: program.Source) -> str:
        if source.gathered:
            return f"ga_{source.node.name}"
        assert source.partial is not None
        return f"dx * {p.num(source.partial)}"

    def gemm_adjoint(self, p: CudaPrinter, ctx: Ctx, step: program.Gemm) -> None:
        w, node = self.w, step.gemm
        a, b_ = node.gemm  # type: ignore[misc]
        targets = [(v, other) for v, other in ((a, b_), (b_, a)) if self.is_target(v.symbol, ctx)]
        if not targets:
            return
        w(f"dr = {self.source(p, step.source)}")
        with w.block("if dr != ZERO:  # 0 * a NaN row (masked, untaken) stays 0"), \
                w.block(f"for f in range({size_const(node.size)}):"):
            for v, other in targets:
                w(f"{self.adj(v.symbol)}[f] += dr * {p.names[other.symbol]}")

    def loop_adjoint(self, p: CudaPrinter, ctx: Ctx, step: program.Loop) -> None:
        """dr * d body / d input per feature into own adjoints and gathered locals."""
        w = self.w
        items = []
        for s, e in step.reads:
            if s in self.plan.nested:
                if self.wanted(s, ctx):
                    items.append((s, e, "gathered"))
            elif self.is_target(s, ctx):
                items.append((s, e, self.is_target(s, ctx)))
        if not items:
            return
        w(f"dr = {self.source(p, step.source)}")
        with w.block("if dr != ZERO:  # an untaken where branch: 0 * inf = NaN"), \
                w.block(f"for f in range({size_const(step.loop.size)}):"):
            for s, e, how in items:
                if how == "gathered":
                    w(f"ga_{self.deriv.node(s).name} += dr * {p.num(e)}")  # type: ignore[union-attr]
                    continue
                index = "[f]" if how == "vec" else ""
                w(f"{self.adj(s)}{index} += dr * {p.num(e)}")

    def accumulators(self, ctx: Ctx, sides: tuple[Side, ...]) -> None:
        w = self.w
        for x in self.layout.inputs:
            if x.side in sides:
                if x.vector:
                    sz = size_const(x.size)
                    w(f"d_{x.var} = cuda.local.array({sz}, DT)")
                    with w.block(f"for f in range({sz}):"):
                        w(f"d_{x.var}[f] = ZERO")
                else:
                    w(f"d_{x.var} = ZERO")
        for node in self.layout.lookups_of(*sides):
            w(f"dl_{node.name} = ZERO")

    def write_adjoints(self, sides: tuple[Side, ...], head: str, index: str, ok: str) -> None:
        """Each own row's adjoints, when `ok`; nothing at all when no row has one (a logit
        with nothing query-side: an empty `if` block is an IndentationError)."""
        w = self.w
        inputs = [x for x in self.layout.inputs if x.side in sides]
        lookups = self.layout.lookups_of(*sides)
        if not inputs and not lookups:
            return
        with w.block(f"if {ok}:"):
            for x in inputs:
                hd = "g" if x.raw == "k" else head
                if x.vector:
                    with w.block(f"for f in range({size_const(x.size)}):"):
                        w(f"g_{x.var}[b, {hd}, {index}, f] = d_{x.var}[f]")
                else:
                    w(f"g_{x.var}[b, {hd}, {index}, 0] = d_{x.var}")
            for node in lookups:
                w(f"gl_{node.name}[b, {head}, {index}] = dl_{node.name}")

    def dkdv(self) -> None:
        w, lay = self.w, self.layout
        ctx = Ctx("dkdv", Side.KEY, own_shared=True)
        p = self.printer(ctx)
        args = ", ".join(lay.base_args() + ["dout", "state", "delta", "g_v"]
                         + lay.dkdv_outputs())
        w("@jit(BKB)")
        with w.block(f"def attn_bwd_dkdv({args}):"):
            w('"""One block per (key tile, kv head, batch), one thread per key row j; the block')
            w('loops over the query heads of its group, so dK/dV need no atomics."""')
            w("t = cuda.threadIdx.x")
            w("b = cuda.blockIdx.z")
            w("g = cuda.blockIdx.y")
            w("qo, ko = qoff[b], koff[b]  # position = offset + row (or column)")
            w("heads, n_q = q.shape[1], q.shape[2]")
            w("kv_heads, n_k = k.shape[1], k.shape[2]")
            w("group = heads // kv_heads")
            w("k0 = cuda.blockIdx.x * BKB")
            w("j = k0 + t")
            w("pj = ko + j")
            w("col_ok = j < n_k")
            w("k1 = min(k0 + BKB, n_k) - 1")
            # own rows: padded shared tiles (thread t reads row t; +1 avoids bank conflicts)
            self.shared_tiles(Side.KEY, "BKB", True, "o")
            w("o_v = cuda.shared.array((BKB, DV_P), DT)")
            self.shared_tiles(Side.QUERY, "BQB", False, "s")
            w("s_do = cuda.shared.array((BQB, DV), DT)")
            if lay.has_state:
                w("s_state = cuda.shared.array(BQB, DT)")
                w("s_delta = cuda.shared.array(BQB, DT)")
            in_shared = shared_accumulators(lay, self.config)
            for x in in_shared:  # thread t's adjoint is row t (too many for registers)
                w(f"sa_{x.var} = cuda.shared.array((BKB, {size_const(x.size)}_P), DT)")
            w("d_v = cuda.local.array(DV, DT)")
            with w.block("for c in range(DV):"):
                w("d_v[c] = ZERO")
            raw_k = [x for x in lay.side(Side.KEY) if x.raw == "k"]
            per_head = [x for x in lay.side(Side.KEY) if x.raw != "k"]
            for x in raw_k:
                w(f"d_{x.var} = cuda.local.array(D, DT)")
                with w.block("for f in range(D):"):
                    w(f"d_{x.var}[f] = ZERO")
            self.own_tile_load(raw_k, "o_v")
            with w.block("for hh in range(group):"):
                w("h = g * group + hh")
                # per-head shared rows (own key-side inputs, constant vectors) are reloaded:
                # barriers so no thread still reads the previous head's or not yet this one's
                reload = per_head or any(x.vector for x in lay.side(Side.CONST))
                if reload:
                    w("cuda.syncthreads()")
                self.own_tile_load(per_head, None)
                self.const_inputs("BKB")
                if reload:
                    w("cuda.syncthreads()")
                self.own_scalars(ctx, "j", "col_ok")
                self.lookups(p, (Side.CONST,), None)
                self.lookups(p, (Side.KEY,), "col_ok")
                for x in per_head:
                    if x.vector:
                        sz = size_const(x.size)
                        w(f"d_{x.var} = sa_{x.var}[t]" if x in in_shared else
                          f"d_{x.var} = cuda.local.array({sz}, DT)")
                        with w.block(f"for f in range({sz}):"):
                            w(f"d_{x.var}[f] = ZERO")
                    else:
                        w(f"d_{x.var} = ZERO")
                for node in lay.lookups_of(Side.KEY):
                    w(f"dl_{node.name} = ZERO")
                with w.block("for q0 in range(0, n_q, BQB):"):
                    w("q1 = min(q0 + BQB, n_q) - 1")
                    self.tile_status(p, "BKB", "(qo + q0)", "(qo + q1)", "(ko + k0)", "(ko + k1)")
                    with w.block("if not any_:"):
                        w("continue")
                    w("cuda.syncthreads()")
                    self.load_side(Side.QUERY, "s", "q0", "n_q", "BQB", "BKB")
                    self.load_tile("dout", "s_do", "h", "q0", "n_q", "DV", "BQB", "BKB")
                    if lay.has_state:
                        with w.block("for rr in range(t, BQB, BKB):"):
                            w("s_state[rr] = state[b, h, q0 + rr] if q0 + rr < n_q else ZERO")
                            w("s_delta[rr] = delta[b, h, q0 + rr] if q0 + rr < n_q else ZERO")
                    w("cuda.syncthreads()")
                    with w.block("for r in range(BQB):"):
                        w("i = q0 + r")
                        w("pi = qo + i")
                        self.pair_prelude(p, ctx, "col_ok and i < n_q" + self.live(p, "s_state[r]"))
                        with w.block("if ok:"):
                            self.logit(p)
                            w("dp = ZERO")
                            with w.block("for c in range(DV):"):
                                w("dp += s_do[r, c] * o_v[t, c]")
                            self.pair_grad(p, "dp", "s_state[r]", "s_delta[r]")
                            with w.block("if pw != ZERO:"), w.block("for c in range(DV):"):
                                w("d_v[c] += pw * s_do[r, c]")
                            self.accumulate(p, ctx)
                if per_head or lay.lookups_of(Side.KEY):
                    with w.block("if col_ok:"):
                        self.write_per_head(per_head)
            with w.block("if col_ok:"):
                with w.block("for c in range(DV):"):
                    w("g_v[b, g, j, c] = d_v[c]")
                for x in raw_k:
                    with w.block("for f in range(D):"):
                        w(f"g_{x.var}[b, g, j, f] = d_{x.var}[f]")
        w()
        w()

    def own_tile_load(self, items: list[Input], v_tile: str | None) -> None:
        w = self.w
        if v_tile is not None:
            self.load_tile("v", v_tile, "g", "k0", "n_k", "DV", "BKB", "BKB")
        for x in items:
            if x.vector:
                self.load_tile(x.arg, f"o_{x.var}", self.head_of(x), "k0", "n_k",
                               size_const(x.size), "BKB", "BKB")
        if v_tile is not None:
            w("cuda.syncthreads()")

    def write_per_head(self, per_head: list[Input]) -> None:
        w = self.w
        for x in per_head:
            if x.vector:
                with w.block(f"for f in range({size_const(x.size)}):"):
                    w(f"g_{x.var}[b, h, j, f] = d_{x.var}[f]")
            else:
                w(f"g_{x.var}[b, h, j, 0] = d_{x.var}")
        for node in self.layout.lookups_of(Side.KEY):
            w(f"gl_{node.name}[b, h, j] = dl_{node.name}")

    def dq(self) -> None:
        w, lay = self.w, self.layout
        ctx = Ctx("dq", Side.QUERY, own_shared=True)
        p = self.printer(ctx)
        args = ", ".join(lay.base_args() + ["dout", "state", "delta"] + lay.dq_outputs())
        pair = lay.lookups_of(Side.PAIR)
        w("@jit(BQB)")
        with w.block(f"def attn_bwd_dq({args}):"):
            w('"""One block per (query tile, head, batch), one thread per query row i."""')
            self.kernel_head("BQB")
            w("i = q0 + t")
            w("pi = qo + i")
            w("row_ok = i < n_q")
            w("q1 = min(q0 + BQB, n_q) - 1")
            w("blk = (b * heads + h) * cuda.gridDim.x + cuda.blockIdx.x")
            self.shared_tiles(Side.QUERY, "BQB", True, "o")
            w("o_do = cuda.shared.array((BQB, DV_P), DT)")
            self.shared_tiles(Side.KEY, "BKB", False, "s")
            w("s_v = cuda.shared.array((BKB, DV), DT)")
            for node in pair:
                w(f"pi_{node.name} = cuda.shared.array((BQB, BKB), IT)")
                w(f"pv_{node.name} = cuda.shared.array((BQB, BKB), DT)")
            self.const_inputs("BQB")
            for x in lay.side(Side.QUERY):
                if x.vector:
                    self.load_tile(x.arg, f"o_{x.var}", "h", "q0", "n_q", size_const(x.size),
                                   "BQB", "BQB")
            self.load_tile("dout", "o_do", "h", "q0", "n_q", "DV", "BQB", "BQB")
            w("cuda.syncthreads()")
            self.own_scalars(ctx, "i", "row_ok")
            self.lookups(p, (Side.CONST,), None)
            self.lookups(p, (Side.QUERY,), "row_ok")
            if lay.has_state:
                w("row_state = state[b, h, i] if row_ok else ZERO")
                w("row_delta = delta[b, h, i] if row_ok else ZERO")
            self.accumulators(ctx, (Side.QUERY, Side.CONST))
            live = "row_ok" + self.live(p, "row_state")
            with w.block("for k0 in range(0, n_k, BKB):"):
                w("k1 = min(k0 + BKB, n_k) - 1")
                self.tile_status(p, "BQB", "(qo + q0)", "(qo + q1)", "(ko + k0)", "(ko + k1)")
                with w.block("if not any_:"):
                    w("continue")
                w("cuda.syncthreads()")
                self.load_side(Side.KEY, "s", "k0", "n_k", "BKB", "BQB")
                self.load_tile("v", "s_v", "g", "k0", "n_k", "DV", "BKB", "BQB")
                w("cuda.syncthreads()")
                with w.block("for r in range(BKB):"):
                    w("j = k0 + r")
                    w("pj = ko + j")
                    for node in pair:
                        w(f"dl_{node.name} = ZERO")
                    self.pair_prelude(p, ctx, f"{live} and j < n_k")
                    with w.block("if ok:"):
                        self.logit(p)
                        w("dp = ZERO")
                        with w.block("for c in range(DV):"):
                            w("dp += o_do[t, c] * s_v[r, c]")
                        self.pair_grad(p, "dp", "row_state", "row_delta")
                        self.accumulate(p, ctx)
                    for node in pair:
                        w(f"pi_{node.name}[t, r] = {self.flat_index(node, p)} if ok else -1")
                        w(f"pv_{node.name}[t, r] = dl_{node.name}")
                if pair:
                    w("cuda.syncthreads()")
                    w("# two-stage lookup gradient: this block's partial, each element owned by")
                    w("# one thread and summed in a fixed order (deterministic, no atomics)")
                    with w.block("for rr in range(BQB):"), w.block("for cc in range(BKB):"):
                        for node in pair:
                            w(f"e = pi_{node.name}[rr, cc]")
                            with w.block("if e >= 0 and e % BQB == t:"):
                                w(f"gl_{node.name}[blk, e] += pv_{node.name}[rr, cc]")
            self.write_adjoints((Side.QUERY, Side.CONST), "h", "i", "row_ok")
        w()
        w()


# ---- linear attention: the associative form ------------------------------------------------


LINEAR_KERNELS = ("attn_linear_fwd", "attn_linear_bwd_ab", "attn_linear_bwd_v")


def linear_inputs(layout: Layout) -> tuple[Input, Input]:
    """The query-side and key-side factors of the one dot product: A_i . B_j."""
    path = layout.plan.linear
    assert path is not None
    pick = {x.item: x for x in layout.inputs}
    return pick[path.a], pick[path.b]


class LinearEmitter:
    """plan.LinearPath's equations as three kernels, one block per (head, batch), no shared
    memory: every thread owns one column (forward and dv: c over dv) or one row (dA, dB: f over
    the features) of S, then of U."""

    def __init__(self, em: Emitter) -> None:
        self.w, self.layout = em.w, em.layout
        path = self.layout.plan.linear
        assert path is not None
        self.causal, self.summed = path.causal, path.normalized
        a, b = linear_inputs(self.layout)
        self.A, self.Bn = a.arg, b.arg  # the factors' kernel arguments
        self.hb = "g" if b.raw == "k" else "h"  # B's head: k is read at the key/value head
        self.nf = size_const(a.size)
        self.base = ", ".join(self.layout.base_args())

    def emit(self) -> None:
        self.fwd()
        self.bwd_ab()
        self.bwd_v()

    def head(self) -> None:
        w = self.w
        w("b, h = cuda.blockIdx.y, cuda.blockIdx.x")
        w("heads, n_q = q.shape[1], q.shape[2]")
        w("kv_heads, n_k = k.shape[1], k.shape[2]")
        w("g = h // (heads // kv_heads)  # the key/value head of query head h")

    def row_grad(self, own: str) -> None:
        """gnum = dO_i / den_i and gden = -(dO_i . O_i) / den_i (none: dO_i and 0); `own`
        "all": every column into gnum[:], else this thread's column c as gnum_c."""
        w = self.w
        if not self.summed:
            w("gden = ZERO")
            if own == "all":
                with w.block("for cc in range(DV):"):
                    w("gnum[cc] = dout[b, h, i, cc]")
            else:
                w("gnum_c = dout[b, h, i, c]")
            return
        w("den = state[b, h, i]")
        w("inv = ONE / den if den != ZERO else ZERO")
        if own == "all":
            w("dot = ZERO")
            with w.block("for cc in range(DV):"):
                w("gnum[cc] = dout[b, h, i, cc] * inv")
                w("dot += dout[b, h, i, cc] * out[b, h, i, cc]")
            w("gden = -dot * inv")
        else:
            w("gnum_c = dout[b, h, i, c] * inv")

    @contextmanager
    def keys_then_rows(self, add_keys: Callable[[str, str], None], note: str) -> Iterator[None]:
        """`for i in range(n_q):` after adding the keys row i sees (all, or up to i)."""
        w = self.w
        if not self.causal:
            add_keys("0", "n_k")
        w("jn = 0")
        with w.block("for i in range(n_q):"):
            if self.causal:
                w(f"stop = min(i + 1, n_k){note}")
                add_keys("jn", "stop")
                w("jn = stop")
            yield

    @contextmanager
    def rows_then_keys(self, add_rows: Callable[[str, str], None], note: str
                       ) -> Iterator[None]:
        """`for j in range(n_k - 1, -1, -1):` after adding the rows that see key j (all, or
        those from i = j up, as a running suffix)."""
        w = self.w
        w("inext = n_q - 1")
        if not self.causal:
            add_rows("n_q - 1", "-1")
            w("inext = -1")
        with w.block("for j in range(n_k - 1, -1, -1):"):
            if self.causal:
                add_rows("inext", "j - 1")
                w(f"inext = min(inext, j - 1){note}")
            yield

    # ---- forward: thread c owns S[:, c] and a copy of z ----
    def add_keys_column(self, start: str, stop: str) -> None:
        w, nf = self.w, self.nf
        with w.block(f"for j in range({start}, {stop}):"), w.block(f"for f in range({nf}):"):
            w(f"bf = {self.Bn}[b, {self.hb}, j, f]")
            w("z[f] += bf")
            w("S[f] += bf * v[b, g, j, c]")

    def fwd(self) -> None:
        w, nf = self.w, self.nf
        w("@jit(DV)")
        with w.block(f"def attn_linear_fwd({self.base}, out, state):"):
            w('"""Linear attention per (head, batch); thread c owns column c of S."""')
            w("c = cuda.threadIdx.x")
            self.head()
            w(f"S = cuda.local.array({nf}, DT)")
            w(f"z = cuda.local.array({nf}, DT)")
            with w.block(f"for f in range({nf}):"):
                w("S[f] = ZERO")
                w("z[f] = ZERO")
            with self.keys_then_rows(self.add_keys_column, "  # mask j <= i"):
                w("den = ZERO")
                w("num = ZERO")
                with w.block(f"for f in range({nf}):"):
                    w(f"af = {self.A}[b, h, i, f]")
                    w("den += af * z[f]")
                    w("num += af * S[f]")
                if self.summed:
                    w("out[b, h, i, c] = num / den if den != ZERO else ZERO")
                else:
                    w("out[b, h, i, c] = num")
                with w.block("if c == 0:"):
                    w("state[b, h, i] = den")
        w()
        w()

    # ---- backward, thread f: dA_i[f] = S_i[f, :] . gnum_i + z_i[f] gden_i,
    #      dB_j[f] = U_j[f, :] . v_j + u_j[f] ----
    def add_keys_row(self, start: str, stop: str) -> None:
        w = self.w
        with w.block(f"for j in range({start}, {stop}):"):
            w(f"bf = {self.Bn}[b, {self.hb}, j, f]")
            w("zf += bf")
            with w.block("for cc in range(DV):"):
                w("row[cc] += bf * v[b, g, j, cc]")

    def add_rows_row(self, start: str, stop: str) -> None:
        w = self.w
        with w.block(f"for i in range({start}, {stop}, -1):"):
            self.row_grad("all")
            w(f"af = {self.A}[b, h, i, f]")
            w("uf += af * gden")
            with w.block("for cc in range(DV):"):
                w("row[cc] += af * gnum[cc]")

    def bwd_ab(self) -> None:
        w = self.w
        w(f"@jit({self.nf})")
        with w.block(f"def attn_linear_bwd_ab({self.base}, dout, out, state, d_a, d_b):"):
            w('"""dA (keys as a running prefix) and dB (rows as a running suffix, i >= j); '
              'thread f owns row f of S and U."""')
            w("f = cuda.threadIdx.x")
            self.head()
            w("row = cuda.local.array(DV, DT)  # S[f, :], then U[f, :]")
            w("gnum = cuda.local.array(DV, DT)")
            with w.block("for cc in range(DV):"):
                w("row[cc] = ZERO")
            w("zf = ZERO")
            with self.keys_then_rows(self.add_keys_row, ""):
                self.row_grad("all")
                w("acc = zf * gden")
                with w.block("for cc in range(DV):"):
                    w("acc += row[cc] * gnum[cc]")
                w("d_a[b, h, i, f] = acc")
            with w.block("for cc in range(DV):"):
                w("row[cc] = ZERO")
            w("uf = ZERO")
            with self.rows_then_keys(self.add_rows_row, "  # rows i >= j see key j"):
                w("acc = uf")
                with w.block("for cc in range(DV):"):
                    w("acc += row[cc] * v[b, g, j, cc]")
                w("d_b[b, h, j, f] = acc")
        w()
        w()

    # ---- backward, thread c: dv_j[c] = sum_f U_j[f, c] B_j[f] ----
    def add_rows_column(self, start: str, stop: str) -> None:
        w = self.w
        with w.block(f"for i in range({start}, {stop}, -1):"):
            self.row_grad("own")
            with w.block(f"for f in range({self.nf}):"):
                w(f"col[f] += {self.A}[b, h, i, f] * gnum_c")

    def bwd_v(self) -> None:
        w, nf = self.w, self.nf
        w("@jit(DV)")
        with w.block(f"def attn_linear_bwd_v({self.base}, dout, out, state, dv_h):"):
            w('"""dv per query head (summed over GQA groups on the host); thread c owns '
              'U[:, c]."""')
            w("c = cuda.threadIdx.x")
            self.head()
            w(f"col = cuda.local.array({nf}, DT)")
            with w.block(f"for f in range({nf}):"):
                w("col[f] = ZERO")
            with self.rows_then_keys(self.add_rows_column, ""):
                w("acc = ZERO")
                with w.block(f"for f in range({nf}):"):
                    w(f"acc += col[f] * {self.Bn}[b, {self.hb}, j, f]")
                w("dv_h[b, h, j, c] = acc")
        w()
        w()


def emit_module(layout: Layout, config: Config) -> str:
    return Emitter(layout, config).module()


def emit_source(spec: ir.Spec, dtype: str = "float32", config: Config | None = None) -> str:
    """The generated kernels' Python source (production tiles, feature sizes of 64 unless given)."""
    layout = make_layout(make_plan(spec))
    return emit_module(layout, fit_tiles(layout, config or Config(dtype=dtype)))

__all__ = ["Config", "emit_source", "make_layout"]
