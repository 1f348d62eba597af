"""The CUDA target's host side: validation, the NumPy prologue/epilogue, launches, PTX.

NumPy arrays in -> NumPy arrays out (copied to and from the device). Device arrays in
(`__cuda_array_interface__`: Numba, CuPy, PyTorch) -> device arrays out. When the pair kernel
reads only q and k themselves (scaled dot-product, causal, ALiBi, document masks...), q, k and v
never leave the device; otherwise the hoisted row terms (`rows`) are computed on the host, so q
and k are copied down once, and the row-level adjoints are chained back on the host
(`rows_backward`) -- an O(n d) round trip per call, documented in docs/cuda.md.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import numpy as np
import sympy as sp

from .. import ir
from ..codegen import cuda_toolchain as tc
from ..codegen import numpy_ref
from ..codegen.numba_cuda import (
    LINEAR_KERNELS,
    Config,
    Layout,
    emit_module,
    fit_tiles,
    linear_inputs,
    make_layout,
)
from ..ir import NormKind, Side
from ..plan import make_plan
from ..symbolic import OFFSETS, POSITIONS, SIZES, local_subscripts
from . import cache, numpy_ops
from .kernel import Call, Kernel, check_dlse_shape, check_linear_offsets

KERNELS = ("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq")

# the stream every copy and launch of a call goes on (0: Numba's default stream)
_STREAM: contextvars.ContextVar[Any] = contextvars.ContextVar("attndsl_cuda_stream", default=0)


@contextlib.contextmanager
def launch_stream(stream: Any) -> Iterator[None]:
    """Calls of the cuda target inside the block copy and launch on `stream` (a Numba stream,
    e.g. `numba.cuda.external_stream(torch.cuda.current_stream().cuda_stream)`), so they are
    ordered with the caller's other work on that stream; host results synchronize it."""
    token = _STREAM.set(stream)
    try:
        yield
    finally:
        _STREAM.reset(token)


def _five_d(value: Any, dtype: Any) -> np.ndarray:
    """A row value of the reference's 5-D layout (constants may come unexpanded)."""
    value = np.asarray(value, dtype=dtype)
    return value.reshape((1,) * (5 - value.ndim) + value.shape)


def _host(a: Any) -> np.ndarray:
    return a.copy_to_host(stream=_STREAM.get()) if hasattr(a, "copy_to_host") else np.asarray(a)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- host helpers: subscripts of in-kernel lookups -----------------------------------------


def host_source(layout: Layout) -> str:
    """NumPy functions over the reference's 5-D layout: every in-kernel lookup (exact range
    check with the reference's error), and the subscripts of each lookup with a gradient."""
    deriv = layout.plan.deriv
    em = numpy_ref.Emitter(layout.plan)
    w = em.w
    args = ", ".join([*numpy_ref.call_args(deriv), "q_offset=0, k_offset=0"])
    w('"""attndsl CUDA host helpers (generated; do not edit)."""')
    w()
    w()
    with w.block(f"def lookups(xp, {args}):"):
        em.prologue()
        for node in layout.plan.lookups:
            em.forward_node(node)
        w("return locals()")
    w()
    w()
    with w.block(f"def subscripts(xp, {args}):"):
        em.prologue()
        for node in layout.plan.lookups:  # every one: a subscript may read a param's (tau)
            em.forward_node(node)
        w("out = {}")
        for node in layout.grad_lookups:
            subs = em.subscripts(node.array, node.subscripts)
            w(f"out[{node.name!r}] = ({subs}{',' if subs else ''})")
        w("return out")
    return w.text()


def _span(offsets: np.ndarray, extent: int) -> tuple[int, int]:
    """The positions offset + 0 .. offset + extent over every batch."""
    return int(offsets.min()), int(offsets.max()) + extent


