"""The Numba CPU target: NumPy prologue, fused kernels, NumPy epilogue (see codegen/numba_cpu)."""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import numba
import numpy as np

from .. import ir
from ..codegen import numba_cpu, numpy_ref
from ..ir import NormKind, Side
from ..plan import PairInput, make_plan
from . import buffers, cache, numpy_ops, threads, tiles
from .kernel import Call, Kernel, check_linear_offsets

# Every launch on all threads (the kernels and the launcher's passes, on runtime/threads) holds
# this lock: each launch already uses every core, and sets BLAS's global thread count
# (single_threaded_blas); two at once from two Python threads would only oversubscribe them.
_PARALLEL = threading.Lock()


def _kernel_layout(value: np.ndarray, item: PairInput, sizes: dict[str, int],
                   dtype: np.dtype) -> np.ndarray:
    """A row-level value of the 5-D reference layout, as the kernel reads it."""
    B, H = sizes["B"], sizes["heads"]
    value = np.asarray(value)
    value = value.reshape((1,) * (5 - value.ndim) + value.shape)  # constants may be unexpanded
    if item.side is Side.QUERY:
        value, shape = value[:, :, :, 0], (B, H, sizes["n_q"])
    elif item.side is Side.KEY:
        value, shape = value[:, :, 0], (B, H, sizes["n_k"])
    else:
        value, shape = value[:, :, 0, 0], (B, H)
    if item.is_vector:
        shape = shape + value.shape[-1:]
    else:
        value = value[..., 0]
    if value.shape != shape:  # broadcast (a view, read-only): copied below
        value = np.broadcast_to(value, shape)
    # writeable: a broadcast view that happens to be contiguous (sizes of 1) is read-only, and
    # Numba types read-only arrays differently (a second signature); a value already laid out
    # so (phi(q) of the linear path, N x F) is passed as it is, not copied
    return np.require(value, dtype=dtype, requirements=["C", "W"])


def _reference_layout(adjoint: np.ndarray, item: PairInput, tiles: int) -> np.ndarray:
    """A kernel adjoint back in the 5-D layout `rows_backward` takes."""
    if item.side is Side.CONST:  # per-task partials [B, H, tiles(, F)], summed in order
        adjoint = adjoint.sum(axis=2)
    if not item.is_vector:
        adjoint = adjoint[..., None]
    if item.side is Side.QUERY:
        return adjoint[:, :, :, None, :]
    if item.side is Side.KEY:
        return adjoint[:, :, None, :, :]
    return adjoint[:, :, None, None, :]


def _all_finite(arrays: list[np.ndarray | None]) -> bool:
    """O(N d): the kernels take their careful path (sz[8]) only when this is False."""
    from .cpu_intrinsics import finite_everywhere

    for a in arrays:
        if a is None:
            continue
        if a.size >= 1 << 16 and a.flags.c_contiguous and a.dtype.kind == "f":
            with _PARALLEL:
                finite = finite_everywhere(a)
        else:
            finite = bool(np.isfinite(a).all())
        if not finite:
            return False
    return True


def _sink_rows(value: Any, sizes: dict[str, int], dtype: np.dtype) -> np.ndarray:
    """softmax(sink = e): the sink logit of every row, [B, H, n_q], from the 5-D layout."""
    value = np.asarray(value, dtype=dtype)
    value = value.reshape((1,) * (5 - value.ndim) + value.shape)[:, :, :, 0, 0]
    shape = (sizes["B"], sizes["heads"], sizes["n_q"])
    return np.require(np.broadcast_to(value, shape), requirements=["C", "W"])


# Decoding (`_attn_decode`): up to this many packed query rows (n_q x the query heads of a
# key/value head) per task, the forward reads each key once per group with feature loops;
# past it the tiled forward's GEMMs win (measured: benchmarks/results/decode.md).
DECODE_ROWS = 8
DECODE_RANGE = numba_cpu.DK  # the fewest keys a decoding task takes: one tile


