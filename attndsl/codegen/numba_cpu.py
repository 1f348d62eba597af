"""KernelPlan -> fused Numba CPU kernels: forward, FlashAttention-2 backward, never n_q x n_k.

A call runs
  1. the NumPy `rows` prologue: row-level values (q @ W, elu(q) + 1, norm(k), ...) once per row
     (when every one is an element-wise map of q or k, `_maps_fwd` instead: one fused pass);
  2. `_attn_fwd`: tasks (batch, head, query tile), spread over the threads by
     runtime/threads; per key tile the pair reductions (BLAS GEMM tiles, or explicit feature
     loops), the logit, the mask (skipped for tiles the mask fully allows, the tile skipped
     when it allows nothing) and the online normalizer.
     A decoder step (n_q x the query heads of a key/value head <= DECODE_ROWS in
     runtime/cpu_kernel) runs `_attn_decode` instead: tasks (batch, key/value head, key
     range), the group's rows packed, feature loops instead of GEMM tiles, the ranges merged
     by `_decode_merge` through their running state (flash-decoding);
  3. backward: `_attn_bwd`, tasks (batch, head, part of the key tiles), recomputing P
     from the saved row state; no atomics; parameter gradients and the parts' query-side
     adjoints per task, summed in task order (deterministic);
  4. the NumPy `rows_backward` epilogue: adjoints of row-level values -> q, k, params
     (`_maps_bwd` for element-wise maps: one fused pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sympy as sp

from .. import functions as fn
from .. import ir, normalizers, program
from ..ir import NormKind, Side
from ..plan import (
    FeatureMap,
    KernelPlan,
    PairInput,
    corner_status_text,
    make_plan,
    scan_status_text,
    tile_status_text,
)
from ..symbolic import OFFSETS, POSITIONS, SIZES, Lookup, Reduction, S, local_subscripts
from . import numpy_ref
from .printer import KernelPrinter, integer_valued
from .source import SourceWriter

# the default query x key tile: a 64 x 128 score tile (32 KiB in float32) stays in L1; the
# kernels read the tile they run from sz[9], sz[10], chosen per machine by runtime/tiles.py
BQ, BK = 64, 128
BK_MAX = 256  # the widest key tile a kernel can run: its tile buffers' row stride
STRIP = 16  # positions per strip when a partly allowed tile is fitted to the mask's band
DK = 512  # decoding's key tile: at <= 8 rows, 4 tiles' worth of per-tile overhead in one
MAP_ROWS = 256  # rows of q or k per task of the fused feature maps (_maps_fwd, _maps_bwd)
CHUNK = 64  # rows (and keys) per chunk of causal linear attention: 64 x 64 x F GEMMs
SIZE_NAMES = ("B", "heads", "kv_heads", "n_q", "n_k", "d", "dv")


FLOAT_ROUNDING = {fn.Floor: "floor", fn.Ceil: "ceil", fn.Round: "rint"}

# Integers in float math (ALiBi's slope * (j - i)): int64 -> float has no vector instruction
# before AVX-512, so a pair loop converting one ran element by element; int32 -> float has one
# (ALiBi ran 1.06-1.13x faster with it on an AVX2 EPYC, forward and forward + backward).
# sz[11] (the launcher's `narrow`) is 1 when every position, offset and size is below
# NARROW_LIMIT; then an integer expression affine in them, whose bound
# sum |coefficient| * NARROW_LIMIT + |constant| stays below 2^31, goes through int32 exactly:
# `F(np.int32(e)) if narrow else F(e)`, with `narrow = sz[11] != 0` set once per kernel, so
# LLVM moves the test out of the loop and vectorizes the narrow copy (reading sz[11] in the
# loop instead measured slower).
NARROW_LIMIT = 2**26
_NARROWABLE = {*POSITIONS.values(), *OFFSETS.values(), *SIZES.values()}
_VARYING = {POSITIONS["i"], POSITIONS["j"]}


def narrowable(e: sp.Basic) -> bool:
    """Whether the integer expression `e` fits in int32 whenever `narrow` (sz[11]) is set (see
    NARROW_LIMIT)."""
    symbols = e.free_symbols
    if not symbols & _VARYING or not symbols <= _NARROWABLE:
        return False  # without i or j it is the same for every pair: converted once
    if not e.is_polynomial(*symbols):  # abs(i - j), max(...), floor(...): left as they are
        return False
    poly = sp.Poly(e, *sorted(symbols, key=str))
    if poly.total_degree() > 1 or not all(c.is_Integer for c in poly.coeffs()):
        return False
    constant = abs(int(poly.coeff_monomial(1)))
    linear = sum(abs(int(poly.coeff_monomial(x))) for x in symbols)
    return linear * NARROW_LIMIT + constant < 2**31


class ToFloat(sp.Function):
    """An integer-valued sub-expression used in float math: printed as F(...) (through int32
    when it is `narrowable`)."""

    nargs = 1


def floatify(e: sp.Basic) -> sp.Basic:
    """Wrap maximal integer sub-expressions of a float expression in ToFloat."""
    if isinstance(e, (sp.core.relational.Relational, sp.And, sp.Or, sp.Not,
                      sp.logic.boolalg.BooleanAtom)):
        return e  # conditions compare integers and floats as they are
    if integer_valued(e) and not (isinstance(e, (sp.Add, sp.Mul)) and e.has(*fn.ROUNDING)):
        return ToFloat(e)  # a sum with floor(x) stays float math, so a NaN x stays NaN
    if e.is_Atom:
        return e
    if isinstance(e, sp.Pow) and e.args[1].is_Integer:
        return sp.Pow(floatify(e.args[0]), e.args[1], evaluate=False)
    if isinstance(e, sp.Piecewise):
        return sp.Piecewise(*((floatify(v), c) for v, c in e.args), evaluate=False)
    return e.func(*(floatify(a) for a in e.args), evaluate=False)


class NumbaPrinter(KernelPrinter):
    """Scalar Numba code: `fx.f(x)` for functions, `F(...)` for float constants."""

    def __init__(self, names: dict[sp.Symbol, str]) -> None:
        super().__init__("fx", names)
        self.in_pow = 0  # inside a power's base or exponent: no int32 copy (see _print_Pow)

    def _print_ToFloat(self, expr: ToFloat) -> str:
        arg = expr.args[0]
        if isinstance(arg, fn.ROUNDING):  # the float form (np.floor): NaN and inf stay
            return self._rounding(FLOAT_ROUNDING[type(arg)], arg)
        text = self._print(arg)
        if narrowable(arg) and not self.in_pow:  # see NARROW_LIMIT
            return f"(F(np.int32({text})) if narrow else F({text}))"
        return f"F({text})"

    def _print_Floor(self, expr: fn.Floor) -> str:
        return self._rounding("ifloor", expr)

    def _print_Ceil(self, expr: fn.Ceil) -> str:
        return self._rounding("iceil", expr)

    def _print_Round(self, expr: fn.Round) -> str:
        return self._rounding("iround", expr)

    def _rounding(self, name: str, expr: sp.Basic) -> str:
        """An integer (subscripts, masks) or float rounding of a float argument."""
        return f"fx.{name}({self._print(floatify(expr.args[0]))})"

    def _print_Integer(self, expr: sp.Integer) -> str:
        return str(int(expr))

    def _print_Rational(self, expr: sp.Rational) -> str:
        return f"F({expr.p} / {expr.q})"

    _print_Half = _print_Rational

    def _print_Float(self, expr: sp.Float) -> str:
        return f"F({float(expr)!r})"

    def _print_SafeDiv(self, expr: fn.SafeDiv) -> str:
        return self._print(expr.rewrite(sp.Piecewise))  # a ternary: only one branch runs

    def _print_Infinity(self, expr: sp.Basic) -> str:
        return "F(np.inf)"

    def _print_NegativeInfinity(self, expr: sp.Basic) -> str:
        return "F(-np.inf)"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        # a narrow copy of a loop computing tau ** (j - i) vectorized the power, and that code
        # crashed (segmentation fault, only with optimization on); its int64 copy stays scalar
        self.in_pow += 1
        try:
            return self._print_power(expr, rational)
        finally:
            self.in_pow -= 1

    def _print_power(self, expr: sp.Pow, rational: bool) -> str:
        base, exponent = expr.args
        if exponent == -sp.S.Half:  # F(1): an int numerator would make the quotient float64
            return f"(F(1) / {self.call('sqrt', base)})"
        if exponent.is_Integer and 1 <= abs(int(exponent)) <= 4:
            text = " * ".join([self.parenthesize(base, 60)] * abs(int(exponent)))
            return f"({text})" if exponent > 0 else f"(F(1) / ({text}))"
        return super()._print_Pow(expr, rational)

    def _print_exponent(self, exponent: sp.Basic) -> str:
        return f"F({self._print(exponent)})"

    def _float_base(self, base: sp.Basic) -> str:
        return f"F({self._print(base)})"

    def _print_Relational(self, expr: sp.Basic) -> str:
        lhs, rhs = (e if integer_valued(e) else floatify(e) for e in (expr.lhs, expr.rhs))
        return f"({self._print(lhs)} {expr.rel_op} {self._print(rhs)})"  # exp(i - j) < 1: F(i)

    def _print_And(self, expr: sp.And) -> str:
        return "(" + " and ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr: sp.Or) -> str:
        return "(" + " or ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr: sp.Not) -> str:
        return f"(not {self._print(expr.args[0])})"

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        (value, cond), *rest = expr.args
        if not rest or cond == sp.true:
            return self._print(value)
        return f"({self._print(value)} if {self._print(cond)} else " \
               f"{self._print(sp.Piecewise(*rest))})"

    def _print_Max(self, expr: sp.Max) -> str:
        name = "max" if integer_valued(expr) else "fx.maximum"  # max(z // w, 1): SymPy unsure
        return self._fold_call(name, expr.args)

    def _print_Min(self, expr: sp.Min) -> str:
        name = "min" if integer_valued(expr) else "fx.minimum"
        return self._fold_call(name, expr.args)

    def _print_Abs(self, expr: sp.Abs) -> str:
        arg = expr.args[0]
        return f"abs({self._print(arg)})" if integer_valued(arg) else self.call("abs", arg)

    def _fold_call(self, name: str, args: tuple[sp.Basic, ...]) -> str:
        text = self._print(args[0])
        for arg in args[1:]:
            text = f"{name}({text}, {self._print(arg)})"
        return text


# ---- layouts of the kernel's row-level inputs -----------------------------------------------


def input_name(item: PairInput) -> str:
    if item.is_raw_query:
        return "q"
    if item.is_raw_key:
        return "k"
    return f"in_{numpy_ref.variable(item.node)}"


def adjoint_name(item: PairInput) -> str:
    return f"d_{numpy_ref.variable(item.node)}"


def element(item: PairInput, feature: str | None = None) -> str:
    """The kernel expression reading one element of an input (at b, h, i or j, feature)."""
    name = input_name(item)
    row = {Side.QUERY: ", i", Side.KEY: ", j", Side.CONST: ""}[item.side]
    head = "hk" if item.is_raw_key else "h"
    feat = f", {feature}" if feature is not None else ""
    return f"{name}[b, {head}{row}{feat}]"


class CpuEmitter:
    def __init__(self, plan: KernelPlan, dtype: str) -> None:
        self.plan = plan
        self.deriv = plan.deriv
        self.dtype = dtype
        self.w = SourceWriter()
        names: dict[sp.Symbol, str] = {s: n for n, s in POSITIONS.items()}
        # positions i, j are pi = qo + i, pj = ko + j: i and j index the call's rows and keys
        names.update({POSITIONS["i"]: "pi", POSITIONS["j"]: "pj", OFFSETS["q"]: "qo",
                      OFFSETS["k"]: "ko"})
        names.update({s: n for n, s in SIZES.items()})
        for r in plan.gemms + plan.loops:
            names[r.symbol] = r.name
        for lookup in plan.lookups:
            names[lookup.symbol] = lookup.name
        self.names_of = {node.symbol: node.name for node in plan.gemms + plan.loops + plan.lookups}
        for item in plan.inputs:
            names[item.node.symbol] = element(item, "f" if item.is_vector else None)
        names[S] = "xv"
        self.p = NumbaPrinter(names)
        self.params = [p.name for p in self.deriv.spec.params]
        self.indices = [x.name for x in self.deriv.spec.indices]
        self.fold = self._find_fold()
        self.levels = self._lookup_levels()
        self.fwd_steps = program.forward_steps(plan)
        self.bwd_steps = program.backward_steps(plan)
        self.norm = next(s.norm for s in self.fwd_steps if isinstance(s, program.Accumulate))
        self.logit = next(s.value for s in self.fwd_steps if isinstance(s, program.Logit))
        self.mask = next((s.mask for s in self.fwd_steps if isinstance(s, program.Allow)), None)
        # a row's allowed keys are one run, found by `row_band` (no lookups per pair to check)
        self.convex = plan.convex_rows and 2 not in self.levels.values()
        self.bands_known = False  # while emitting the forward's pair loops: band_lo, band_hi
        # a partly allowed tile's GEMMs run over each row's run only (micro_gemm_band, keys in
        # panels): a causal diagonal tile needs about half of its products
        self.banded = self.mask is not None and self.convex and bool(plan.gemms)

    def _find_fold(self) -> tuple[int, sp.Basic, sp.Basic] | None:
        """(n, c, rest) when logit = c * r_n + rest with c constant per call (sizes, numbers
        only) and rest free of r_n: the GEMM then computes c * r_n (times log2 e for softmax)
        through its alpha, and no per-pair multiply or copy of r_n remains."""
        d = self.deriv
        sizes = set(SIZES.values())
        for n, r in enumerate(self.plan.gemms):
            c = sp.diff(d.logit, r.symbol)
            if c == 0 or not c.free_symbols <= sizes or c.is_finite is False:
                continue
            if d.mask is not None and r.symbol in d.mask.free_symbols:
                continue
            if d.norm_expr is not None and r.symbol in d.norm_expr.free_symbols:
                continue
            if r.symbol in self.plan.nested:  # a loop reads it per pair: no fold
                continue
            rest = d.logit.xreplace({r.symbol: sp.S.Zero})
            if r.symbol in rest.free_symbols or sp.simplify(d.logit - c * r.symbol - rest) != 0:
                continue
            return n, c, rest
        return None

    def _lookup_levels(self) -> dict[str, int]:
        """Where a lookup is read: 0 once per tile (no i, j), 1 per query row (i), 2 per pair."""
        levels: dict[str, int] = {}
        by_symbol = {x.symbol: x for x in self.plan.lookups}
        i, j = POSITIONS["i"], POSITIONS["j"]
        for x in self.plan.lookups:  # subscripts refer to earlier lookups only
            level = 0
            for sub in x.subscripts:
                for symbol in sp.sympify(sub).free_symbols:
                    if symbol == j:
                        level = 2
                    elif symbol == i:
                        level = max(level, 1)
                    elif symbol in by_symbol:
                        level = max(level, levels.get(by_symbol[symbol].name, 2))
            levels[x.name] = level
        return levels

    def lookups_at(self, level: int, err: str) -> None:
        for x in self.plan.lookups:
            if self.levels[x.name] == level:
                self.lookup_read(x, err)

    @property
    def softmax(self) -> bool:
        return self.deriv.norm is NormKind.SOFTMAX

    def fold_alpha(self) -> None:
        """The folded constant, once per call: c (the adjoint GEMMs' alpha) and c * log2 e."""
        if self.fold is not None:
            self.w(f"c_fold = F({self.fl(self.fold[1])})")
            self.w("alpha_fold = c_fold * LOG2E" if self.softmax else "alpha_fold = c_fold")

    def fl(self, e: sp.Basic) -> str:
        """A float expression."""
        return self.p.doprint(floatify(e))

    def it(self, e: sp.Basic) -> str:
        """An integer or boolean expression."""
        return self.p.doprint(e)

    # ---- the module ----
    def module(self) -> str:
        w, d = self.w, self.deriv
        w(f'"""attndsl Numba CPU kernels for \'{d.spec.name}\', {self.dtype} '
          '(generated; do not edit).')
        w()
        w(f"x       = {sp.sstr(d.logit)}")
        w(f"allowed = {sp.sstr(d.mask) if d.mask is not None else 'every key'}")
        w(f"weights = {d.norm.value if d.norm_expr is None else sp.sstr(d.norm_expr)}")
        w('"""')
        w()
        w("import math")
        w()
        w("import numpy as np")
        w("from numba import njit")
        w()
        # exp2_f32/_f64 directly: the generic `exp2` overload, inlined at two call sites of one
        # function, trips Numba's SSA check (NumbaIRAssumptionWarning)
        w("from attndsl.runtime.cpu_intrinsics import FASTMATH, PANEL, NoAliasCompiler, "
          "all_finite, band_panels, exp2_shift_sum, gemm_skip_zero, gemm_unchecked, micro_gemm, "
          "micro_gemm_band, row_max, rows_dot_keys, rows_mix_values")
        w(f"from attndsl.runtime.cpu_intrinsics import exp2_f{self.dtype[-2:]} as exp2")
        w("from attndsl.runtime import numba_funcs as fx")
        w()
        w(f"F = np.{self.dtype}")
        w(f"BKS = {BK_MAX}  # the tile buffers' row stride: the widest key tile (a constant, "
          "so LLVM can prove buffer indices non-negative and vectorize)")
        w(f"DK = {DK}  # decoding's key tile")
        if self.deriv.mask is not None:
            w(f"STRIP = {STRIP}  # positions per strip when a tile is fitted to the mask's band")
        if self.plan.linear_path:
            w(f"CHUNK = {CHUNK}  # rows (and keys) per chunk of the linear path")
        if self.plan.feature_maps:
            w(f"MAP_ROWS = {MAP_ROWS}  # rows of q or k per task of the feature maps")
        w("LOG2E = F(1.4426950408889634)")
        w("NEG_INF = F(-np.inf)")
        w("# NumPy's error model: x / 0 is inf or NaN and n // 0 is 0. Numba's default tests "
          "every divisor")
        w("# (to raise), and that branch keeps LLVM from vectorizing loops that divide (fx.tanh).")
        w("# nogil, not parallel: each kernel runs the tasks [lo, hi) it is given, on the threads")
        w("# of runtime/threads.py (Numba's parfors would double the compile time)")
        w('KERNEL = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy",')
        w("              pipeline_class=NoAliasCompiler)  # outputs never alias inputs")
        w()
        w()
        self.tile_status()
        if self.deriv.mask is not None:
            self.band_fit("keys")
            self.band_fit("queries")
        self.forward()
        if not self.plan.linear_path:
            self.decode()
        self.backward()
        if self.plan.linear_path:
            self.linear()
        if self.plan.feature_maps:
            self.maps()
        return w.text()

    def signature(self, name: str, outputs: list[str], tiled: bool = True) -> str:
        inputs = [input_name(i) for i in self.plan.inputs if not (i.is_raw_query
                                                                     or i.is_raw_key)]
        if tiled:  # each GEMM's key-side operand in the layout sz[12] names (see gemm_tiles):
            # transposed [B, H', F, n_k], the operand itself (unread), or packed in panels
            inputs += [f"kt{n}" for n in range(len(self.plan.gemms))]
            if self.plan.gemms:  # with the keys in panels: v too, [B, H', dv / PANEL, n_k,
                inputs.append("vp")  # PANEL] (else empty; see forward)
        args = ["lo", "hi", "sz", "qoff", "koff", "q", "k", "v", *inputs,
                *(f"p_{n}" for n in self.params), *(f"x_{n}" for n in self.indices), *outputs]
        return f"def {name}({', '.join(args)}):"

    def unpack_sizes(self) -> None:
        self.w("B, heads, kv_heads, n_q, n_k, d, dv = sz[0], sz[1], sz[2], sz[3], sz[4], "
               "sz[5], sz[6]")
        self.w("narrow = sz[11] != 0  # integers in float math go through int32 (NARROW_LIMIT)")

    def tile_sizes(self) -> None:
        self.w("BQ, BK = sz[9], sz[10]  # the query x key tile, chosen per machine "
               "(runtime/tiles.py); BK <= BKS")
        if self.plan.gemms:
            self.w("keys = sz[12]  # the key operands' layout (runtime/tiles.py): 0 kt<n> "
                   "transposed, 1 as stored (NT), 2 kt<n> packed in panels (micro_gemm)")

    def mixing_gemm(self, args: str, micro: tuple[str, str] | None = None,
                    runs: str = "band_lo, band_hi, 1") -> None:
        """A GEMM summing over pairs, the pair tile (weights or adjoints, 0 where masked or
        where `where` took the other branch) as A: with a NaN or inf among the row operands
        (sz[8], set by the launcher) it skips the zero terms, so 0 * NaN never spreads.
        `micro`: (the product's columns, micro_gemm's arguments for it): run with the keys in
        panels when the columns fill whole panels; on a partly allowed tile (self.banded) each
        row strip sums over its `runs` only (micro_gemm_band's lo, hi, per)."""
        w = self.w
        with w.block("if sz[8]:"):
            w(f"gemm_skip_zero({args})")
        if micro is not None and self.plan.gemms:  # else no key layout to choose
            columns, micro_args = micro
            with w.block(f"elif keys == 2 and {columns} % PANEL == 0:"):
                self.micro_call(micro_args, f"{runs}, True")
        with w.block("else:"):
            w(f"gemm_unchecked({args})")

    def micro_call(self, args: str, runs: str) -> None:
        """micro_gemm(args); on a partly allowed tile (self.banded) micro_gemm_band over each
        row strip's `runs` (its lo, hi, per, depth)."""
        w = self.w
        if not self.banded:
            w(f"micro_gemm({args})")
            return
        with w.block("if status == 1:  # partly allowed: each row strip's run only"):
            w(f"micro_gemm_band({args}, {runs})")
        with w.block("else:"):
            w(f"micro_gemm({args})")

    def tile_bands(self, err: str, panels: bool) -> None:
        """On a partly allowed tile (self.banded): band_lo, band_hi = each row's run of keys
        (`row_band`), and with `panels` panel_lo, panel_hi = the rows whose runs reach each
        panel of PANEL keys (the transposed products' runs)."""
        if not self.banded:
            return
        w = self.w
        with w.block("if status == 1:  # each row's run of allowed keys: its GEMMs' span"):
            with w.block("for ii in range(mq):"):
                w("i = i0 + ii")
                w("pi = qo + i")
                self.lookups_at(1, err)
                self.row_band()
                w("band_lo[ii], band_hi[ii] = j_lo, j_hi")
            if panels:
                w("band_panels(band_lo, band_hi, mq, nk, panel_lo, panel_hi)")

    def band_buffers(self, panels: bool) -> None:
        """A task's buffers for `tile_bands` (with `panels`, the key panels' runs too)."""
        if not self.banded:
            return
        w = self.w
        w("band_lo = np.empty(BQ, np.int64)  # a partly allowed tile's row runs [lo, hi) of keys")
        w("band_hi = np.empty(BQ, np.int64)")
        if panels:
            w("panel_lo = np.empty(BKS // PANEL, np.int64)  # ... and each key panel's run of "
              "rows")
            w("panel_hi = np.empty(BKS // PANEL, np.int64)")

    # ---- masks ----
    def tile_status(self) -> None:
        """0: the mask allows no pair of the tile, 1: some, 2: every pair."""
        w, d = self.w, self.deriv
        lookups = [x for x in self.plan.lookups if x.symbol in (d.mask.free_symbols
                                                                 if d.mask is not None else ())]
        args = ["sz", "qo", "ko", "b", "h", "i0", "i1", "j0", "j1",
                *(f"p_{n}" for n in self.params),
                *(f"x_{n}" for n in self.indices)]
        w("@njit(inline='always')")
        with w.block(f"def _tile_status({', '.join(args)}):"):
            w('"""Over positions [i0, i1) x [j0, j1): linear mask atoms decided from the tile')
            w('corners; the others (doc[i] == doc[j], i // width) summarized by scanning the tile')
            w('when the linear ones leave it open."""')
            if d.mask is None:
                w("return 2")
                w()
                w()
                return
            self.unpack_sizes()
            w("i_first, i_last, j_first, j_last = i0, i1 - 1, j0, j1 - 1")
            states = {}
            scanned = []
            for n, atom in enumerate(self.plan.mask_atoms):
                relation = atom.relation
                name = f"a{n}"
                states[relation] = name
                const_lookups = [x for x in lookups if x.symbol in relation.free_symbols]
                if not atom.linear:
                    w(f"{name} = 1  # {sp.sstr(relation)}: scanned below if it matters")
                    scanned.append((n, relation))
                    continue
                for x in const_lookups:
                    self.lookup_read(x, "", check=True, on_error="return 1  # reported per pair")
                corners = " + ".join(f"int({self.it(c)})" for c in atom.corners())
                w(f"c{n} = {corners}")
                w(f"{name} = {corner_status_text(f'c{n}')}  # {sp.sstr(relation)}")
            if scanned:
                w(f"open_ = {tile_status_text(d.mask, states)}")
                with w.block("if open_ != 1:"):
                    w("return open_  # decided by the linear atoms alone")
            for n, relation in scanned:
                pair_lookups = [x for x in lookups if x.symbol in relation.free_symbols]
                w(f"t{n} = 0")
                w(f"f{n} = 0")
                with w.block("for pi in range(i0, i1):"):
                    with w.block("for pj in range(j0, j1):"):
                        for x in pair_lookups:
                            self.lookup_read(x, "", check=True,
                                             on_error="return 1  # reported per pair")
                        with w.block(f"if {self.it(relation)}:"):
                            w(f"t{n} += 1")
                        with w.block("else:"):
                            w(f"f{n} += 1")
                        with w.block(f"if t{n} and f{n}:"):
                            w("break")
                    with w.block(f"if t{n} and f{n}:"):
                        w("break")
                w(f"a{n} = {scan_status_text(f't{n}', f'f{n}')}  # {sp.sstr(relation)}")
            w(f"return {tile_status_text(d.mask, states)}")
        w()
        w()

    def band_fit(self, axis: str) -> None:
        """`_fit_keys` / `_fit_queries`: a tile the mask partly allows, fitted to the mask's
        band along one axis. A sliding window's aligned tiles hold about half masked pairs;
        started at the first strip of STRIP positions with an allowed pair and ended after
        the last, a tile computes few of them (issue 12 item 5). Any mask: the strips are
        judged by `_tile_status`, which only answers 0 when no pair is allowed."""
        w = self.w
        keys = axis == "keys"
        lo, hi, size = ("j0", "j1", "n_k") if keys else ("i0", "i1", "n_q")

        def status(start: str, stop: str) -> str:
            rows = "qo + i0, qo + i1" if keys else f"qo + {start}, qo + {stop}"
            cols = f"ko + {start}, ko + {stop}" if keys else "ko + j0, ko + j1"
            return f"_tile_status(sz, qo, ko, b, h, {rows}, {cols}{self.extra_args()})"

        w("@njit(inline='always')")
        with w.block(f"def _fit_{axis}(sz, qo, ko, b, h, i0, i1, j0, j1, width"
                     f"{self.extra_args()}):"):
            other = "query rows [i0, i1)" if keys else "key columns [j0, j1)"
            w(f'"""The {axis} [{lo}, {hi}) of a partly allowed tile (against the {other}), '
              f'fitted: from')
            w(f"the first strip of STRIP {axis} with an allowed pair, `width` {axis} on (at most "
              f"to {size}),")
            w('less the trailing strips with none. Returns the fitted [start, stop) and its '
              'status."""')
            w(f"{size} = sz[{SIZE_NAMES.index(size)}]")
            with w.block(f"while {lo} + STRIP < {hi} and "
                         f"{status(lo, f'{lo} + STRIP')} == 0:"):
                w(f"{lo} += STRIP")
            w(f"{hi} = min({lo} + width, {size})")
            with w.block(f"while {hi} - STRIP >= {lo} + STRIP and "
                         f"{status(f'{hi} - STRIP', hi)} == 0:"):
                w(f"{hi} -= STRIP")
            w(f"return {lo}, {hi}, {status(lo, hi)}")
        w()
        w()

    # ---- per-pair code ----
    def lookup_read(self, x: Lookup, err: str, check: bool = True, on_error: str = "") -> None:
        w = self.w
        array = f"p_{x.array}" if x.is_param else f"x_{x.array}"
        subs = [self.it(s) for s in local_subscripts(self.deriv.spec, x.array, x.subscripts)]
        lead = [] if x.is_param else ["b"]
        if x.is_param and not subs:
            w(f"{x.name} = {array}[0]")
            return
        names = []
        for axis, sub in enumerate(subs):
            name = f"{x.name}_s{axis}"
            names.append(name)
            w(f"{name} = {sub}")
        if check and names:  # a scalar index (`index L`) has no subscript to check
            offset = len(lead)
            bad = " or ".join(f"{n} < 0 or {n} >= {array}.shape[{axis + offset}]"
                              for axis, n in enumerate(names))
            ident = self.plan.lookups.index(x) + 1
            with w.block(f"if {bad}:"):
                if on_error:
                    w(on_error)
                else:
                    w(f"{err} = {ident}  # subscript out of range: reported by the launcher")
                    for axis, n in enumerate(names):
                        w(f"{n} = 0")
        w(f"{x.name} = {array}[{', '.join(lead + names)}]")

    def pair_values(self, err: str, decoding: bool = False) -> None:
        """Locals for one pair (ii, jj): lookups, GEMM tile values, explicit loops. Decoding
        (pair jj of row r) has tiles only of the GEMMs against k itself (`decode_tiles`)."""
        w = self.w
        self.lookups_at(2, err)
        for step in self.fwd_steps:
            if not isinstance(step, program.Reduce):
                continue
            r = step.reduction
            n = self.plan.gemms.index(r) if step.gemm else -1
            if decoding and n in self.decoded_gemms():
                w(f"{r.name} = s{n}[xo + jj]")
                continue
            if step.gemm and not decoding:  # computed for the whole tile by gemm_tiles
                if self.fold is None or self.fold[0] != n:
                    w(f"{r.name} = s{n}[ii * BKS + jj]")
                continue
            w(f"{r.name} = F(0)")
            with w.block(f"for f in range({self.feature_size(r)}):"):
                w(f"{r.name} += {self.fl(r.body)}")

    def feature_size(self, r: Reduction) -> str:
        for symbol in sorted(r.body.free_symbols, key=str):  # sets: per-process order
            item = self.plan.input_for(symbol)
            if item is not None and item.is_vector:
                return f"{input_name(item)}.shape[-1]"
        raise AssertionError(f"no vector in the body of {r.name}")

    def gemm_tiles(self, folded: str = "s0") -> None:
        """s<n>[ii, jj] = sum_f a[b, h, i0 + ii, f] * b[b, h', j0 + jj, f] for each GEMM; the
        folded one (see _find_fold) as alpha_fold * r into `folded`."""
        w = self.w
        for n, r in enumerate(self.plan.gemms):
            a, bvec = (self.plan.input_for(v.symbol) for v in r.gemm)  # type: ignore[union-attr]
            assert a is not None and bvec is not None
            target, alpha = f"s{n}", "F(1)"
            if self.fold is not None and self.fold[0] == n:
                target, alpha = folded, "alpha_fold"
            # The key operand as stored (an NT sgemm), transposed by the launcher
            # (kt<n>[b, h', f, j]: an NN sgemm with k = d short) or packed by it in panels
            # (kt<n>[b, h', j // PANEL, f, j % PANEL], for micro_gemm: j0 is a multiple of
            # PANEL, as BK and STRIP are), whichever ran fastest on this machine: NN 1.3x faster
            # than NT on an AVX-512 Xeon, NT as fast and no copy on an EPYC, micro_gemm ahead
            # of both there.
            head = "hk" if bvec.is_raw_key else "h"
            rows = (f"mq, nk, {input_name(a)}.shape[3], {alpha}, {input_name(a)}, "
                    f"{self.row_offset(a, 'i0')}, {input_name(a)}.shape[3]")
            with w.block("if keys == 1:"):
                w(f"gemm_unchecked(False, True, {rows}, {input_name(bvec)}, "
                  f"{self.row_offset(bvec, 'j0')}, {input_name(bvec)}.shape[3], F(0), "
                  f"{target}, 0, BKS)")
            with w.block("elif keys == 2:"):
                self.micro_call(f"{rows}, 1, kt{n}, ((b * kt{n}.shape[1] + {head}) * "
                                f"kt{n}.shape[2] + j0 // PANEL) * kt{n}.shape[3] * PANEL, PANEL, "
                                f"kt{n}.shape[3] * PANEL, False, {target}, 0, BKS",
                                "band_lo, band_hi, 1, False")
            with w.block("else:"):
                w(f"gemm_unchecked(False, False, {rows}, kt{n}, "
                  f"(b * kt{n}.shape[1] + {head}) * kt{n}.shape[2] * kt{n}.shape[3] + j0, "
                  f"kt{n}.shape[3], F(0), {target}, 0, BKS)")

    def row_offset(self, item: PairInput, start: str) -> str:
        name = input_name(item)
        head = "hk" if item.is_raw_key else "h"
        return f"((b * {name}.shape[1] + {head}) * {name}.shape[2] + {start}) * {name}.shape[3]"

    def mask_expr(self) -> str:
        assert self.mask is not None
        return self.it(self.mask)

    # ---- forward ----
    def forward(self) -> None:
        w, d, plan = self.w, self.deriv, self.plan
        softmax = d.norm is NormKind.SOFTMAX
        w("@njit(**KERNEL)")
        sink = ["sink_rows"] if self.deriv.sink is not None else []  # [B, H, n_q], the host's
        with w.block(self.signature("_attn_fwd", ["out", "state", *sink, "err"])):
            w(f'"""out = normalize(x) @ v per (batch, head, query tile); state = '
              f'{"lse" if softmax else "the row sum" if d.norm is NormKind.SUM else "unused"}."""')
            self.unpack_sizes()
            self.tile_sizes()
            self.fold_alpha()
            w("group = heads // kv_heads")
            w("n_tiles = (n_q + BQ - 1) // BQ")
            with w.block("for task in range(lo, hi):  # of the B * heads * n_tiles (query tiles)"):
                w("b, h, qt = task // (heads * n_tiles), (task // n_tiles) % heads, task % n_tiles")
                w("qo, ko = qoff[b], koff[b]  # position = offset + row (or column)")
                w("hk = h // group")
                w("i0 = qt * BQ")
                w("mq = min(BQ, n_q - i0)")
                for n in range(len(plan.gemms)):
                    if self.fold is None or self.fold[0] != n:
                        w(f"s{n} = np.empty(BQ * BKS, F)  # GEMM tile of {plan.gemms[n].name}")
                w("x = np.empty(BQ * BKS, F)  # logits, then weights")
                w("acc = np.zeros(BQ * dv, F)")
                if d.norm is not NormKind.SOFTMAX:
                    w("keep = np.empty(BQ * BKS, np.uint8)  # 1 where the mask allows the pair")
                if softmax:
                    w("m = np.full(BQ, NEG_INF, F)  # running max (base 2)")
                w("l = np.zeros(BQ, F)  # running normalizer")
                self.band_buffers(panels=False)
                w("bad = 0")
                w("j_next = 0")
                with w.block("while j_next < n_k:  # the key tiles, in order"):
                    w("j0 = j_next")
                    w("nk = min(BK, n_k - j0)")
                    w("j_next = j0 + nk")
                    w(f"status = _tile_status(sz, qo, ko, b, h, qo + i0, qo + i0 + mq, ko + j0, "
                      f"ko + j0 + nk"
                      f"{self.extra_args()})")
                    with w.block("if status == 0:"):
                        w("continue  # the mask allows no pair of this tile")
                    if d.mask is not None:
                        with w.block("if status == 1:  # fitted to the band (it may end past "
                                     "j0 + BK)"):
                            w(f"j0, j_next, status = _fit_keys(sz, qo, ko, b, h, i0, i0 + mq, "
                              f"j0, j_next, BK{self.extra_args()})")
                            w("nk = j_next - j0")
                            with w.block("if status == 0:"):
                                w("continue  # fitted: its strips show no allowed pair after all")
                    self.lookups_at(0, "bad")
                    self.tile_bands("bad", panels=False)
                    self.gemm_tiles("x")
                    self.bands_known = self.banded
                    self.logits_tile("bad")
                    self.bands_known = False
                    self.normalize_tile()
                    w("# acc += P @ v[b, hk, j0:j0 + nk]")
                    values = "v, ((b * kv_heads + hk) * n_k + j0) * dv, dv"
                    # v packed in panels of PANEL columns (each a contiguous n_k x PANEL block,
                    # streamed in order: read as stored, 256 bytes apart, the same product ran
                    # 10% slower than OpenBLAS's)
                    micro = ("mq, dv, nk, F(1), x, 0, BKS, 1, vp, ((b * kv_heads + hk) * "
                             "(dv // PANEL) * n_k + j0) * PANEL, PANEL, n_k * PANEL, True, acc, "
                             "0, dv")
                    self.mixing_gemm(f"False, False, mq, dv, nk, F(1), x, 0, BKS, {values}, "
                                     "F(1), acc, 0, dv", micro=("dv", micro))
                w("err[task] = bad")
                self.finish_rows()
        w()
        w()

    def extra_args(self) -> str:
        names = [f"p_{n}" for n in self.params] + [f"x_{n}" for n in self.indices]
        return "".join(f", {n}" for n in names)

    def logit_value(self, buffer: str) -> str:
        """The logit of pair (ii, jj), in base 2 for softmax; `buffer` holds the folded GEMM."""
        if self.fold is None:
            text = self.fl(self.logit)
            return f"({text}) * LOG2E" if self.softmax else text
        here = f"{buffer}[ii * BKS + jj]"
        rest = self.fold[2]
        if rest == 0:
            return here
        return f"{here} + ({self.fl(rest)}) * LOG2E" if self.softmax else \
            f"{here} + {self.fl(rest)}"

    def row_band(self) -> None:
        """[j_lo, j_hi): the keys of tile row ii that the mask allows, one run when
        self.convex (i and pi set). j_lo by scanning from the left; then the mask holds on
        [j_lo, j_hi) and on no key after it, so j_hi is a binary search: a sliding window's
        fitted tile or a causal diagonal tile tests a few pairs per row, not all of them."""
        w = self.w
        if self.bands_known:  # found before the tile's GEMMs (tile_bands)
            w("j_lo, j_hi = band_lo[ii], band_hi[ii]  # the row's allowed keys (tile_bands)")
            return
        w("j_lo = nk  # the row's allowed keys: one run [j_lo, j_hi) (plan.convex_rows)")
        with w.block("for jj in range(nk):"):
            w("j = j0 + jj")
            w("pj = ko + j")
            with w.block(f"if {self.mask_expr()}:"):
                w("j_lo = jj")
                w("break")
        w("j_hi, j_end = min(j_lo + 1, nk), nk  # allowed before j_hi, none from j_end on")
        with w.block("while j_hi < j_end:"):
            w("jj = (j_hi + j_end) // 2")
            w("j = j0 + jj")
            w("pj = ko + j")
            with w.block(f"if {self.mask_expr()}:"):
                w("j_hi = jj + 1")
            with w.block("else:"):
                w("j_end = jj")
        # LLVM cannot tell that j_lo and j_hi are never negative: without this, Numba's
        # wraparound of negative indices stays in the loops over them, unvectorized
        w("j_lo, j_hi = max(j_lo, 0), max(j_hi, 0)  # never negative: the loops vectorize")

    def pair_loops(self, body, masked_body=None,  # type: ignore[no-untyped-def]
                   masked_out=None) -> None:
        """The (ii, jj) loops of a tile: separate loops for tiles the mask fully allows
        (status 2: no mask test, branch-free, vectorizable) and partly allows (status 1).
        `masked_out(part)`, where given and self.convex, is a pair the mask disallows: a
        partly allowed row then runs `body` over its band (`row_band`) and `masked_out`
        before and after it, with no mask test per pair."""
        w = self.w
        banded = self.mask is not None and self.convex and masked_out is not None
        variants = [(None, body)] if self.mask is None else \
            [("if status == 2:", body), ("else:", masked_body)]
        for head, emit in variants:
            with w.block(head) if head else _nothing(), w.block("for ii in range(mq):"):
                w("i = i0 + ii")
                w("pi = qo + i")
                self.lookups_at(1, "bad")
                emit("row")
                if banded and emit is masked_body:
                    self._band_loops(body, masked_out)
                else:
                    with w.block("for jj in range(nk):"):
                        w("j = j0 + jj")
                        w("pj = ko + j")
                        self.pair_values("bad")
                        emit("pair")
                emit("row_end")

    def _band_loops(self, body, masked_out) -> None:  # type: ignore[no-untyped-def]
        """A partly allowed row of a convex mask: `body` over its band, `masked_out` on the
        keys before and after it (the status 2 loops stay apart: over range(nk), LLVM
        vectorizes them better than over a band that happens to be the whole tile)."""
        w = self.w
        self.row_band()
        for head, emit, values in (("for jj in range(j_lo):", masked_out, False),
                                   ("for jj in range(j_lo, j_hi):", body, True),
                                   ("for jj in range(j_hi, nk):", masked_out, False)):
            with w.block(head):
                if values:
                    w("j = j0 + jj")
                    w("pj = ko + j")
                    self.pair_values("bad")
                emit("pair")

    def logits_tile(self, err: str) -> None:
        """x[ii, jj] = the logit; masked pairs -inf (softmax) or weight 0 via `keep`."""
        w = self.w
        value = self.logit_value("x")
        if self.softmax:
            def full(part: str) -> None:
                if part == "pair":
                    w(f"x[ii * BKS + jj] = {value}")

            def masked(part: str) -> None:
                if part == "pair":
                    w(f"x[ii * BKS + jj] = {value} if {self.mask_expr()} else NEG_INF")

            def masked_out(part: str) -> None:
                if part == "pair":
                    w("x[ii * BKS + jj] = NEG_INF")

            if value == "x[ii * BKS + jj]":  # the GEMM wrote the logits: only mask them
                if self.mask is not None and self.convex:
                    with w.block("if status == 1:"), w.block("for ii in range(mq):"):
                        w("i = i0 + ii")
                        w("pi = qo + i")
                        self.lookups_at(1, err)
                        self.row_band()
                        for head in ("for jj in range(j_lo):", "for jj in range(j_hi, nk):"):
                            with w.block(head):
                                w("x[ii * BKS + jj] = NEG_INF")
                elif self.mask is not None:
                    with w.block("if status == 1:"), w.block("for ii in range(mq):"):
                        w("i = i0 + ii")
                        w("pi = qo + i")
                        self.lookups_at(1, err)
                        with w.block("for jj in range(nk):"):
                            w("j = j0 + jj")
                            w("pj = ko + j")
                            self.pair_values(err)
                            with w.block(f"if not {self.mask_expr()}:"):
                                w("x[ii * BKS + jj] = NEG_INF")
                return
            self.pair_loops(full, masked, masked_out)
            return

        def keep(part: str, masked: bool) -> None:
            if part == "pair":
                w(f"xv = {value}")
                mask = self.mask_expr() if masked else "True"
                w(f"keep[ii * BKS + jj] = 1 if ({mask}) else 0")
                w("x[ii * BKS + jj] = xv")

        def keep_out(part: str) -> None:
            if part == "pair":
                w("keep[ii * BKS + jj] = 0")

        self.pair_loops(lambda part: keep(part, False), lambda part: keep(part, True), keep_out)

    def normalize_tile(self) -> None:
        """The Accumulate step over a tile: x becomes the weights ACC, l the running state."""
        w, norm = self.w, self.norm
        if norm.rescale is not None:
            # the strategy's online update (rescale exp(M - M_NEW), ACC = exp(X - M), L + ACC),
            # in base 2 by the tile intrinsics: row_max, then exp2_shift_sum writes the weights
            w("# online softmax in base 2: rescale acc and l by 2^(m_old - m_new)")
            with w.block("for ii in range(mq):"):
                self.online_softmax_row("ii", "ii * BKS")
            return
        with w.block("for ii in range(mq):"), w.block("for jj in range(nk):"):
            w("xv = x[ii * BKS + jj]")
            with w.block("if keep[ii * BKS + jj] == 0:  # masked: weight 0"):
                w("x[ii * BKS + jj] = F(0)")
                w("continue")
            local = {normalizers.X: "xv", normalizers.Z: "l[ii]",
                     normalizers.ACC: "x[ii * BKS + jj]"}
            named = {symbol: sp.Symbol(name) for symbol, name in local.items()}
            if norm.accumulate != normalizers.X:  # element-wise: f(x), which may read i, j
                w("pi, pj = qo + i0 + ii, ko + j0 + jj")
                w(f"x[ii * BKS + jj] = {self.fl(norm.accumulate.xreplace(named))}")
            for symbol, value in norm.update:
                w(f"{local[symbol]} = {self.fl(value.xreplace(named))}")

    def online_softmax_row(self, row: str, at: str) -> None:
        """Row `row`'s logits x[at:at + nk] become its weights 2^(x - m_new); l, m and its acc
        row follow (a row still without an allowed key goes on to the next)."""
        w = self.w
        w(f"m_new = max(m[{row}], row_max(x, {at}, nk))")
        with w.block("if m_new == NEG_INF:  # nothing allowed yet in this row, but the max "
                     "skips NaN:"):
            w(f"l[{row}] += exp2_shift_sum(x, {at}, nk, F(0))  # 0, or NaN from a NaN logit")
            w("continue")
        w(f"l[{row}] = l[{row}] * exp2(m[{row}] - m_new) + exp2_shift_sum(x, {at}, nk, m_new)")
        with w.block(f"if m_new != m[{row}]:  # rescale acc by 2^(m_old - m_new)"):
            w(f"alpha = exp2(m[{row}] - m_new)")
            with w.block(f"for c in range({row} * dv, ({row} + 1) * dv):  # no slice: "
                         "`a[s] *= x` allocates"):
                w("acc[c] *= alpha")
            w(f"m[{row}] = m_new")

    def finish_rows(self) -> None:
        """out = scale * acc and the saved row state, from the normalizer's finish."""
        w = self.w
        with w.block("for ii in range(mq):"):
            self.finish_row("m[ii]", "l[ii]", "i0 + ii")
            with w.block("for c in range(dv):"):
                w("out[b, h, i0 + ii, c] = acc[ii * dv + c] * inv")

    def finish_row(self, m: str, l: str, row: str) -> None:
        """`inv` (the factor of acc) and state[b, h, row] of one row, from its running max `m`
        (base 2) and normalizer `l`: the normalizer's finish."""
        w, norm = self.w, normalizers.of(self.deriv)
        # l is > 0, 0 (an empty row: out = 0, lse = -inf) or NaN (a NaN or +inf logit at an
        # allowed pair: out and lse NaN): the finish tests `!= 0`, which keeps the NaN
        running = {normalizers.M: ("mi", f"{m} / LOG2E  # the running max, from base 2"),
                   normalizers.L: ("li", l), normalizers.Z: ("zi", l),
                   normalizers.SINK: ("si", f"sink_rows[b, h, {row}]")}
        reads = norm.running + ((normalizers.SINK,) if self.deriv.sink is not None else ())
        named = {s: sp.Symbol(running[s][0]) for s in reads}
        targets = {normalizers.SCALE: "inv", normalizers.SAVED: f"state[b, h, {row}]"}
        for symbol in reads:
            w(f"{running[symbol][0]} = {running[symbol][1]}")
        for target, expr in norm.finish:
            name = targets.get(target, normalizers.local(target))
            w(f"{name} = {self.fl(expr.xreplace(named))}")
            named[target] = sp.Symbol(name)

    # ---- decoding: a few query rows against many keys ----
    def decode(self) -> None:
        """`_attn_decode`, the forward of a decoder step against a KV cache (flash-decoding).
        One task per (batch, key/value head, key range): the rows of every query head of the
        group are packed (row r is head hk * group + r // n_q, query r % n_q), so each key and
        value tile is read once per group: one product against the keys as stored (no transposed
        copy of k: at a few rows it would cost more than the work) and one with the values per
        tile, for all rows, in plain loops (rows_dot_keys, rows_mix_values: a BLAS call costs
        more than so few rows' product); each range's running state goes to part_*, merged by
        `_decode_merge`."""
        w = self.w
        sink = ["sink_rows"] if self.deriv.sink is not None else []
        w("@njit(**KERNEL)")
        with w.block(self.signature("_attn_decode", ["splits", "part_m", "part_l", "part_acc",
                                                     "err"], tiled=False)):
            w('"""Per (batch, key/value head, key range): the running state of each packed '
              'row."""')
            self.unpack_sizes()
            w("group = heads // kv_heads")
            w("R = group * n_q  # packed rows")
            w("per = ((n_k + splits - 1) // splits + DK - 1) // DK * DK  # keys per range")
            with w.block("for task in range(lo, hi):  # of the B * kv_heads * splits (key ranges)"):
                w("b, hk, part = task // (kv_heads * splits), (task // splits) % kv_heads, "
                  "task % splits")
                w("qo, ko = qoff[b], koff[b]  # position = offset + row (or column)")
                w("x = np.empty(R * DK, F)  # the rows' logits, then weights")
                if not self.softmax:
                    w("keep = np.empty(DK, np.uint8)  # 1 where the mask allows the pair")
                for n in self.decoded_gemms():
                    w(f"s{n} = np.empty(R * DK, F)  # GEMM tile of {self.plan.gemms[n].name}")
                w("status = np.empty(R, np.int64)  # each row's mask status of the tile")
                w("acc = np.zeros(R * dv, F)")
                w("acc_before = np.empty(R * dv, F)  # acc before a value tile (decode_mix)")
                w("m = np.full(R, NEG_INF, F)  # running max (base 2; softmax)")
                w("l = np.zeros(R, F)  # running normalizer")
                w("bad = 0")
                with w.block("for j0 in range(part * per, min(n_k, (part + 1) * per), DK):"):
                    w("nk = min(DK, n_k - j0)")
                    w("seen = 0  # rows the mask lets see this tile")
                    with w.block("for r in range(R):"):
                        w("h, i = hk * group + r // n_q, r % n_q")
                        w("pi = qo + i")
                        w(f"status[r] = _tile_status(sz, qo, ko, b, h, pi, pi + 1, ko + j0, "
                          f"ko + j0 + nk{self.extra_args()})")
                        w("seen += status[r] != 0")
                    with w.block("if seen == 0:"):
                        w("continue  # the mask allows no key of this tile to any row")
                    self.decode_tiles()
                    with w.block("for r in range(R):"):
                        w("h, i = hk * group + r // n_q, r % n_q")
                        w("pi = qo + i")
                        w("xo = r * DK  # the row's logits in x")
                        with w.block("if status[r] == 0:"):
                            w("x[xo:xo + nk] = F(0)  # no key of this tile for the row")
                            w("continue")
                        self.lookups_at(0, "bad")
                        self.lookups_at(1, "bad")
                        self.decode_logits()
                        self.decode_normalize()
                    self.decode_mix()
                w("err[task] = bad")
                with w.block("for r in range(R):"):
                    w("h, i = hk * group + r // n_q, r % n_q")
                    w("part_m[b, h, i, part] = m[r]")
                    w("part_l[b, h, i, part] = l[r]")
                    with w.block("for c in range(dv):"):
                        w("part_acc[b, h, i, part, c] = acc[r * dv + c]")
        w()
        w()
        w("@njit(**KERNEL)")
        with w.block(f"def _decode_merge(lo, hi, sz, splits, part_m, part_l, part_acc, out, state"
                     f"{''.join(', ' + s for s in sink)}):"):
            w('"""Each row\'s key ranges merged (softmax: rescaled to their common max), then '
              'finished as in _attn_fwd."""')
            self.unpack_sizes()
            with w.block("for row in range(lo, hi):  # of the B * heads * n_q"):
                w("b, h, i = row // (heads * n_q), (row // n_q) % heads, row % n_q")
                w("acc = np.zeros(dv, F)")
                w("mx = NEG_INF")
                w("lsum = F(0)")
                if self.softmax:
                    with w.block("for part in range(splits):"):
                        w("mx = max(mx, part_m[b, h, i, part])")
                with w.block("for part in range(splits):"):
                    if self.softmax:
                        with w.block("if mx == NEG_INF:  # no range saw an allowed key"):
                            w("lsum += part_l[b, h, i, part]  # 0, or NaN from a NaN logit")
                            w("continue")
                        w("alpha = exp2(part_m[b, h, i, part] - mx)")
                    else:
                        w("alpha = F(1)")
                    w("lsum += alpha * part_l[b, h, i, part]")
                    with w.block("for c in range(dv):"):
                        w("acc[c] += alpha * part_acc[b, h, i, part, c]")
                self.finish_row("mx", "lsum", "i")
                with w.block("for c in range(dv):"):
                    w("out[b, h, i, c] = acc[c] * inv")
        w()
        w()

    def decoded_gemms(self) -> list[int]:
        """The GEMM reductions decoding computes as one product per key tile for all packed rows:
        a query-side operand (the group's rows are contiguous) against k itself; the others
        run as feature loops per pair."""
        found = []
        for n, r in enumerate(self.plan.gemms):
            a, b = self.plan.inputs_of_gemm(r)
            if a.side is Side.QUERY and b.is_raw_key:
                found.append(n)
        return found

    def decode_tiles(self) -> None:
        """s<n>[r, jj] = a[b, h(r), i(r)] . k[b, hk, j0 + jj] for every packed row: one NT
        product against the key tile as stored (no transposed copy of k), in plain loops
        (rows_dot_keys: a BLAS call costs more than so few rows' product)."""
        w = self.w
        for n in self.decoded_gemms():
            a, _ = self.plan.inputs_of_gemm(self.plan.gemms[n])
            name = input_name(a)
            w(f"rows_dot_keys(R, nk, d, {name}, "
              f"(b * {name}.shape[1] + hk * group) * n_q * {name}.shape[3], {name}.shape[3], "
              f"k, ((b * kv_heads + hk) * n_k + j0) * d, d, s{n}, 0, DK)")

    def decode_logits(self) -> None:
        """x[jj] (and keep[jj]) for the packed row r against the key tile."""
        w = self.w
        mask = f"status[r] == 2 or ({self.mask_expr()})" if self.mask is not None else "True"
        with w.block("for jj in range(nk):"):
            w("j = j0 + jj")
            w("pj = ko + j")
            self.pair_values("bad", decoding=True)
            if self.softmax:
                w(f"x[xo + jj] = ({self.fl(self.logit)}) * LOG2E if {mask} else NEG_INF")
            else:
                w(f"keep[jj] = 1 if {mask} else 0")
                w(f"x[xo + jj] = {self.fl(self.logit)}")

    def decode_normalize(self) -> None:
        """The Accumulate step for row r over the tile (see normalize_tile)."""
        w, norm = self.w, self.norm
        if norm.rescale is not None:
            self.online_softmax_row("r", "xo")
            return
        with w.block("for jj in range(nk):"):
            w("xv = x[xo + jj]")
            with w.block("if keep[jj] == 0:  # masked: weight 0"):
                w("x[xo + jj] = F(0)")
                w("continue")
            local = {normalizers.X: "xv", normalizers.Z: "l[r]", normalizers.ACC: "x[xo + jj]"}
            named = {symbol: sp.Symbol(name) for symbol, name in local.items()}
            if norm.accumulate != normalizers.X:  # element-wise: f(x), which may read i, j
                w("pj = ko + j0 + jj")
                w(f"x[xo + jj] = {self.fl(norm.accumulate.xreplace(named))}")
            for symbol, value in norm.update:
                w(f"{local[symbol]} = {self.fl(value.xreplace(named))}")

    def decode_mix(self) -> None:
        """acc += x @ v[b, hk, j0:j0 + nk] for every packed row. A NaN or inf in the value tile
        must not spread through a weight of 0 (a masked pair, the branch a `where` did not
        take): it would leave a NaN or inf in acc, so a tile that leaves one is mixed again
        from the saved acc by the loop that skips weights of 0. Checking acc (R x dv) instead
        of the tile before the product saves a pass over the values, which read from memory
        while nothing else ran (decoding ran 1.2x faster)."""
        w = self.w
        w("vo = ((b * kv_heads + hk) * n_k + j0) * dv")
        w("acc_before[:] = acc")
        w("rows_mix_values(R, dv, nk, x, 0, DK, v, vo, dv, acc, 0, dv)")
        with w.block("if not all_finite(acc, 0, R * dv):  # a NaN or inf: from the tile, "
                     "or one acc held"):
            w("acc[:] = acc_before")
            w("gemm_skip_zero(False, False, R, dv, nk, F(1), x, 0, DK, v, vo, dv, F(1), acc, 0, "
              "dv)")

    # ---- backward ----
    def backward(self) -> None:
        """FlashAttention-2 backward, one kernel: task = (batch, head, part); a part walks the
        key tiles part, part + parts, ... (round-robin: causal triangles stay balanced) and
        for each every query tile: dV and key-side adjoints of its own key tiles (no race),
        query-side adjoints and param partials into its own copy [part * B + b] (summed by the
        launcher in part order: deterministic). S, P, dP are computed once per tile (5 GEMMs).
        parts = sz[7] > 1 only when B * heads cannot fill the threads."""
        w, plan = self.w, self.plan
        keys_first = [i for i in plan.inputs if i.side is Side.KEY] + \
            [i for i in plan.inputs if i.side is not Side.KEY]
        # with the keys in panels (sz[12] == 2; else empty): dO and each GEMM's query-side
        # operand packed in panels of PANEL columns (value_panels), v in panels of keys
        # (key_panels), for micro_gemm
        packed = ["dop", "vk", *(f"qp{n}" for n in range(len(plan.gemms)))] if plan.gemms else []
        outputs = ["dout", *packed, "D", "state", *(adjoint_name(i) for i in keys_first),
                   "dv_h"]
        outputs += [f"dp_{x.array}" for x in plan.param_lookups
                    if x == self._first_lookup(x.array)]
        outputs += ["err"]
        w("@njit(**KERNEL)")
        with w.block(self.signature("_attn_bwd", outputs)):
            w('"""FlashAttention-2 backward over (batch, head, part of the key tiles): every '
              'adjoint."""')
            self.unpack_sizes()
            self.tile_sizes()
            w("parts = sz[7]")
            self.fold_alpha()
            w("group = heads // kv_heads")
            w("q_tiles = (n_q + BQ - 1) // BQ")
            w("k_tiles = (n_k + BK - 1) // BK")
            with w.block("for task in range(lo, hi):  # of the B * heads * parts"):
                w("b, h, part = task // (heads * parts), (task // parts) % heads, task % parts")
                w("qo, ko = qoff[b], koff[b]  # position = offset + row (or column)")
                w("pb = part * B + b  # this part's copy of the query-side adjoints")
                w("hk = h // group")
                for n in range(len(plan.gemms)):
                    w(f"s{n} = np.empty(BQ * BKS, F)")
                    if self.fold is None or self.fold[0] != n:
                        w(f"g{n} = np.empty(BQ * BKS, F)  # d logit / d {plan.gemms[n].name} * dS")
                w("x = np.empty(BQ * BKS, F)  # P")
                w("dp = np.empty(BQ * BKS, F)  # dP, then dS")
                self.band_buffers(panels=True)
                w("bad = 0")
                with w.block("for key_tile in range(part, k_tiles, parts):"):
                    w("j0 = key_tile * BK")
                    w("nk = min(BK, n_k - j0)")
                    w("i_next = 0")
                    with w.block("while i_next < n_q:  # the query tiles, in order"):
                        w("i0 = i_next")
                        w("mq = min(BQ, n_q - i0)")
                        w("i_next = i0 + mq")
                        w(f"status = _tile_status(sz, qo, ko, b, h, qo + i0, qo + i0 + mq, "
                          f"ko + j0, ko + j0 + nk{self.extra_args()})")
                        with w.block("if status == 0:"):
                            w("continue")
                        if self.deriv.mask is not None:
                            with w.block("if status == 1:  # fitted to the band"):
                                w(f"i0, i_next, status = _fit_queries(sz, qo, ko, b, h, i0, "
                                  f"i_next, j0, j0 + nk, BQ{self.extra_args()})")
                                w("mq = i_next - i0")
                                with w.block("if status == 0:"):
                                    w("continue  # fitted: no allowed pair after all")
                        w("qt = i0 // BQ  # the aligned query tile holding i0: per-tile partials")
                        w("qtask = (pb * heads + h) * q_tiles + qt")
                        self.lookups_at(0, "bad")
                        self.tile_bands("bad", panels=True)
                        fold_n = self.fold[0] if self.fold is not None else 0
                        self.gemm_tiles(f"s{fold_n}")
                        w("# dP = dO @ V^T")
                        blas = ("gemm_unchecked(False, True, mq, nk, dv, F(1), dout, "
                                "((b * heads + h) * n_q + i0) * dv, dv, v, ((b * kv_heads + hk) "
                                "* n_k + j0) * dv, dv, F(0), dp, 0, BKS)")
                        if plan.gemms:
                            with w.block("if keys == 2:  # v in panels of keys"):
                                self.micro_call("mq, nk, dv, F(1), dout, ((b * heads + h) * n_q "
                                                "+ i0) * dv, dv, 1, vk, ((b * kv_heads + hk) * "
                                                "vk.shape[2] + j0 // PANEL) * dv * PANEL, PANEL, "
                                                "dv * PANEL, False, dp, 0, BKS",
                                                "band_lo, band_hi, 1, False")
                            with w.block("else:"):
                                w(blas)
                        else:
                            w(blas)
                        self.dscores()
                        w("# dV += P^T @ dO")
                        dv_rows = "dv_h, ((b * heads + h) * n_k + j0) * dv, dv"
                        micro = ("nk, dv, mq, F(1), x, 0, 1, BKS, dop, ((b * heads + h) * (dv "
                                 f"// PANEL) * n_q + i0) * PANEL, PANEL, n_q * PANEL, True, "
                                 f"{dv_rows}")
                        self.mixing_gemm("True, False, nk, dv, mq, F(1), x, 0, BKS, dout, "
                                         f"((b * heads + h) * n_q + i0) * dv, dv, F(1), {dv_rows}",
                                         micro=("dv", micro), runs="panel_lo, panel_hi, PANEL")
                        self.gemm_adjoints(True)
                        self.gemm_adjoints(False)
                w("err[task] = bad")
        w()
        w()

    def _first_lookup(self, array: str) -> Lookup:
        return next(x for x in self.plan.param_lookups if x.array == array)

    def _row_adjoints(self) -> list[tuple[sp.Symbol, str, str]]:
        """(node, local, target) of per-row sums: query-side and constant row scalars and
        params read at subscripts without j, summed over a row in a local, then added once."""
        plan, result = self.plan, []
        for item in plan.inputs:
            if item.is_vector or item.node.symbol not in plan.grads.dlogit:
                continue
            row = {Side.QUERY: "i", Side.CONST: "qt"}.get(item.side)
            if row is not None:
                result.append((item.node.symbol, f"ra_{numpy_ref.variable(item.node)}",
                               f"{adjoint_name(item)}[pb, h, {row}]"))
        for x in plan.param_lookups:
            if self.has_adjoint(x.symbol) and self.levels[x.name] <= 1:
                result.append((x.symbol, f"ra_{x.name}",
                               f"dp_{x.array}[qtask, {self.flat_index(x)}]"))
        return result

    def dscores(self) -> None:
        """P and dS per pair, then every elementwise adjoint (row scalars, loops, params)."""
        w, d, plan = self.w, self.deriv, self.plan
        w(f"# {normalizers.of(d).rule}")
        fold_n = self.fold[0] if self.fold is not None else -1
        value = self.logit_value(f"s{fold_n}")
        row_sums = self._row_adjoints()

        def body(part: str, masked: bool) -> None:
            if part == "row":
                w("row_state = state[b, h, i]")
                w("Di = D[b, h, i]")
                if self.softmax:  # an empty row (lse -inf) gives P = 2^(x - inf) = 0
                    w("rs2 = row_state * LOG2E if row_state != NEG_INF else -NEG_INF")
                for _, local, _ in row_sums:
                    w(f"{local} = F(0)")
                return
            if part == "row_end":
                for _, local, target in row_sums:
                    w(f"{target} += {local}")
                return
            if self.softmax:
                w(f"xv2 = {value}")
                w("xv = xv2 * F(1 / 1.4426950408889634)" if self.fold is not None
                  else f"xv = {self.fl(self.logit)}")
            else:
                w(f"xv = {value}")
            if masked:  # if/else, not `continue`: Numba's SSA pass trips over inlined exp2
                with w.block(f"if not ({self.mask_expr()}):"):
                    w("x[ii * BKS + jj] = F(0)")
                    w("dp[ii * BKS + jj] = F(0)")
                    for n in range(len(plan.gemms)):
                        if n != fold_n:
                            w(f"g{n}[ii * BKS + jj] = F(0)")
                with w.block("else:"):
                    self._dscore_pair(fold_n, row_sums)
                return
            self._dscore_pair(fold_n, row_sums)

        # the per-pair mask test stays: over each row's run (as the forward's pair loops), the
        # loops ran 1-8% slower (causal and sliding_window, N = 2048, an AVX2 EPYC)
        self.pair_loops(lambda part: body(part, False), lambda part: body(part, True))

    def _dscore_pair(self, fold_n: int, row_sums: list[tuple[sp.Symbol, str, str]]) -> None:
        w, d, plan = self.w, self.deriv, self.plan
        w("dpv = dp[ii * BKS + jj]")
        norm = normalizers.of(d)
        local = {normalizers.X: "xv", normalizers.SAVED: "row_state", normalizers.WEIGHT: "pv",
                 normalizers.DP: "dpv", normalizers.DELTA: "Di"}
        named = {s: sp.Symbol(n) for s, n in local.items()}
        if norm.kind is NormKind.SOFTMAX:  # exp(x - lse) in base 2: the GEMM's alpha holds log2 e
            w("pv = exp2(xv2 - rs2)")
        else:
            w(f"pv = {self.fl(norm.weight.xreplace(named))}")
        w(f"ds = {self.fl(norm.dscore.xreplace(named))}")
        w("x[ii * BKS + jj] = pv")
        locals_ = {symbol: local for symbol, local, _ in row_sums}
        for step in self.bwd_steps:  # the pair program's backward (program.py), in its order
            if isinstance(step, program.Gather):
                w(f"ga_{step.source.node.name} = {self.source(step.source)}")
            elif isinstance(step, program.Loop):
                self.loop_adjoint(step)
            elif isinstance(step, program.Gemm):
                n = plan.gemms.index(step.gemm)
                if n == fold_n:
                    w("dp[ii * BKS + jj] = ds  # d logit / d r = c_fold: the adjoint GEMMs' alpha")
                else:
                    w(f"g{n}[ii * BKS + jj] = {self.source(step.source)}")
            else:
                self.add_adjoint(step.source, locals_)

    def has_adjoint(self, symbol: sp.Symbol) -> bool:
        return symbol in self.plan.grads.dlogit or symbol in self.plan.nested

    def source(self, source: program.Source) -> str:
        """A step's adjoint at this pair: the local gathering what the loops reading the node
        add, or dS * d logit / d node (0 for a gather's start with no direct term)."""
        if source.gathered:
            return f"ga_{source.node.name}"
        if source.partial is None:
            return "F(0)"
        return f"ds * ({self.fl(source.partial)})"

    def add_adjoint(self, source: program.Source, locals_: dict[sp.Symbol, str]) -> None:
        """A row scalar's or a param lookup's adjoint: into its per-row local when it has one
        (see _row_adjoints), else per pair (key-side row scalars, lookups reading j)."""
        w, plan, symbol = self.w, self.plan, source.node.symbol
        adjoint = self.source(source)
        if symbol in locals_:
            w(f"{locals_[symbol]} += {adjoint}")
            return
        item = plan.input_for(symbol)
        if item is not None:
            if not item.is_vector and item.side is Side.KEY:
                w(f"{adjoint_name(item)}[b, h, j] += {adjoint}")
            return
        x = next((x for x in plan.param_lookups if x.symbol == symbol), None)
        if x is not None:
            w(f"dp_{x.array}[qtask, {self.flat_index(x)}] += {adjoint}")

    def loop_adjoint(self, step: program.Loop) -> None:
        """g = the loop's adjoint, then per feature g * d body / d input into the inputs'
        adjoints (and into ga_<node> for the pair-kernel nodes the body reads)."""
        w, plan, r = self.w, self.plan, step.loop
        g = self.source(step.source)
        if not step.source.gathered:
            w(f"g_{r.name} = {g}")
            g = f"g_{r.name}"
        # skipped when 0: a `where` branch not taken may have inf partials (0 * inf = NaN)
        with w.block(f"if {g} != 0:"), w.block(f"for f in range({self.feature_size(r)}):"):
            reads = self.shared_terms([expr for _, expr in step.reads])
            for (symbol, _), expr in zip(step.reads, reads, strict=True):
                if symbol in plan.nested:
                    w(f"ga_{self.names_of[symbol]} += {g} * ({self.fl(expr)})")
                    continue
                item = plan.input_for(symbol)
                if item is None:
                    continue
                # adjoints are per query head (summed over a GQA group by the launcher):
                # h, never hk; query-side and constant ones in the part's own copy (pb)
                feature = ", f" if item.is_vector else ""
                row = {Side.QUERY: "i", Side.KEY: "j", Side.CONST: "qt"}[item.side]
                batch = "b" if item.side is Side.KEY else "pb"
                w(f"{adjoint_name(item)}[{batch}, h, {row}{feature}] += {g} * ({self.fl(expr)})")

    def shared_terms(self, exprs: list[sp.Basic]) -> list[sp.Basic]:
        """Locals c0, c1, ... for the subexpressions the partials share (tanh(a + b) in each
        of Bahdanau's three), each computed once per feature; the partials rewritten to use
        them."""
        taken = set().union(*(e.free_symbols for e in exprs))
        names = sp.numbered_symbols("c", exclude=taken)
        terms, reduced = sp.cse(exprs, symbols=names, order="none")
        for symbol, value in terms:
            self.w(f"{symbol} = {self.fl(value)}")
        return list(reduced)

    def flat_index(self, x: Lookup) -> str:
        if not x.subscripts:
            return "0"
        text = f"{x.name}_s0"
        for axis in range(1, len(x.subscripts)):
            text = f"({text}) * p_{x.array}.shape[{axis}] + {x.name}_s{axis}"
        return text

    def gemm_adjoints(self, keys: bool) -> None:
        w = self.w
        for n, r in enumerate(self.plan.gemms):
            a, bvec = (self.plan.input_for(v.symbol) for v in r.gemm)  # type: ignore[union-attr]
            assert a is not None and bvec is not None
            g, alpha = f"g{n}", "F(1)"
            if self.fold is not None and self.fold[0] == n:
                g, alpha = "dp", "c_fold"
            if keys:
                w(f"# d{bvec.node.name} += {g}^T @ {a.node.name}")
                width = f"{input_name(a)}.shape[3]"
                adjoint = (f"{adjoint_name(bvec)}, {self.adjoint_offset(bvec, 'j0')}, "
                           f"{input_name(bvec)}.shape[3]")
                # micro_gemm reads the query rows from qp<n>, their panels of PANEL features
                panels = (f"qp{n}, ((b * qp{n}.shape[1] + h) * qp{n}.shape[2] * qp{n}.shape[3] "
                          f"+ i0) * PANEL, PANEL, qp{n}.shape[3] * PANEL")
                micro = f"nk, {width}, mq, {alpha}, {g}, 0, 1, BKS, {panels}, True, {adjoint}"
                self.mixing_gemm(f"True, False, nk, {width}, mq, {alpha}, {g}, 0, BKS, "
                                 f"{input_name(a)}, {self.row_offset(a, 'i0')}, {width}, F(1), "
                                 f"{adjoint}", micro=(width, micro),
                                 runs="panel_lo, panel_hi, PANEL")
            else:
                w(f"# d{a.node.name} += {g} @ {bvec.node.name}")
                width = f"{input_name(bvec)}.shape[3]"
                key_rows = f"{input_name(bvec)}, {self.row_offset(bvec, 'j0')}, {width}"
                adjoint = (f"{adjoint_name(a)}, {self.adjoint_offset(a, 'i0', 'pb')}, "
                           f"{input_name(a)}.shape[3]")
                # micro_gemm reads the key rows as stored, PANEL features at a time (1.18x
                # OpenBLAS's rate for a 256 x 64 x 256 tile on an AVX2 EPYC)
                micro = f"mq, {width}, nk, {alpha}, {g}, 0, BKS, 1, {key_rows}, PANEL, True, "
                self.mixing_gemm(f"False, False, mq, {width}, nk, {alpha}, {g}, 0, BKS, "
                                 f"{key_rows}, F(1), {adjoint}", micro=(width, micro + adjoint))

    def adjoint_offset(self, item: PairInput, start: str, batch: str = "b") -> str:
        """Adjoints are per query head: [B, heads, n, F] ([parts * B, ...] query-side)."""
        name = adjoint_name(item)
        return f"(({batch} * heads + h) * {name}.shape[2] + {start}) * {name}.shape[3]"


def _linear(self: CpuEmitter) -> None:
    """plan.LinearPath's equations as GEMMs, one task per (batch, head), O(n F dv). Without a
    mask S = B^T V and z = sum_j B_j over every key, then out = A S / (A z) chunk by chunk.
    Causal: the chunkwise-parallel form, chunks of CHUNK rows and the keys at the same
    positions; a chunk's rows see S, z of the earlier chunks (the carried state) through one
    GEMM and their own keys j <= i through the masked CHUNK x CHUNK score tile.
    """
    self._linear_forward()
    self._linear_backward()


def _linear_forward(self: CpuEmitter) -> None:
    w, path = self.w, self.plan.linear
    assert path is not None
    w("@njit(**KERNEL)")
    with w.block(self.signature("_linear_fwd", ["out", "state"], tiled=False)):
        if path.causal:
            w('"""Causal linear attention per (batch, head), chunk by chunk: out_c = (A_c S + '
              'p V_c) / den_c,')
            w("p = A_c B_c^T with 0 where j > i; S = sum_j B_j v_j^T and z = sum_j B_j over the "
              'earlier chunks\' keys."""')
        else:
            w('"""Full linear attention per (batch, head): out = A S / (A z), S = B^T V, '
              'z = sum_j B_j."""')
        with self._linear_task(adjoints=False):
            if not path.causal:
                self._linear_all_keys(adjoints=False)
            with self._linear_chunks(adjoints=False):
                self._linear_gemm("out_c = A_c S" + (": the earlier chunks' keys" if path.causal
                                                     else ""),
                                  "False, False, mq, dv, nf, F(1), qf, oa, nf, S, 0, dv, F(0), "
                                  "out, oo, dv")
                if path.causal:
                    with w.block("if mk > 0:"):
                        self._linear_scores()
                        self._linear_gemm("out_c += p V_c: the chunk's own keys",
                                          "False, False, mq, dv, mk, F(1), p, 0, CHUNK, v, ov, "
                                          "dv, F(1), out, oo, dv", mixing=True)
                if path.normalized:
                    self._linear_normalize_rows(divide=True)
                if path.causal:
                    with w.block("if mk > 0:"):
                        self._linear_add_keys()
    w()
    w()


def _linear_backward(self: CpuEmitter) -> None:
    w, path = self.w, self.plan.linear
    assert path is not None
    outputs = ["dout", "out", "state", adjoint_name(path.a), adjoint_name(path.b), "dv_h"]
    w("@njit(**KERNEL)")
    with w.block(self.signature("_linear_bwd", outputs, tiled=False)):
        w('"""g_i = dO_i / den_i, gd_i = -(dO_i . O_i) / den_i (none: dO_i, 0), den_i computed '
          'into state;')
        w("dA_i = S_i g_i + z_i gd_i;")
        w("dB_j = U_j v_j + u_j, dv_j = U_j^T B_j with U_j = sum_i A_i g_i^T, u_j = sum_i A_i "
          "gd_i over the rows seeing j.")
        if path.causal:
            w("Chunk by chunk: dA forward (S, z carried), then dB and dv backward (U, u carried); "
              "the")
            w('chunk\'s own pairs through p = A_c B_c^T and dp = g_c V_c^T + gd_c, 0 where j > i."""')
        else:
            w('Every row sees every key: S, z, U, u are sums over all of them."""')
        with self._linear_task(adjoints=True):
            w("g = np.empty(CHUNK * dv, F)  # g_i of the chunk's rows: no n_q x dv array")
            w("gd = np.zeros(CHUNK, F)  # gd_i of the chunk's rows")
            if path.causal:
                w("dp = np.empty(CHUNK * CHUNK, F)  # d(A_i . B_j) in the chunk, 0 where j > i")
                self._linear_backward_rows()
                self._linear_backward_keys()
            else:
                self._linear_backward_full()
    w()
    w()


@contextmanager
def _linear_task(self: CpuEmitter, adjoints: bool) -> Iterator[None]:
    """The loop over (batch, head) tasks, its names and its state S, z (the body is yielded)."""
    w, path = self.w, self.plan.linear
    assert path is not None
    self.unpack_sizes()
    w(f"qf, kf = {input_name(path.a)}, {input_name(path.b)}  # A_i and B_j (at kf's head hb)")
    if adjoints:
        w(f"dqf, dkf = {adjoint_name(path.a)}, {adjoint_name(path.b)}  # per query head")
    w("nf = qf.shape[3]")
    with w.block("for task in range(lo, hi):  # of the B * heads"):
        w("b, h = task // heads, task % heads")
        w("hk = h // (heads // kv_heads)")
        w(f"hb = {'hk' if path.b.is_raw_key else 'h'}")
        w("S = np.zeros(nf * dv, F)  # [nf, dv]: sum_j B_j v_j^T over the keys added so far")
        w("z = np.zeros(nf, F)  # sum_j B_j over them")
        if path.causal:
            w("p = np.empty(CHUNK * CHUNK, F)  # A_i . B_j in the chunk, 0 where j > i")
        yield


@contextmanager
def _linear_chunks(self: CpuEmitter, adjoints: bool, reverse: bool = False) -> Iterator[None]:
    """`for i0 in ...:` over the chunks of rows (with the keys at the same positions: mk of
    them, j = i0 + jj <= i and j < n_k), with the flat offsets the GEMMs address them by."""
    w, path = self.w, self.plan.linear
    assert path is not None
    chunks = "range((n_q - 1) // CHUNK * CHUNK, -1, -CHUNK)" if reverse else \
        "range(0, n_q, CHUNK)"
    with w.block(f"for i0 in {chunks}:"):
        w("mq = min(CHUNK, n_q - i0)")
        w("oa = ((b * heads + h) * n_q + i0) * nf  # qf and dqf: [B, heads, n_q, nf]")
        w("oo = ((b * heads + h) * n_q + i0) * dv")
        if path.causal:
            w("mk = max(min(mq, n_k - i0), 0)  # keys past the last row are seen by none")
            self._linear_key_offsets("i0", adjoints)
        yield


def _linear_key_offsets(self: CpuEmitter, start: str, adjoints: bool) -> None:
    """Flat offsets of key `start` in kf, v (and dkf, dv_h, per query head)."""
    w = self.w

    def at(head: str, width: str) -> str:
        return f"({head}) * n_k * {width}" if start == "0" else \
            f"(({head}) * n_k + {start}) * {width}"

    w(f"ob = {at('b * kf.shape[1] + hb', 'nf')}")
    w(f"ov = {at('b * kv_heads + hk', 'dv')}")
    if adjoints:
        w(f"odb = {at('b * heads + h', 'nf')}")
        w(f"odv = {at('b * heads + h', 'dv')}")


def _linear_gemm(self: CpuEmitter, comment: str, args: str, mixing: bool = False) -> None:
    """A GEMM (gemm_unchecked's arguments); `mixing`: its A operand is a masked pair tile, so
    with a NaN or inf among the inputs it skips the zero terms (see mixing_gemm)."""
    self.w(f"# {comment}")
    if mixing:
        self.mixing_gemm(args)
    else:
        self.w(f"gemm_unchecked({args})")


def _linear_all_keys(self: CpuEmitter, adjoints: bool) -> None:
    """S = B^T V and z = sum_j B_j over every key (no mask): one GEMM."""
    w = self.w
    self._linear_key_offsets("0", adjoints)
    self._linear_gemm("S = B^T V over every key",
                      "True, False, nf, dv, n_k, F(1), kf, ob, nf, v, ov, dv, F(0), S, 0, dv")
    with w.block("for j in range(n_k):"), w.block("for f in range(nf):"):
        w("z[f] += kf[b, hb, j, f]")


def _linear_add_keys(self: CpuEmitter) -> None:
    """The chunk's keys join the state: S += B_c^T V_c, z += sum_j B_j."""
    w = self.w
    self._linear_gemm("S += B_c^T V_c: the chunk's keys join the state",
                      "True, False, nf, dv, mk, F(1), kf, ob, nf, v, ov, dv, F(1), S, 0, dv")
    with w.block("for jj in range(mk):"), w.block("for f in range(nf):"):
        w("z[f] += kf[b, hb, i0 + jj, f]")


def _linear_scores(self: CpuEmitter) -> None:
    """p = A_c B_c^T over the chunk's rows and keys, 0 where j > i (a masked key's NaN too)."""
    w = self.w
    self._linear_gemm("p = A_c B_c^T, then 0 where j > i",
                      "False, True, mq, mk, nf, F(1), qf, oa, nf, kf, ob, nf, F(0), p, 0, CHUNK")
    with w.block("for ii in range(mq):"), w.block("for jj in range(ii + 1, mk):"):
        w("p[ii * CHUNK + jj] = F(0)")


def _linear_dscores(self: CpuEmitter) -> None:
    """dp = g_c V_c^T + gd_c (the adjoint of A_i . B_j), 0 where j > i."""
    w, path = self.w, self.plan.linear
    assert path is not None
    self._linear_gemm("dp = g_c V_c^T" + (" + gd_c" if path.normalized else "")
                      + ", 0 where j > i",
                      "False, True, mq, mk, dv, F(1), g, 0, dv, v, ov, dv, F(0), dp, 0, CHUNK")
    with w.block("for ii in range(mq):"):
        if path.normalized:
            with w.block("for jj in range(min(ii + 1, mk)):"):
                w("dp[ii * CHUNK + jj] += gd[ii]")
        with w.block("for jj in range(ii + 1, mk):"):
            w("dp[ii * CHUNK + jj] = F(0)")


def _linear_normalize_rows(self: CpuEmitter, divide: bool) -> None:
    """state_i = den_i = A_i . z (+ the chunk's row sum of p); `divide`: out_i /= den_i (0
    where den_i = 0)."""
    w, path = self.w, self.plan.linear
    assert path is not None
    with w.block("for ii in range(mq):"):
        w("i = i0 + ii")
        w("den = F(0)")
        with w.block("for f in range(nf):"):
            w("den += qf[b, h, i, f] * z[f]")
        if path.causal:
            with w.block("for jj in range(min(ii + 1, mk)):"):
                w("den += p[ii * CHUNK + jj]")
        if divide:
            with w.block("for c in range(dv):"):
                w("out[b, h, i, c] = out[b, h, i, c] / den if den != 0 else F(0)")
        w("state[b, h, i] = den")


def _linear_row_grads(self: CpuEmitter) -> None:
    """g_i = dO_i / den_i and gd_i = -(dO_i . out_i) / den_i for the chunk's rows (none: dO_i
    and 0)."""
    w, path = self.w, self.plan.linear
    assert path is not None
    with w.block("for ii in range(mq):"):
        w("i = i0 + ii")
        if not path.normalized:
            with w.block("for c in range(dv):"):
                w("g[ii * dv + c] = dout[b, h, i, c]")
            return
        w("den = state[b, h, i]")
        w("inv = F(1) / den if den != 0 else F(0)")
        w("dot = F(0)")
        with w.block("for c in range(dv):"):
            w("g[ii * dv + c] = dout[b, h, i, c] * inv")
            w("dot += dout[b, h, i, c] * out[b, h, i, c]")
        w("gd[ii] = -dot * inv")


def _linear_dq_from_state(self: CpuEmitter, comment: str) -> None:
    """dA_c += g_c S^T + gd_c z^T."""
    w, path = self.w, self.plan.linear
    assert path is not None
    self._linear_gemm(comment, "False, True, mq, nf, dv, F(1), g, 0, dv, S, 0, dv, F(1), dqf, oa, "
                      "nf")
    if path.normalized:
        with w.block("for ii in range(mq):"), w.block("for f in range(nf):"):
            w("dqf[b, h, i0 + ii, f] += gd[ii] * z[f]")


def _linear_rows_join_state(self: CpuEmitter, comment: str) -> None:
    """U += A_c^T g_c, u += A_c^T gd_c."""
    w, path = self.w, self.plan.linear
    assert path is not None
    self._linear_gemm(comment,
                      "True, False, nf, dv, mq, F(1), qf, oa, nf, g, 0, dv, F(1), U, 0, dv")
    if path.normalized:
        with w.block("for ii in range(mq):"), w.block("for f in range(nf):"):
            w("u[f] += qf[b, h, i0 + ii, f] * gd[ii]")


def _linear_dk_from_state(self: CpuEmitter, count: str, key: str, comment: str) -> None:
    """dB += V U^T + u and dv += B U over `count` keys from ob/ov (odb/odv for the adjoints);
    `key`: the key of the jj-th."""
    w, path = self.w, self.plan.linear
    assert path is not None
    self._linear_gemm(comment, f"False, True, {count}, nf, dv, F(1), v, ov, dv, U, 0, dv, F(1), "
                      "dkf, odb, nf")
    if path.normalized:
        with w.block(f"for jj in range({count}):"), w.block("for f in range(nf):"):
            w(f"dkf[b, h, {key}, f] += u[f]")
    w(f"gemm_unchecked(False, False, {count}, dv, nf, F(1), kf, ob, nf, U, 0, dv, F(1), dv_h, "
      "odv, dv)")


def _linear_backward_rows(self: CpuEmitter) -> None:
    """Causal dA, chunks in order: the earlier chunks' keys through S, z, the own ones
    through dp; den_i (the state) on the way, as the forward computes it."""
    w, path = self.w, self.plan.linear
    assert path is not None
    w("# dA, chunks first to last: S, z hold the earlier chunks' keys")
    with self._linear_chunks(adjoints=True):
        if path.normalized:
            with w.block("if mk > 0:"):
                self._linear_scores()
            self._linear_normalize_rows(divide=False)
        self._linear_row_grads()
        self._linear_dq_from_state("dA_c += g_c S^T + gd_c z^T: the earlier chunks' keys")
        with w.block("if mk > 0:"):
            self._linear_dscores()
            self._linear_gemm("dA_c += dp B_c: the chunk's own keys",
                              "False, False, mq, nf, mk, F(1), dp, 0, CHUNK, kf, ob, nf, F(1), "
                              "dqf, oa, nf", mixing=True)
            self._linear_add_keys()


def _linear_backward_keys(self: CpuEmitter) -> None:
    """Causal dB and dv, chunks last to first: the later chunks' rows through U, u, the own
    ones through dp and p."""
    w = self.w
    w("# dB and dv, chunks last to first: U, u hold the later chunks' rows")
    w("U = np.zeros(nf * dv, F)  # [nf, dv]: sum_i A_i g_i^T over the rows added so far")
    w("u = np.zeros(nf, F)  # sum_i A_i gd_i")
    with self._linear_chunks(adjoints=True, reverse=True):
        self._linear_row_grads()
        with w.block("if mk > 0:"):
            self._linear_dk_from_state("mk", "i0 + jj", "dB_c += V_c U^T + u, dv_c += B_c U: "
                                       "the later chunks' rows")
            self._linear_scores()
            self._linear_dscores()
            self._linear_gemm("dB_c += dp^T A_c, dv_c += p^T g_c: the chunk's own rows",
                              "True, False, mk, nf, mq, F(1), dp, 0, CHUNK, qf, oa, nf, F(1), "
                              "dkf, odb, nf", mixing=True)
            self.mixing_gemm("True, False, mk, dv, mq, F(1), p, 0, CHUNK, g, 0, dv, F(1), dv_h, "
                             "odv, dv")
        self._linear_rows_join_state("U += A_c^T g_c, u += A_c^T gd_c: the chunk's rows join "
                                     "the state")


def _linear_backward_full(self: CpuEmitter) -> None:
    """No mask: S, z over every key, then per chunk of rows den_i (the state), dA_c and U, u;
    dB, dv at the end."""
    w, path = self.w, self.plan.linear
    assert path is not None
    self._linear_all_keys(adjoints=True)
    w("U = np.zeros(nf * dv, F)  # [nf, dv]: sum_i A_i g_i^T over the rows added so far")
    w("u = np.zeros(nf, F)  # sum_i A_i gd_i")
    with self._linear_chunks(adjoints=False):
        if path.normalized:
            self._linear_normalize_rows(divide=False)
        self._linear_row_grads()
        self._linear_dq_from_state("dA_c += g_c S^T + gd_c z^T")
        self._linear_rows_join_state("U += A_c^T g_c, u += A_c^T gd_c")
    self._linear_dk_from_state("n_k", "jj", "dB = V U^T + u, dv = B U over every key")


for _f in (_linear, _linear_forward, _linear_backward, _linear_task, _linear_chunks,
           _linear_key_offsets, _linear_gemm, _linear_all_keys, _linear_add_keys, _linear_scores,
           _linear_dscores, _linear_normalize_rows, _linear_row_grads, _linear_dq_from_state,
           _linear_rows_join_state, _linear_dk_from_state, _linear_backward_rows,
           _linear_backward_keys, _linear_backward_full):
    setattr(CpuEmitter, _f.__name__.removeprefix("_") if _f is _linear else _f.__name__, _f)


# ---- fused feature maps: phi(q), phi(k) and their adjoints in one pass each ----------------


def _maps(self: CpuEmitter) -> None:
    """`_maps_fwd` and `_maps_bwd` for plan.feature_maps: tasks of MAP_ROWS rows of q (per
    batch and head) then of k; the launcher passes how many blocks of rows each side has (0
    for a side with nothing to compute)."""
    maps = self.plan.feature_maps
    assert maps
    w = self.w
    sides = {side: [m for m in maps if m.source.name == side] for side in ("q", "k")}
    w("@njit(**KERNEL)")
    outputs = [input_name(m.item) for m in maps]
    with w.block(f"def _maps_fwd(lo, hi, sz, q_blocks, k_blocks, q, k, {', '.join(outputs)}, "
                 "bad):"):
        w('"""The feature maps, element by element (the values of the NumPy reference\'s '
          '`rows`):')
        for m in maps:
            w(f"{input_name(m.item)} = {sp.sstr(m.value)}")
        w('bad[task]: a NaN or inf among the task\'s values."""')
        with self.maps_tasks():
            for side, row in (("q", "i"), ("k", "j")):
                if not sides[side]:
                    continue
                with self.maps_rows(side, row):
                    w("check = F(0)  # the sum of value * 0: NaN once a value is NaN or inf")
                    stop = "n_q" if side == "q" else "n_k"
                    with w.block(f"for {row} in range(r0, min(r0 + MAP_ROWS, {stop})):"), \
                            w.block("for f in range(d):"):
                        w(f"x = {side}[b, {'h' if side == 'q' else 'hk'}, {row}, f]")
                        for m in sides[side]:
                            w(f"y = {self.map_text(m, m.value)}")
                            w(f"{input_name(m.item)}[b, h, {row}, f] = y")
                            w("check += y * F(0)")
                    w("bad[task] = check != F(0)")
    w()
    w()
    self.maps_backward(sides)


def _maps_backward(self: CpuEmitter, sides: dict[str, list[FeatureMap]]) -> None:
    """`_maps_bwd`: dq and dk from the maps' adjoints (and the kernel's adjoint of q or k
    where it reads them raw), dk summed over the query heads of each key/value head."""
    w = self.w
    raw = {side: side in self.plan.raw_inputs for side in ("q", "k")}
    adjoints = [adjoint_name(m.item) for m in self.plan.feature_maps or []]
    adjoints += [f"d_{side}_rows" for side in ("q", "k") if raw[side]]
    w("@njit(**KERNEL)")
    with w.block(f"def _maps_bwd(lo, hi, sz, q_blocks, k_blocks, q, k, {', '.join(adjoints)}, "
                 "dq, dk):"):
        w('"""dq and dk: sum over the maps of adjoint * d map / d input (0 where the adjoint is'
          ' 0:')
        w("an untaken branch's partial may be NaN), the adjoints of the raw q or k added; dk")
        w("summed over the query heads of each key/value head:")
        for side in ("q", "k"):
            for m in sides[side]:
                w(f"d {input_name(m.item)} / d {side} = {sp.sstr(m.partial)}")
        w('"""')
        with self.maps_tasks():
            for side, row in (("q", "i"), ("k", "j")):
                if not (sides[side] or raw[side]):
                    continue
                head = "h" if side == "q" else "hk"
                terms = [(f"a = {adjoint_name(m.item)}[b, h, {row}, f]",
                          f"a * {self.map_text(m, m.partial)} if a != F(0) else F(0)")
                         for m in sides[side]]
                if raw[side]:
                    terms.append(("", f"d_{side}_rows[b, h, {row}, f]"))
                stop = "n_q" if side == "q" else "n_k"
                with self.maps_rows(side, row, backward=True), \
                        w.block(f"for {row} in range(r0, min(r0 + MAP_ROWS, {stop})):"):
                    if side == "k":  # the group's query heads add up in dk's row
                        with w.block("for f in range(d):"):
                            w(f"dk[b, hk, {row}, f] = F(0)")
                    heads = w.block("for h in range(h0, h0 + group):") if side == "k" else \
                        _nothing()
                    with heads, w.block("for f in range(d):"):
                        w(f"x = {side}[b, {head}, {row}, f]")
                        w("g = F(0)")
                        for read, term in terms:
                            if read:
                                w(read)
                            w(f"g += {term}")
                        w(f"d{side}[b, {head}, {row}, f] {'+=' if side == 'k' else '='} g")
    w()
    w()


@contextmanager
def _maps_tasks(self: CpuEmitter) -> Iterator[None]:
    """The sizes, then `for task in range(lo, hi):` (the body is yielded)."""
    self.unpack_sizes()
    with self.w.block("for task in range(lo, hi):"):
        yield


@contextmanager
def _maps_rows(self: CpuEmitter, side: str, row: str, backward: bool = False
               ) -> Iterator[None]:
    """The task's batch, head and first row on `side`: query tasks come first, then key
    tasks (per query head forward; per key/value head backward, which sums its group)."""
    w = self.w
    if side == "q":
        block = w.block("if task < B * heads * q_blocks:  # rows of q")
        first = "task"
    else:
        block = w.block("if task >= B * heads * q_blocks:  # rows of k")
        first = "task - B * heads * q_blocks"
    with block:
        heads = "kv_heads" if backward and side == "k" else "heads"
        head = "hk" if backward and side == "k" else "h"
        w(f"t = {first}")
        w(f"b = t // ({heads} * {side}_blocks)")
        w(f"{head} = t // {side}_blocks % {heads}")
        w(f"r0 = t % {side}_blocks * MAP_ROWS")
        if backward and side == "k":
            w("group = heads // kv_heads")
            w("h0 = hk * group  # the first query head reading key/value head hk")
        elif side == "k":
            w("hk = h // (heads // kv_heads)")
        yield


def _map_text(self: CpuEmitter, m: FeatureMap, e: sp.Expr) -> str:
    """A map's value or partial at x, one element of its input."""
    printer = NumbaPrinter({m.source.symbol: "x"})
    return printer.doprint(floatify(e))


for _f in (_maps, _maps_backward, _maps_tasks, _maps_rows, _map_text):
    setattr(CpuEmitter, _f.__name__.removeprefix("_"), _f)


def emit_source(spec: ir.Spec | KernelPlan, dtype: str = "float32") -> str:
    """The kernels' source; a compile passes its plan, so the spec is derived once."""
    plan = spec if isinstance(spec, KernelPlan) else make_plan(spec)
    return CpuEmitter(plan, dtype).module()


@contextmanager
def _nothing() -> Iterator[None]:
    yield