def _interval(e: sp.Basic, env: dict[sp.Symbol, tuple[int, int]]) -> tuple[int, int] | None:
    """Integer bounds of a subscript over every (b, h, i, j); None when unknown."""
    if e.is_Integer:
        return int(e), int(e)
    if isinstance(e, sp.Symbol):
        return env.get(e)
    parts = [_interval(a, env) for a in e.args] if e.args else []
    if any(p is None for p in parts) and not isinstance(e, sp.floor):
        return None
    if isinstance(e, sp.Add):
        return sum(p[0] for p in parts), sum(p[1] for p in parts)  # type: ignore[index]
    if isinstance(e, sp.Mul):
        lo, hi = 1, 1
        for p in parts:
            c = [lo * p[0], lo * p[1], hi * p[0], hi * p[1]]  # type: ignore[index]
            lo, hi = min(c), max(c)
        return lo, hi
    if isinstance(e, (sp.Max, sp.Min)):
        pick = max if isinstance(e, sp.Max) else min
        return pick(p[0] for p in parts), pick(p[1] for p in parts)  # type: ignore[index]
    if isinstance(e, sp.Abs):
        lo, hi = parts[0]  # type: ignore[misc]
        if lo >= 0:
            return lo, hi
        if hi <= 0:
            return -hi, -lo
        return 0, max(-lo, hi)
    if isinstance(e, sp.floor):
        num, den = e.args[0].as_numer_denom()
        n = _interval(num, env)
        if n is None or not den.is_Integer or den <= 0:
            return None
        return n[0] // int(den), n[1] // int(den)
    if isinstance(e, sp.Mod) and e.args[1].is_Integer and e.args[1] > 0:
        m = int(e.args[1])
        lo, hi = parts[0]  # type: ignore[misc]
        if lo // m == hi // m:
            return lo % m, hi % m
        return 0, m - 1
    return None


# ---- the kernel ------------------------------------------------------------------------------