def _decode_splits(tasks: int, n_k: int) -> int:
    """Key ranges per (batch, key/value head) when decoding: enough tasks for every thread
    twice over (they finish unevenly), no range shorter than DECODE_RANGE keys."""
    most = max(1, n_k // DECODE_RANGE)
    return max(1, min(most, -(-2 * numba.get_num_threads() // tasks)))


def _map_blocks(sizes: dict[str, int], sides: set[str]) -> tuple[int, int]:
    """Blocks of MAP_ROWS rows of q and of k for the feature maps' tasks (0: nothing on that
    side)."""
    rows = numba_cpu.MAP_ROWS
    q_blocks = -(-sizes["n_q"] // rows) if "q" in sides else 0
    k_blocks = -(-sizes["n_k"] // rows) if "k" in sides else 0
    return q_blocks, k_blocks


def _no_panels(dtype: np.dtype) -> np.ndarray:
    """What the kernels get for an operand packed for micro_gemm when none is (their
    signature is fixed: an empty array of the panels' rank)."""
    return np.empty((0,) * 5, dtype)


def _by_keys(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """`x` [B, H, n, F] in panels of PANEL keys for micro_gemm, [B, H, ceil(n / PANEL), F,
    PANEL] (key_panels, zeros past key n), and whether `x` is finite."""
    from .cpu_intrinsics import PANEL, key_panels

    out = buffers.empty((*x.shape[:2], -(-x.shape[2] // PANEL), x.shape[3], PANEL), x.dtype)
    with _PARALLEL:
        finite = key_panels(x, out)
    return out, finite


def _in_panels(x: np.ndarray) -> np.ndarray:
    """`x` [B, H, n, F] in panels of PANEL columns for micro_gemm, [B, H, F / PANEL, n, PANEL]
    (value_panels); empty where F is no multiple of PANEL (the kernels then call OpenBLAS)."""
    from .cpu_intrinsics import PANEL, value_panels

    if x.shape[3] % PANEL:
        return _no_panels(x.dtype)
    out = buffers.empty((*x.shape[:2], x.shape[3] // PANEL, x.shape[2], PANEL), x.dtype)
    with _PARALLEL:
        value_panels(x, out)
    return out


def _with_tile(sz: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """A copy of the kernels' sizes with the tile set (the caller's stays as it was)."""
    sz = sz.copy()
    sz[9], sz[10] = bq, bk
    return sz


def _parts(tasks: int) -> int:
    """How many parts the backward splits each (batch, head)'s key tiles into: 1 while the
    B * heads tasks fill the threads, else enough to give every thread work."""
    threads = numba.get_num_threads()
    return 1 if tasks >= threads else -(-threads // tasks)


class CpuKernel(Kernel):
    def __init__(self, spec: ir.Spec) -> None:
        self.plan = make_plan(spec)  # derived once; every emitter below reads this plan
        reference = numpy_ref.emit(self.plan)
        self.ref = cache.load_module(reference, "numpy", spec.name)
        self.modules: dict[str, ModuleType] = {}
        super().__init__(spec, "cpu", numba_cpu.emit_source(self.plan), self._forward_impl,
                         self._backward_impl)
        self.row_blocks = self.plan.linear is None or not self.plan.linear.causal

    def module(self, dtype: np.dtype) -> ModuleType:
        name = np.dtype(dtype).name
        if name not in self.modules:
            source = numba_cpu.emit_source(self.plan, name)
            self.modules[name] = cache.load_module(source, "cpu", f"{self.spec.name}_{name}")
        return self.modules[name]

    # ---- arguments ----
    def _common(self, call: Call, dout: np.ndarray | None = None, tiled: bool = True,
                keys: int = tiles.TRANSPOSED, values: bool = True,
                checked: list[tuple[np.ndarray, bool]] | None = None
                ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The rows prologue and the kernels' arguments; `tiled`: with each GEMM's key operand
        in the layout `keys` (tiles.LAYOUTS: transposed, read as stored, or packed in panels;
        sz[12]) and the finiteness check of the careful path (decoding needs neither).
        `values`: v packed for the forward's P @ v too (the backward without a forward to
        recompute reads none); `checked`: operands the caller packed and found finite or not
        while copying them (key_panels), not checked again."""
        linear = self.plan.linear
        check_linear_offsets(linear is not None, linear is not None and linear.causal, call)
        hoisted = [i for i in self.plan.inputs if not (i.is_raw_query or i.is_raw_key)]
        s = call.sizes
        # sz[7]: parts (the backward sets it); sz[8]: a NaN or inf among the row operands (set
        # below); sz[9], sz[10]: the query x key tile (each kernel's launcher sets its own);
        # sz[11]: every position, offset and size below numba_cpu.NARROW_LIMIT (int32 math);
        # sz[12]: the layout of the GEMMs' key operands (`keys`)
        largest = max(int(call.q_offset.max()) + s["n_q"], int(call.k_offset.max()) + s["n_k"],
                      *s.values())
        narrow = largest < numba_cpu.NARROW_LIMIT
        sz = np.array([s["B"], s["heads"], s["kv_heads"], s["n_q"], s["n_k"], s["d"], s["dv"],
                       1, 0, *tiles.DEFAULT, narrow, keys if tiled else tiles.TRANSPOSED],
                      dtype=np.int64)
        t: dict[str, Any] = {}
        maps_finite = True
        if self.plan.feature_maps:  # one fused pass (_maps_fwd) instead of the rows
            inputs, maps_finite = self._run_maps(call, sz, hoisted)
        else:
            if hoisted or dout is not None or self.plan.deriv.sink is not None:
                # else the kernels read q and k themselves and the rows (k per query head: a
                # copy of k under GQA) would be computed for nothing
                with np.errstate(all="ignore"):
                    t = self.ref.rows(numpy_ops, *call.arrays(), **call.offsets)
            inputs = [_kernel_layout(t[numpy_ref.variable(i.node)], i, call.sizes, call.dtype)
                      for i in hoisted]
        params = [p.reshape(1) if p.ndim == 0 else p for p in call.params.values()]
        # what the kernels read: q and k only where they read them raw (phi(q) alone is
        # checked, as an input, unless the maps checked it themselves)
        raw = self.plan.raw_inputs
        operands = [call.q if "q" in raw else None, call.k if "k" in raw else None, call.v,
                    *(inputs if not self.plan.feature_maps else []), *params, dout]
        # checked while copied (transposed, packed): not checked again
        copies_finite = all(finite for _, finite in checked or [])
        copied = [a for a, _ in checked or []]
        if tiled and not self.plan.linear_path:  # each GEMM's key operand: [B, H', F, n_k]
            from .cpu_intrinsics import transposed_rows

            by_node = {id(i.node): a for i, a in zip(
                [i for i in self.plan.inputs if not (i.is_raw_query or i.is_raw_key)], inputs)}
            for r in self.plan.gemms:
                key = self.plan.inputs_of_gemm(r)[1]
                value = call.k if key.is_raw_key else by_node[id(key.node)]
                if keys == tiles.STORED:  # read as it is (kt<n> unread): checked with the
                    inputs.append(value)  # other operands
                    continue
                if keys == tiles.PACKED:
                    value_t, finite = _by_keys(value)
                else:
                    value_t = buffers.empty(value.shape[:2] + value.shape[:1:-1], value.dtype)
                    with _PARALLEL:
                        finite = transposed_rows(value, value_t)
                inputs.append(value_t)
                copies_finite, copied = copies_finite and finite, [*copied, value]
            if self.plan.gemms:  # v in panels for P @ v (checked with the other operands)
                inputs.append(_in_panels(call.v) if keys == tiles.PACKED and values
                              else _no_panels(call.dtype))
        rest = [a for a in operands if not any(a is c for c in copied)]
        sz[8] = tiled and not (maps_finite and copies_finite and _all_finite(rest))
        args = [sz, call.q_offset, call.k_offset, call.q, call.k, call.v, *inputs, *params,
                *call.indices.values()]
        return t, args

    def _run_maps(self, call: Call, sz: np.ndarray, hoisted: list[PairInput]
                  ) -> tuple[list[np.ndarray], bool]:
        """plan.feature_maps, computed in one pass on every thread (`_maps_fwd`): the values of
        the `hoisted` inputs in their order, and whether every value is finite."""
        s = call.sizes
        maps = self.plan.feature_maps or []
        q_blocks, k_blocks = _map_blocks(s, {m.source.name for m in maps})
        rows = {"q": s["n_q"], "k": s["n_k"]}
        outputs = [buffers.empty((s["B"], s["heads"], rows[m.source.name], s["d"]), call.dtype)
                   for m in maps]
        bad = np.zeros(s["B"] * s["heads"] * (q_blocks + k_blocks), np.int64)
        with _PARALLEL:
            threads.run(self.module(call.dtype)._maps_fwd, len(bad), sz, q_blocks, k_blocks,
                        call.q, call.k, *outputs, bad)
        by_item = {id(m.item): value for m, value in zip(maps, outputs)}
        return [by_item[id(i)] for i in hoisted], not bad.any()

    def _run_maps_backward(self, call: Call, sz: np.ndarray,
                           adjoints: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """dq and dk from the maps' adjoints (and the raw q's or k's) in one pass
        (`_maps_bwd`), in place of the reference's rows_backward."""
        s = call.sizes
        maps = self.plan.feature_maps or []
        sides = {m.source.name for m in maps} | self.plan.raw_inputs
        q_blocks, k_blocks = _map_blocks(s, sides)
        dq = (buffers.empty if "q" in sides else buffers.zeros)(call.q.shape, call.dtype)
        dk = (buffers.empty if "k" in sides else buffers.zeros)(call.k.shape, call.dtype)
        names = [numpy_ref.variable(m.item.node) for m in maps]
        names += [f"{side}_rows" for side in ("q", "k") if side in self.plan.raw_inputs]
        tasks = s["B"] * (s["heads"] * q_blocks + s["kv_heads"] * k_blocks)
        with _PARALLEL:
            threads.run(self.module(call.dtype)._maps_bwd, tasks, sz, q_blocks, k_blocks,
                        call.q, call.k, *(adjoints[n] for n in names), dq, dk)
        grads = {"q": dq, "k": dk}
        for name, value in call.params.items():  # only pair-level lookups read params here
            grads[name] = numpy_ops.as_grad(0, value)
        return grads

    def _raise_on(self, err: np.ndarray, call: Call) -> None:
        bad = int(err.max()) if err.size else 0
        if bad:
            # the reference's rows name the subscript and the value of a row-level lookup
            # (the forward skips them when the kernels read q and k themselves)
            with np.errstate(all="ignore"):
                self.ref.rows(numpy_ops, *call.arrays(), **call.offsets)
            lookup = self.plan.lookups[bad - 1]
            subs = lookup.subscripts  # an input's start with its batch axis b: not the spec's
            if any(p.name == lookup.array and p.batched for p in self.plan.spec.params):
                subs = subs[1:]
            raise ValueError(f"a subscript of '{lookup.array}' is out of range: "
                             f"{lookup.array}[{', '.join(map(str, subs))}] reads "
                             "outside the array")

    def tile(self, call: Call, kind: str) -> tuple[int, int]:
        """The (query, key) tile of the "forward" or "backward" kernel for this call."""
        return tiles.choose(self, call, kind)

    def key_layout(self, call: Call, kind: str) -> int:
        """The layout of the "forward" or "backward" kernel's GEMM key operands for this call
        (an index into tiles.LAYOUTS; transposed, unused, without GEMMs or key tiles)."""
        if not self.plan.gemms or self.plan.linear_path:
            return tiles.TRANSPOSED
        return tiles.choose_keys(self, call, kind)

    def _run_forward(self, call: Call, common: tuple[dict[str, Any], list[np.ndarray]] | None
                     = None, tile: tuple[int, int] | None = None, keys: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """`common`: `_common`'s result when the caller already has it (the backward);
        `tile`, `keys`: the tile and key layout to run (the tuner's trials), else the ones
        chosen for this call."""
        from .cpu_intrinsics import single_threaded_blas

        s = call.sizes
        if common is None and self._decoding(s):
            return self._run_decode(call)
        if common is None:
            if keys is None:
                keys = self.key_layout(call, "forward")
            common = self._common(call, keys=keys)
        t, args = common
        # the tiled forward writes every row of out (finish_rows); the linear one adds to it
        out = (buffers.zeros if self.plan.linear_path else buffers.empty)(
            (s["B"], s["heads"], s["n_q"], s["dv"]), call.dtype)
        state = buffers.zeros((s["B"], s["heads"], s["n_q"]), call.dtype)
        bq, bk = tile or self.tile(call, "forward")
        args = [_with_tile(args[0], bq, bk), *args[1:]]
        q_tiles = -(-s["n_q"] // bq)
        err = np.zeros(s["B"] * s["heads"] * q_tiles, np.int64)
        module = self.module(call.dtype)
        if self.plan.linear_path:  # the associative form: O(n d dv) in GEMMs, no tiles
            with _PARALLEL, single_threaded_blas():
                threads.run(module._linear_fwd, s["B"] * s["heads"], *args, out, state)
            return out, state, t
        sink = [] if self.plan.deriv.sink is None else [_sink_rows(t["sink"], s, call.dtype)]
        with _PARALLEL, single_threaded_blas():
            threads.run(module._attn_fwd, len(err), *args, out, state, *sink, err)
        self._raise_on(err, call)
        return out, state, t

    def _decoding(self, sizes: dict[str, int]) -> bool:
        rows = sizes["n_q"] * (sizes["heads"] // sizes["kv_heads"])
        return not self.plan.linear_path and rows <= DECODE_ROWS

    def _run_decode(self, call: Call) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The forward of a few query rows (`_attn_decode`, then `_decode_merge`)."""
        t, args = self._common(call, tiled=False)
        s = call.sizes
        B, H, n_q = s["B"], s["heads"], s["n_q"]
        splits = _decode_splits(B * s["kv_heads"], s["n_k"])
        part_m = buffers.empty((B, H, n_q, splits), call.dtype)
        part_l = buffers.empty((B, H, n_q, splits), call.dtype)
        part_acc = buffers.empty((B, H, n_q, splits, s["dv"]), call.dtype)
        err = np.zeros(B * s["kv_heads"] * splits, np.int64)
        module = self.module(call.dtype)
        with _PARALLEL:
            threads.run(module._attn_decode, len(err), *args, splits, part_m, part_l, part_acc,
                        err)
        self._raise_on(err, call)
        out = buffers.empty((B, H, n_q, s["dv"]), call.dtype)
        state = buffers.empty((B, H, n_q), call.dtype)
        sink = [] if self.plan.deriv.sink is None else [_sink_rows(t["sink"], s, call.dtype)]
        # on this thread: O(B heads n_q splits dv), less than waking a helper costs
        module._decode_merge(0, B * H * n_q, args[0], splits, part_m, part_l, part_acc, out,
                             state, *sink)
        return out, state, t

    def _forward_impl(self, call: Call) -> tuple[np.ndarray, np.ndarray | None]:
        out, state, _ = self._run_forward(call)
        return out, state if self.spec.normalize.kind is NormKind.SOFTMAX else None

    def _backward_impl(self, call: Call, dout: np.ndarray, out: Any, lse: Any, dlse: Any,
                       tile: tuple[int, int] | None = None, keys: int | None = None
                       ) -> dict[str, np.ndarray]:
        """`tile`, `keys`: the backward kernel's tile and key layout (the tuner's trials),
        else the ones chosen."""
        from .cpu_intrinsics import row_dots, single_threaded_blas

        norm = self.spec.normalize.kind
        softmax = norm is NormKind.SOFTMAX
        if keys is None:
            keys = self.key_layout(call, "backward")
        # what was not given is recomputed; what was is trusted as forward's (as on numpy)
        recompute = out is None or (softmax and lse is None) or norm is NormKind.SUM
        raw, checked = self._raw_panels(call, keys, dout)
        # one rows pass and one finiteness check, shared with a recomputed forward (which
        # then reads the keys in the backward's layout)
        t, args = self._common(call, dout, keys=keys, values=recompute, checked=checked)
        if self.plan.linear_path:
            return self._linear_backward(call, t, args, dout, out)
        if recompute:
            fwd_out, state, _ = self._run_forward(call, (t, args))
            out = fwd_out if out is None else out
            state = lse if softmax and lse is not None else state
        else:
            state = lse if lse is not None else buffers.zeros(out.shape[:3], call.dtype)
        s = call.sizes
        B, H = s["B"], s["heads"]
        with _PARALLEL:  # dout and out: C-contiguous, of the call's dtype (Kernel.backward)
            D = row_dots(dout, out)
        if dlse is not None:  # lse's adjoint: d lse / dx_j = P_j, so dS = P (dP - (D - dlse))
            D -= dlse
        bq, bk = tile or self.tile(call, "backward")
        q_tiles = -(-s["n_q"] // bq)
        adjoints: dict[str, np.ndarray] = {}
        for item, value in self._adjoint_shapes(call, q_tiles):
            adjoints[numpy_ref.variable(item.node)] = value
        key_items = [i for i in self.plan.inputs if i.side is Side.KEY]
        other_items = [i for i in self.plan.inputs if i.side is not Side.KEY]
        dv_h = buffers.zeros((B, H, s["n_k"], s["dv"]), call.dtype)
        first = {}
        for x in self.plan.param_lookups:
            first.setdefault(x.array, buffers.zeros((B * H * q_tiles, call.params[x.array].size),
                                               call.dtype))
        module = self.module(call.dtype)
        # One task per (batch, head, part): parts > 1 only while B * heads cannot fill the
        # threads; each part then has its own copy of the query-side adjoints (summed here).
        parts = _parts(B * H)
        parted = {}
        for item in other_items:
            name = numpy_ref.variable(item.node)
            value = adjoints[name]
            parted[name] = value if parts == 1 else buffers.zeros(
                (parts * B,) + value.shape[1:], value.dtype)
        for array, value in list(first.items()):
            if parts > 1:
                first[array] = buffers.zeros((parts * value.shape[0], value.shape[1]),
                                             value.dtype)
        err = np.zeros(B * H * parts, np.int64)
        sz = _with_tile(args[0], bq, bk)
        sz[7] = parts
        panels = self._backward_panels(call, args, keys, raw)
        with _PARALLEL, single_threaded_blas():
            threads.run(module._attn_bwd, len(err), sz, *args[1:], dout, *panels, D, state,
                        *(adjoints[numpy_ref.variable(i.node)] for i in key_items),
                        *(parted[numpy_ref.variable(i.node)] for i in other_items),
                        dv_h, *first.values(), err)
        self._raise_on(err, call)
        if parts > 1:  # the parts' copies, summed in part order (deterministic)
            for name, value in parted.items():
                adjoints[name] = value.reshape((parts, B) + value.shape[1:]).sum(axis=0)
        return self._finish(call, t, args[0], adjoints, dv_h, first, q_tiles, (state, D))

    def _raw_panels(self, call: Call, keys: int, dout: np.ndarray
                    ) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, bool]]]:
        """The backward's raw operands for micro_gemm with the keys in panels (`keys` PACKED),
        packed before the rows prologue: dO (and q where a GEMM reads it) in panels of PANEL
        columns (value_panels; empty unless their width is a multiple of PANEL), v in panels of
        keys (key_panels, which finds whether v is finite: the rows prologue then checks it no
        more, [(v, finite)])."""
        if not self.plan.gemms or keys != tiles.PACKED:
            return {}, []
        v_keys, v_finite = _by_keys(call.v)
        packed = {"dout": _in_panels(dout), "v": v_keys}
        if any(self.plan.inputs_of_gemm(r)[0].is_raw_query for r in self.plan.gemms):
            packed["q"] = _in_panels(call.q)
        return packed, [(call.v, v_finite)]

    def _backward_panels(self, call: Call, args: list[np.ndarray], keys: int,
                         raw: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The backward's operands for micro_gemm with the keys in panels (`keys` PACKED): dO
        and each GEMM's query-side operand in panels of PANEL columns, v in panels of keys (the
        raw ones from `_raw_panels`; the others, computed by the rows prologue and checked
        there, packed here). Empty arrays for the other layouts; none without GEMMs."""
        if not self.plan.gemms:
            return []
        if keys != tiles.PACKED:
            return [_no_panels(call.dtype)] * (2 + len(self.plan.gemms))
        hoisted = [i for i in self.plan.inputs if not (i.is_raw_query or i.is_raw_key)]
        by_node = {id(i.node): a for i, a in zip(hoisted, args[6:])}
        queries = [self.plan.inputs_of_gemm(r)[0] for r in self.plan.gemms]
        return [raw["dout"], raw["v"], *(raw["q"] if a.is_raw_query
                                         else _in_panels(by_node[id(a.node)])
                                         for a in queries)]

    def _linear_backward(self, call: Call, t: dict[str, Any], args: list[np.ndarray],
                         dout: np.ndarray, out: Any) -> dict[str, np.ndarray]:
        """The linear path: its backward computes den_i (the row state) itself, so a given out
        needs no forward run (trusted as forward's, as on numpy)."""
        from .cpu_intrinsics import single_threaded_blas

        if out is None:
            out, _, _ = self._run_forward(call, (t, args))
        s = call.sizes
        q_tiles = -(-s["n_q"] // tiles.DEFAULT[0])  # the linear kernels have no query tiles
        adjoints = {numpy_ref.variable(item.node): value
                    for item, value in self._adjoint_shapes(call, q_tiles)}
        state = buffers.zeros((s["B"], s["heads"], s["n_q"]), call.dtype)  # den_i, written there
        dv_h = buffers.zeros((s["B"], s["heads"], s["n_k"], s["dv"]), call.dtype)
        a, b = self.plan.linear.a, self.plan.linear.b  # type: ignore[union-attr]
        with _PARALLEL, single_threaded_blas():
            threads.run(self.module(call.dtype)._linear_bwd, s["B"] * s["heads"], *args, dout,
                        out, state, adjoints[numpy_ref.variable(a.node)],
                        adjoints[numpy_ref.variable(b.node)], dv_h)
        return self._finish(call, t, args[0], adjoints, dv_h, {}, q_tiles)

    def _finish(self, call: Call, t: dict[str, Any], sz: np.ndarray,
                adjoints: dict[str, np.ndarray], dv_h: np.ndarray, first: dict[str, np.ndarray],
                q_tiles: int, rows: tuple[np.ndarray, np.ndarray] | None = None
                ) -> dict[str, np.ndarray]:
        """The epilogue: row-level adjoints -> q, k, params; dv summed over GQA groups."""
        s = call.sizes
        if self.plan.feature_maps:
            grads = self._run_maps_backward(call, sz, adjoints)
        else:
            grads = self._rows_backward(call, t, adjoints, q_tiles, rows)
        # dv summed over each key/value head's query heads (dv_h itself without GQA: a copy
        # of an N x dv array costs a fresh mapping's page faults at large N)
        grads["v"] = dv_h if s["kv_heads"] == s["heads"] else \
            numpy_ops.group_heads(dv_h, s["kv_heads"])
        for array, partial in first.items():
            shape = call.params[array].shape
            grads[array] = grads[array] + partial.sum(axis=0).reshape(shape)
        return grads

    def _rows_backward(self, call: Call, t: dict[str, Any], adjoints: dict[str, np.ndarray],
                       q_tiles: int, rows: tuple[np.ndarray, np.ndarray] | None
                       ) -> dict[str, np.ndarray]:
        """The reference's rows_backward on the kernels' adjoints (in its 5-D layout)."""
        s = call.sizes
        five_d = {numpy_ref.variable(i.node): _reference_layout(
            adjoints[numpy_ref.variable(i.node)], i, q_tiles) for i in self.plan.inputs}
        if self.plan.deriv.sink is not None:  # the sink's adjoint, -exp(sink - lse) * D per row
            assert rows is not None  # (lse, D) of the tiled path
            lse, D = rows
            sink = _sink_rows(t["sink"], s, call.dtype)
            with np.errstate(all="ignore"):
                five_d["sink"] = (-np.exp(sink - lse) * D)[..., None, None]
        with np.errstate(all="ignore"):
            return dict(self.ref.rows_backward(numpy_ops, t, five_d, call.q, call.k,
                                               *call.params.values()))

    def _adjoint_shapes(self, call: Call, q_tiles: int):  # type: ignore[no-untyped-def]
        s = call.sizes
        B, H = s["B"], s["heads"]
        for item in self.plan.inputs:
            if item.is_raw_query:
                shape: tuple[int, ...] = (B, H, s["n_q"], s["d"])
            elif item.is_raw_key:
                shape = (B, H, s["n_k"], s["d"])
            else:
                lead = {Side.QUERY: (B, H, s["n_q"]), Side.KEY: (B, H, s["n_k"]),
                        Side.CONST: (B, H, q_tiles)}[item.side]
                width = ()
                if item.is_vector:
                    value = self._width(item, call)
                    width = (value,)
                shape = lead + width
            yield item, buffers.zeros(shape, call.dtype)

    def _width(self, item: PairInput, call: Call) -> int:
        node = item.node
        size = getattr(node, "size", "")
        if size in call.sizes:
            return call.sizes[size]
        if size.isdigit():
            return int(size)
        raise AssertionError(f"unknown feature size {size!r}")