class CudaKernel(Kernel):
    """A spec compiled for Numba CUDA; `.ptx(cc, dtype)` needs no GPU."""

    def __init__(self, spec: ir.Spec, tiles: tuple[int, int, int, int] | None = None) -> None:
        self.plan = make_plan(spec)
        self.layout = make_layout(self.plan)
        self.tiles = tiles
        self._modules: dict[Config, Any] = {}
        ref_source = numpy_ref.emit(self.plan)
        self.ref = cache.load_module(ref_source, "numpy", spec.name)
        self.host = cache.load_module(host_source(self.layout), "cuda", f"{spec.name}_host")
        source = emit_module(self.layout, fit_tiles(self.layout, Config()))
        super().__init__(spec, "cuda", source, self._forward_host, self._backward_host)
        self.row_blocks = self.plan.linear is None or not self.plan.linear.causal

    # ---- configuration and modules ----
    def config(self, call: Call | None = None, dtype: str = "float32") -> Config:
        sizes: tuple[tuple[str, int], ...] = ()
        if call is not None:
            dtype = np.dtype(call.dtype).name
            sizes = tuple((n, int(call.sizes[n])) for n in self.layout.sizes)
        tiles = self.tiles or (64, 64, 32, 32)
        return fit_tiles(self.layout, Config(dtype, *tiles, sizes=sizes))  # type: ignore[arg-type]

    def module(self, config: Config) -> Any:
        if config not in self._modules:
            source = emit_module(self.layout, config)
            self._modules[config] = cache.load_module(source, "cuda",
                                                      f"{self.spec.name}_{config.dtype}")
        return self._modules[config]

    # ---- PTX ----
    def signatures(self, dtype: str = "float32") -> dict[str, str]:
        lay, dt = self.layout, dtype
        a2, a3, a4 = f"{dt}[:, ::1]", f"{dt}[:, :, ::1]", f"{dt}[:, :, :, ::1]"

        def arr(name: str) -> str:
            param = next((p for p in self.spec.params if p.name == name), None)
            if param is not None:
                nd = max(1, len(param.dims))
                return f"{dt}[{':, ' * (nd - 1)}::1]"
            index = next(x for x in self.spec.indices if x.name == name)
            return f"int64[{':, ' * len(index.dims)}::1]"

        base = ["int32[::1]"] * 2 + [a4, a4, a4] + [a4 for _ in lay.hoisted()] + [arr(a) for a in lay.arrays]
        dq_out = [a4 for _ in lay.dq_inputs()]
        dq_out += [a2 if x.side is Side.PAIR else a3 for x in lay.dq_lookups()]
        dkdv_out = [a4 for _ in lay.side(Side.KEY)] + [a3 for _ in lay.lookups_of(Side.KEY)]
        sig = {
            "attn_fwd": base + [a4, a3] + ([a3] if self.plan.deriv.sink is not None else []),
            "attn_bwd_preprocess": [a4, a4, a3],
            "attn_bwd_dkdv": base + [a4, a3, a3, a4] + dkdv_out,
            "attn_bwd_dq": base + [a4, a3, a3] + dq_out,
        }
        if self.plan.linear_path:
            sig["attn_linear_fwd"] = base + [a4, a3]
            sig["attn_linear_bwd_ab"] = base + [a4, a4, a3, a4, a4]
            sig["attn_linear_bwd_v"] = base + [a4, a4, a3, a4]
        return {name: f"void({', '.join(types)})" for name, types in sig.items()}

    def ptx(self, cc: tuple[int, int] = (8, 0), dtype: str = "float32",
            config: Config | None = None) -> dict[str, str]:
        """{kernel name: PTX} for compute capability `cc`, production tiles by default."""
        cfg = fit_tiles(self.layout, config or Config(dtype, *(self.tiles or (64, 64, 32, 32))))
        mod = self.module(cfg)
        threads = {"attn_fwd": cfg.bq, "attn_bwd_preprocess": cfg.bwd_bq,
                   "attn_bwd_dkdv": cfg.bwd_bk, "attn_bwd_dq": cfg.bwd_bq}
        names = list(KERNELS)
        if self.plan.linear_path:
            a, _ = linear_inputs(self.layout)
            dv, width = cfg.size("dv"), cfg.size(a.size)
            threads.update(attn_linear_fwd=dv, attn_linear_bwd_ab=width, attn_linear_bwd_v=dv)
            names += list(LINEAR_KERNELS)
        sigs = self.signatures(cfg.dtype)
        return {name: tc.compile_ptx(getattr(mod, name), sigs[name], cc=cc,
                                     launch_bounds=threads[name]) for name in names}

    # ---- validation ----
    def _validate_device(self, q: Any, k: Any, v: Any, extra: dict[str, Any]) -> Call:
        """The shared validation, on host stand-ins with the device arrays' shapes and dtypes."""
        stubs = [np.lib.stride_tricks.as_strided(np.zeros(1, np.dtype(a.dtype)), tuple(a.shape),
                                                 (0,) * len(a.shape)) for a in (q, k, v)]
        host_extra = {n: (_to_host(a) if tc.is_device_array(a) else a) for n, a in extra.items()}
        offsets = {n: host_extra.pop(n) for n in ("q_offset", "k_offset") if n in host_extra}
        return self.validate(*stubs, host_extra, **offsets)

    def check_lookups(self, call: Call, host_qkv: tuple[Any, Any, Any]) -> None:
        """Every in-kernel subscript in range, before any launch: interval bounds first, the
        reference's exact evaluation (and its ValueError naming the array) when they fail."""
        if not self.plan.lookups:
            return
        s = call.sizes
        env: dict[sp.Symbol, tuple[int, int]] = {
            POSITIONS["b"]: (0, s["B"] - 1), POSITIONS["h"]: (0, s["heads"] - 1),
            OFFSETS["q"]: _span(call.q_offset, 0), OFFSETS["k"]: _span(call.k_offset, 0),
            POSITIONS["i"]: _span(call.q_offset, s["n_q"] - 1),
            POSITIONS["j"]: _span(call.k_offset, s["n_k"] - 1)}
        env.update({SIZES[n]: (s[n], s[n]) for n in ("d", "dv", "n_q", "n_k", "heads",
                                                      "kv_heads")})
        for node in self.plan.lookups:
            array = call.params.get(node.array)
            shape = array.shape if array is not None else call.indices[node.array].shape[1:]
            local = local_subscripts(self.spec, node.array, node.subscripts)
            bounds = [_interval(e, env) for e in local]
            if any(bd is None or bd[0] < 0 or bd[1] >= n for bd, n in zip(bounds, shape)):
                self._exact_lookups(call, host_qkv)
                return
            if array is None:
                values = call.indices[node.array]
                env[node.symbol] = (int(values.min()), int(values.max()))

    def _exact_lookups(self, call: Call, host_qkv: tuple[Any, Any, Any]) -> None:
        with np.errstate(all="ignore"):
            self.host.lookups(numpy_ops, *host_qkv, *call.params.values(),
                              *call.indices.values(), **call.offsets)

    # ---- forward ----
    def forward(self, q: Any, k: Any, v: Any, return_lse: bool = False,
                **params_and_indices: Any) -> Any:
        if not any(tc.is_device_array(a) for a in (q, k, v)):
            return super().forward(q, k, v, return_lse=return_lse, **params_and_indices)
        call = self._validate_device(q, k, v, params_and_indices)
        run = _Run(self, call, (q, k, v))
        out, state = run.forward()
        lse = state if self.spec.normalize.kind is NormKind.SOFTMAX else None
        return (out, lse) if return_lse else out

    def _forward_host(self, call: Call) -> tuple[np.ndarray, np.ndarray | None]:
        run = _Run(self, call, None)
        out, state = run.forward()
        return run.get(out), run.get(state)

    # ---- backward ----
    def backward(self, q: Any, k: Any, v: Any, dout: Any, out: Any = None, lse: Any = None,
                 dlse: Any = None, **params_and_indices: Any) -> dict[str, Any]:
        if not any(tc.is_device_array(a) for a in (q, k, v)):
            return super().backward(q, k, v, dout, out=out, lse=lse, dlse=dlse,
                                    **params_and_indices)
        call = self._validate_device(q, k, v, params_and_indices)
        self.refuse_dlse(dlse)
        need = call.shape_out
        for name, a in (("dout", dout), ("out", out)):
            if a is not None and tuple(a.shape) != need:
                raise ValueError(f"{name}: expected shape {list(need)}, got {list(a.shape)}")
        if lse is not None and tuple(lse.shape) != need[:3]:
            raise ValueError(f"lse: expected shape {list(need[:3])}, got {list(lse.shape)}")
        if dlse is not None:
            check_dlse_shape(tuple(dlse.shape), call)
        run = _Run(self, call, (q, k, v))
        grads = run.backward(dout, out, lse, dlse)
        for p in self.spec.params:  # param gradients are small host sums: back to the device
            grads[p.name] = run.put(np.ascontiguousarray(
                np.asarray(grads[p.name]).astype(call.param_dtypes[p.name]).reshape(
                    np.shape(_to_host(params_and_indices[p.name])))))
        return grads

    def _backward_host(self, call: Call, dout: np.ndarray, out: Any, lse: Any, dlse: Any
                       ) -> dict[str, np.ndarray]:
        run = _Run(self, call, None)
        grads = run.backward(dout, out, lse, dlse)
        return {n: (run.get(g) if tc.is_device_array(g) else g) for n, g in grads.items()}


def _to_host(a: Any) -> np.ndarray:
    if tc.is_device_array(a) and not hasattr(a, "copy_to_host"):
        a = tc.require_cuda().as_cuda_array(a)
    return _host(a)


class _Run:
    """One call: staged arrays, the host prologue, launches, the host epilogue."""

    def __init__(self, kernel: CudaKernel, call: Call, device_qkv: tuple[Any, ...] | None):
        self.kernel = kernel
        self.layout = kernel.layout
        self.call = call
        self.cfg = kernel.config(call)
        self.mod = kernel.module(self.cfg)
        self.cuda = tc.require_cuda()
        self.on_device = device_qkv is not None
        self.stream = _STREAM.get()
        self.args = tc.as_device_arrays(*(device_qkv or (call.q, call.k, call.v)),
                                        stream=self.stream)
        self.dt = np.dtype(call.dtype)
        s = call.sizes
        self.B, self.H, self.KV = s["B"], s["heads"], s["kv_heads"]
        self.n_q, self.n_k, self.d, self.dv = s["n_q"], s["n_k"], s["d"], s["dv"]
        self._host: tuple[Any, Any, Any] | None = None
        self._rows: dict[str, Any] | None = None
        kernel.check_lookups(call, self.host_qkv(shapes_only=True))
        params = [p.reshape(1) if p.ndim == 0 else p for p in call.params.values()]
        arrays = dict(zip(call.params, params)) | call.indices
        self.arrays = [self.put(arrays[a]) for a in self.layout.arrays]
        self.inputs = self._inputs() if self.layout.needs_rows else []
        linear = kernel.plan.linear
        check_linear_offsets(linear is not None, linear is not None and linear.causal, call)
        # int32 on the device: two registers fewer per thread (latent_rope's forward spilled)
        self.offsets = [self.put(o.astype(np.int32)) for o in (call.q_offset, call.k_offset)]

    def put(self, a: Any) -> Any:
        """A host array copied to the device, on the call's stream."""
        return self.cuda.to_device(np.ascontiguousarray(a), stream=self.stream)

    def get(self, a: Any) -> np.ndarray:
        """A device array copied to the host, on the call's stream (which waits for it)."""
        return a.copy_to_host(stream=self.stream)

    def launch(self, kernel: Any, grid: Any, block: int) -> Any:
        return kernel[grid, block, self.stream]

    def host_qkv(self, shapes_only: bool = False) -> tuple[Any, Any, Any]:
        """q, k, v on the host: the call's arrays, or copies of device arrays (stand-ins with
        the right shapes when only shapes are read)."""
        if not self.on_device:
            return self.call.q, self.call.k, self.call.v
        if shapes_only:
            return self.call.q, self.call.k, self.call.v  # validation stand-ins
        if self._host is None:
            q_, k_, _ = self.args.arrays
            self._host = (self.get(q_), self.get(k_), self.call.v)
        return self._host

    def rows(self) -> dict[str, Any]:
        if self._rows is None:
            c = self.call
            with np.errstate(all="ignore"):
                self._rows = self.kernel.ref.rows(numpy_ops, *self.host_qkv(),
                                                  *c.params.values(), *c.indices.values(),
                                                  **c.offsets)
        return self._rows

    def _inputs(self) -> list[Any]:
        """The hoisted row-level inputs, as [B, H, N, F] device arrays (N = n_q, n_k or 1)."""
        t = self.rows()
        staged = []
        for x in self.layout.hoisted():  # the kernel's argument order (Layout.base_args)
            value = np.asarray(t[x.var], dtype=self.dt)
            if value.ndim < 5:
                value = value.reshape((1,) * (5 - value.ndim) + value.shape)
            F = value.shape[-1]
            if x.side is Side.QUERY:
                a = np.broadcast_to(value, (self.B, self.H, self.n_q, 1, F))[:, :, :, 0]
            elif x.side is Side.KEY:
                a = np.broadcast_to(value, (self.B, self.H, 1, self.n_k, F))[:, :, 0]
            else:
                a = np.broadcast_to(value, (self.B, self.H, 1, 1, F))[:, :, 0]
            staged.append(self.put(a))
        return staged

    def base(self) -> list[Any]:
        return [*self.offsets, *self.args.arrays, *self.inputs, *self.arrays]

    def forward(self) -> tuple[Any, Any]:
        cfg = self.cfg
        out = self.args.empty((self.B, self.H, self.n_q, self.dv), self.dt)
        state = self.args.empty((self.B, self.H, self.n_q), self.dt)
        if self.kernel.plan.linear_path:  # the associative form: one block per (head, batch)
            self.launch(self.mod.attn_linear_fwd, (self.H, self.B), self.dv)(*self.base(), out,
                                                                             state)
            return out, state
        grid = (_cdiv(self.n_q, cfg.bq), self.H, self.B)
        sink = [] if self.sink_rows() is None else [self.put(self.sink_rows())]
        self.launch(self.mod.attn_fwd, grid, cfg.bq)(*self.base(), out, state, *sink)
        return out, state

    def sink_rows(self) -> np.ndarray | None:
        """softmax(sink = e): every row's sink logit [B, H, n_q] (host), None without one."""
        if self.kernel.plan.deriv.sink is None:
            return None
        sink = np.broadcast_to(_five_d(self.rows()["sink"], self.dt)[:, :, :, 0, 0],
                               (self.B, self.H, self.n_q))
        return np.ascontiguousarray(sink)

    def _stage(self, a: Any) -> Any:
        if tc.is_device_array(a):
            return a if hasattr(a, "copy_to_host") else self.cuda.as_cuda_array(a)
        return self.put(np.asarray(a, dtype=self.dt))

    def backward(self, dout: Any, out: Any, lse: Any, dlse: Any = None) -> dict[str, Any]:
        lay, cfg, dt = self.layout, self.cfg, self.dt
        B, H, KV, n_q, n_k = self.B, self.H, self.KV, self.n_q, self.n_k
        norm = self.kernel.spec.normalize.kind
        dout_ = self._stage(dout)
        if out is None or (lay.has_state and (lse is None or norm is NormKind.SUM)):
            out_, state = self.forward()  # `sum` keeps its row sums only inside the forward
            # what was given is trusted as forward's result (as on numpy and cpu)
            out_ = out_ if out is None else self._stage(out)
            if lse is not None and norm is NormKind.SOFTMAX:
                state = self._stage(lse)
        else:
            out_ = self._stage(out)
            state = self._stage(lse) if lse is not None else self.args.empty((B, H, n_q), dt)
        if self.kernel.plan.linear_path:
            return self._linear_backward(dout_, out_, state)
        delta = self.args.empty((B, H, n_q), dt)
        q_grid = (_cdiv(n_q, cfg.bwd_bq), H, B)
        if lay.has_state:
            self.launch(self.mod.attn_bwd_preprocess, q_grid, cfg.bwd_bq)(out_, dout_, delta)
        if dlse is not None:  # lse's adjoint: dS = P (dP - (D - dlse)); an O(B H n_q) round trip
            delta = self.put(np.asarray(_host(delta) - _to_host(dlse), dtype=dt))
        g_v = self.args.empty((B, KV, n_k, self.dv), dt)
        dkdv_out = []
        for x in lay.side(Side.KEY):
            F = self._width(x)
            dkdv_out.append(self.args.zeros((B, KV if x.raw == "k" else H, n_k, F), dt))
        dkdv_out += [self.args.zeros((B, H, n_k), dt) for _ in lay.lookups_of(Side.KEY)]
        nblk = q_grid[0] * H * B
        dq_out = [self.args.zeros((B, H, n_q, self._width(x)), dt) for x in lay.dq_inputs()]
        dq_out += [self._lookup_partial(x, nblk) for x in lay.dq_lookups()]
        if self.sink_rows() is not None:  # its adjoint, for the host epilogue: -exp(sink - lse) D
            with np.errstate(all="ignore"):
                self._d_sink = -np.exp(self.sink_rows() - _host(state)) * _host(delta)
        common = [*self.base(), dout_, state, delta]
        self.launch(self.mod.attn_bwd_dkdv, (_cdiv(n_k, cfg.bwd_bk), KV, B), cfg.bwd_bk)(
            *common, g_v, *dkdv_out)
        if dq_out:  # else nothing query-side has an adjoint: the kernel would write nothing
            self.launch(self.mod.attn_bwd_dq, q_grid, cfg.bwd_bq)(*common, *dq_out)
        return self._epilogue(g_v, dkdv_out, dq_out)

    def _lookup_partial(self, node: Any, nblk: int) -> Any:
        """dq's partial of a lookup: per row, or per block over the whole flattened param
        when its subscripts read both i and j."""
        if node.side is not Side.PAIR:
            return self.args.zeros((self.B, self.H, self.n_q), self.dt)
        size = max(1, int(np.prod(self.call.params[node.array].shape)))
        return self.args.zeros((nblk, size), self.dt)

    def _linear_backward(self, dout: Any, out: Any, state: Any) -> dict[str, Any]:
        """dA and dB by prefix/suffix sums (threads over features), dv (threads over dv);
        key-side results are per query head and summed over GQA groups here."""
        a, b = linear_inputs(self.layout)
        B, H, KV, n_q, n_k, dt = self.B, self.H, self.KV, self.n_q, self.n_k, self.dt
        width = self._width(a)
        d_a = self.args.zeros((B, H, n_q, width), dt)
        d_b = self.args.zeros((B, H, n_k, width), dt)
        dv_h = self.args.zeros((B, H, n_k, self.dv), dt)
        common = [*self.base(), dout, out, state]
        self.launch(self.mod.attn_linear_bwd_ab, (H, B), width)(*common, d_a, d_b)
        self.launch(self.mod.attn_linear_bwd_v, (H, B), self.dv)(*common, dv_h)

        def grouped(x: Any) -> Any:
            return self.put(numpy_ops.group_heads(self.get(x), KV))

        key = grouped(d_b) if b.raw == "k" else d_b
        return self._epilogue(grouped(dv_h), [key], [d_a])

    def _width(self, x: Any) -> int:
        if not x.vector:
            return 1
        if x.raw is not None:
            return self.d
        return int(self.rows()[x.var].shape[-1])

    def _epilogue(self, g_v: Any, dkdv_out: list[Any], dq_out: list[Any]) -> dict[str, Any]:
        lay, call = self.layout, self.call
        key_inputs = lay.side(Side.KEY)
        dq_inputs = lay.dq_inputs()
        adj = dict(zip([x.var for x in key_inputs], dkdv_out))
        adj.update(zip([x.var for x in dq_inputs], dq_out))
        raw_q = next((x for x in lay.inputs if x.raw == "q"), None)
        raw_k = next((x for x in lay.inputs if x.raw == "k"), None)
        grads: dict[str, Any] = {}
        if not lay.needs_rows and self.sink_rows() is None:
            grads["q"] = adj[raw_q.var] if raw_q else self.args.zeros(tuple(call.q.shape), self.dt)
            grads["k"] = adj[raw_k.var] if raw_k else self.args.zeros(tuple(call.k.shape), self.dt)
            for p in self.kernel.spec.params:
                grads[p.name] = np.zeros(call.params[p.name].shape, self.dt)
        else:
            grads = self._rows_backward(adj, raw_k)
            if raw_k is not None:
                grads["k"] = np.asarray(grads["k"]) + self.get(adj[raw_k.var])
            if self.on_device:
                grads["q"] = self.put(np.asarray(grads["q"], self.dt))
                grads["k"] = self.put(np.asarray(grads["k"], self.dt))
        grads["v"] = g_v
        self._lookup_grads(grads, dkdv_out[len(key_inputs):], dq_out[len(dq_inputs):])
        return grads

    def _rows_backward(self, adj: dict[str, Any], raw_k: Any) -> dict[str, Any]:
        lay = self.layout
        B, H = self.B, self.H
        adjoints = {}
        for x in lay.inputs:
            if x.raw == "k":
                adjoints[x.var] = np.zeros((B, H, 1, self.n_k, self.d), self.dt)
                continue
            g = self.get(adj[x.var])
            if x.side is Side.QUERY:
                adjoints[x.var] = g[:, :, :, None, :]
            elif x.side is Side.KEY:
                adjoints[x.var] = g[:, :, None, :, :]
            else:
                adjoints[x.var] = g.sum(axis=2)[:, :, None, None, :]
        if self.sink_rows() is not None:
            adjoints["sink"] = self._d_sink[..., None, None]
        q, k, _ = self.host_qkv()
        with np.errstate(all="ignore"):
            return dict(self.kernel.ref.rows_backward(numpy_ops, self.rows(), adjoints, q, k,
                                                      *self.call.params.values()))

    def _lookup_grads(self, grads: dict[str, Any], key_parts: list[Any],
                      query_parts: list[Any]) -> None:
        lay, call = self.layout, self.call
        if not lay.grad_lookups:
            return
        with np.errstate(all="ignore"):
            subs = self.kernel.host.subscripts(numpy_ops, *self.host_qkv(shapes_only=True),
                                               *call.params.values(), *call.indices.values(),
                                               **call.offsets)
        parts = dict(zip([x.name for x in lay.lookups_of(Side.KEY)], key_parts))
        parts.update(zip([x.name for x in lay.dq_lookups()], query_parts))
        for node in lay.grad_lookups:
            shape = call.params[node.array].shape
            part = self.get(parts[node.name])
            if node.side is Side.PAIR:
                contrib = part.sum(axis=0).reshape(shape)
            else:
                values = (part[:, :, None, :, None] if node.side is Side.KEY
                          else part[:, :, :, None, None])
                contrib = numpy_ops.scatter(shape, subs[node.name], values)
            grads[node.array] = np.asarray(grads[node.array]) + contrib


def compile_kernel(spec: ir.Spec, tiles: tuple[int, int, int, int] | None = None
                   ) -> CudaKernel:
    """A Kernel for the CUDA target: `tiles` = (BQ, BK, backward BQ, backward BK), production
    (64, 64, 32, 32) by default; `.ptx(cc, dtype)` needs no GPU."""
    tc.require_cuda()
    return CudaKernel(spec, tiles)


__all__ = ["CudaKernel", "compile_kernel", "host_source", "launch_stream"]
