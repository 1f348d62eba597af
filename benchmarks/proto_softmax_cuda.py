"""Prototype: hand-written fused softmax attention for Numba CUDA, forward and backward.

The shape a generated CUDA kernel should take (docs/cuda.md); none of it is project code yet.

    logits[b,h,i,j] = scale * q[b,h,i] . k[b,g,j]     g = h // (heads // kv_heads)
    allowed[i,j]    = j < n_k and (not causal or j <= i + causal_offset)
    out[b,h,i]      = sum_j softmax_j(logits) * v[b,g,j],  lse = log sum_j exp(logits)
    a row with no allowed key: out = 0, lse = -inf

Kernels (one thread per row of a tile, tiles staged in shared memory, no atomics):

    attn_fwd              grid (q tiles, heads, B)     online softmax in registers, saves lse
    attn_bwd_preprocess   grid (q tiles, heads, B)     D = rowsum(dO * O)
    attn_bwd_dkdv         grid (k tiles, kv_heads, B)  dV = P^T dO, dK = scale * dS^T Q, over
                                                       every query head of the kv group
    attn_bwd_dq           grid (q tiles, heads, B)     dQ = scale * dS K
    with P = exp(logits - lse) recomputed, dS = P * (dP - D), dP = dO V^T.

Tile sizes, head dims, causality and dtype are compile-time constants: the kernels are
closures made by ``make_kernels``, and Numba freezes closure variables as constants, which is
what ``cuda.shared.array`` / ``cuda.local.array`` shapes need. Scalars that vary per call
(scale, causal_offset) are kernel arguments and must be passed as np.float32 / np.int32.

Run ``python benchmarks/proto_softmax_cuda.py`` for the PTX/ptxas report (no GPU needed), or
``NUMBA_ENABLE_CUDASIM=1 python benchmarks/proto_softmax_cuda.py --sim`` to check numerics.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attndsl.codegen import cuda_toolchain as tc

# Kernels must name `cuda` as a module global: the simulator runs them by swapping every global
# bound to the numba.cuda module for its fake one, and never sees closure variables.
cuda: Any = tc.require_cuda() if tc.numba_cuda_installed() else None


@dataclass(frozen=True)
class Config:
    bq: int = 64  # query rows per block = threads per block of the query-tile kernels
    bk: int = 64  # key rows per block = threads per block of attn_bwd_dkdv
    d: int = 64
    dv: int = 64
    causal: bool = False
    dtype: str = "float32"
    fastmath: bool = False


@dataclass(frozen=True)
class Kernels:
    config: Config
    fwd: Any
    bwd_preprocess: Any
    bwd_dkdv: Any
    bwd_dq: Any
    signatures: dict[str, str]  # kernel name -> Numba signature, for compile_ptx


def _signatures(dt: str) -> dict[str, str]:
    a3, a4 = f"{dt}[:, :, ::1]", f"{dt}[:, :, :, ::1]"
    return {
        "fwd": f"void({a4}, {a4}, {a4}, {a4}, {a3}, {dt}, int32)",
        "bwd_preprocess": f"void({a4}, {a4}, {a3})",
        "bwd_dkdv": f"void({a4}, {a4}, {a4}, {a4}, {a3}, {a3}, {a4}, {a4}, {dt}, int32)",
        "bwd_dq": f"void({a4}, {a4}, {a4}, {a4}, {a3}, {a3}, {a4}, {dt}, int32)",
    }


@functools.cache
def make_kernels(cfg: Config) -> Kernels:
    """Build the four kernels for one configuration (cached: each is compiled once per
    argument types, on first launch)."""
    tc.require_cuda()
    from numba import types

    BQ, BK, D, DV, CAUSAL = cfg.bq, cfg.bk, cfg.d, cfg.dv, cfg.causal
    DT = getattr(types, cfg.dtype)  # element type of shared/local arrays
    F = getattr(np, cfg.dtype)  # every literal goes through F: a bare 0.0 is float64
    ZERO, ONE, NEG_INF = F(0.0), F(1.0), F(-np.inf)

    def attn_fwd(q, k, v, out, lse, scale, causal_offset):
        t = cuda.threadIdx.x
        b, h = cuda.blockIdx.z, cuda.blockIdx.y
        n_q, n_k = q.shape[2], k.shape[2]
        g = h // (q.shape[1] // k.shape[1])
        q0 = cuda.blockIdx.x * BQ
        i = q0 + t
        k_s = cuda.shared.array((BK, D), DT)
        v_s = cuda.shared.array((BK, DV), DT)
        q_r = cuda.local.array(D, DT)
        acc = cuda.local.array(DV, DT)
        s_r = cuda.local.array(BK, DT)
        for c in range(D):
            q_r[c] = q[b, h, i, c] * scale if i < n_q else ZERO  # scale folded into q
        for c in range(DV):
            acc[c] = ZERO
        m = NEG_INF
        l = ZERO
        # causal: the last row of this tile sees keys < q0 + BQ + offset; later tiles skipped
        k_end = min(n_k, q0 + BQ + causal_offset) if CAUSAL else n_k
        for k0 in range(0, k_end, BK):
            cuda.syncthreads()  # every thread is done with the previous tile
            for idx in range(t, BK * D, BQ):
                r, c = idx // D, idx % D
                k_s[r, c] = k[b, g, k0 + r, c] if k0 + r < n_k else ZERO
            for idx in range(t, BK * DV, BQ):
                r, c = idx // DV, idx % DV
                v_s[r, c] = v[b, g, k0 + r, c] if k0 + r < n_k else ZERO
            cuda.syncthreads()
            t_max = NEG_INF
            for r in range(BK):
                j = k0 + r
                s = NEG_INF
                if j < n_k and (not CAUSAL or j <= i + causal_offset):
                    s = ZERO
                    for c in range(D):
                        s += q_r[c] * k_s[r, c]
                s_r[r] = s
                t_max = max(t_max, s)
            if t_max > NEG_INF:  # else every key of this tile is masked for this row
                m_new = max(m, t_max)
                corr = math.exp(m - m_new)  # m = -inf -> 0
                l *= corr
                for c in range(DV):
                    acc[c] *= corr
                for r in range(BK):
                    p = math.exp(s_r[r] - m_new)  # masked: exp(-inf) = 0
                    l += p
                    for c in range(DV):
                        acc[c] += p * v_s[r, c]
                m = m_new
        if i < n_q:
            if l > ZERO:
                inv = ONE / l
                for c in range(DV):
                    out[b, h, i, c] = acc[c] * inv
                lse[b, h, i] = m + math.log(l)
            else:
                for c in range(DV):
                    out[b, h, i, c] = ZERO
                lse[b, h, i] = NEG_INF

    def attn_bwd_preprocess(out, dout, delta):
        # D = rowsum(dO * O): the softmax backward's per-row term
        b, h = cuda.blockIdx.z, cuda.blockIdx.y
        i = cuda.blockIdx.x * BQ + cuda.threadIdx.x
        if i < out.shape[2]:
            acc = ZERO
            for c in range(DV):
                acc += dout[b, h, i, c] * out[b, h, i, c]
            delta[b, h, i] = acc

    def attn_bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, scale, causal_offset):
        # one thread per key row j; the block loops over all query heads of kv head g, so
        # dK/dV are owned by one thread and need no atomics
        t = cuda.threadIdx.x
        b, g = cuda.blockIdx.z, cuda.blockIdx.y
        n_q, n_k = q.shape[2], k.shape[2]
        group = q.shape[1] // k.shape[1]
        k0 = cuda.blockIdx.x * BK
        j = k0 + t
        q_s = cuda.shared.array((BQ, D), DT)
        do_s = cuda.shared.array((BQ, DV), DT)
        lse_s = cuda.shared.array(BQ, DT)
        delta_s = cuda.shared.array(BQ, DT)
        k_r = cuda.local.array(D, DT)
        v_r = cuda.local.array(DV, DT)
        dk_r = cuda.local.array(D, DT)
        dv_r = cuda.local.array(DV, DT)
        for c in range(D):
            k_r[c] = k[b, g, j, c] * scale if j < n_k else ZERO
            dk_r[c] = ZERO
        for c in range(DV):
            v_r[c] = v[b, g, j, c] if j < n_k else ZERO
            dv_r[c] = ZERO
        # causal: rows i < k0 - offset see none of this tile's keys; skip their tiles
        i_start = 0
        if CAUSAL:
            i_start = (max(0, k0 - causal_offset) // BQ) * BQ
        for hh in range(group):
            h = g * group + hh
            for q0 in range(i_start, n_q, BQ):
                cuda.syncthreads()
                for idx in range(t, BQ * D, BK):
                    r, c = idx // D, idx % D
                    q_s[r, c] = q[b, h, q0 + r, c] if q0 + r < n_q else ZERO
                for idx in range(t, BQ * DV, BK):
                    r, c = idx // DV, idx % DV
                    do_s[r, c] = dout[b, h, q0 + r, c] if q0 + r < n_q else ZERO
                for r in range(t, BQ, BK):
                    lse_s[r] = lse[b, h, q0 + r] if q0 + r < n_q else NEG_INF
                    delta_s[r] = delta[b, h, q0 + r] if q0 + r < n_q else ZERO
                cuda.syncthreads()
                for r in range(BQ):
                    i = q0 + r
                    row_lse = lse_s[r]
                    if (j < n_k and row_lse > NEG_INF
                            and (not CAUSAL or j <= i + causal_offset)):
                        s = ZERO
                        dp = ZERO
                        for c in range(D):
                            s += q_s[r, c] * k_r[c]
                        for c in range(DV):
                            dp += do_s[r, c] * v_r[c]
                        p = math.exp(s - row_lse)
                        ds = p * (dp - delta_s[r])  # softmax bwd: dS = P * (dP - D)
                        for c in range(DV):
                            dv_r[c] += p * do_s[r, c]
                        for c in range(D):
                            dk_r[c] += ds * q_s[r, c]
        if j < n_k:
            for c in range(D):
                dk[b, g, j, c] = dk_r[c] * scale
            for c in range(DV):
                dv[b, g, j, c] = dv_r[c]

    def attn_bwd_dq(q, k, v, dout, lse, delta, dq, scale, causal_offset):
        t = cuda.threadIdx.x
        b, h = cuda.blockIdx.z, cuda.blockIdx.y
        n_q, n_k = q.shape[2], k.shape[2]
        g = h // (q.shape[1] // k.shape[1])
        q0 = cuda.blockIdx.x * BQ
        i = q0 + t
        k_s = cuda.shared.array((BK, D), DT)
        v_s = cuda.shared.array((BK, DV), DT)
        q_r = cuda.local.array(D, DT)
        do_r = cuda.local.array(DV, DT)
        dq_r = cuda.local.array(D, DT)
        for c in range(D):
            q_r[c] = q[b, h, i, c] * scale if i < n_q else ZERO
            dq_r[c] = ZERO
        for c in range(DV):
            do_r[c] = dout[b, h, i, c] if i < n_q else ZERO
        row_lse = lse[b, h, i] if i < n_q else NEG_INF
        row_delta = delta[b, h, i] if i < n_q else ZERO
        k_end = min(n_k, q0 + BQ + causal_offset) if CAUSAL else n_k
        for k0 in range(0, k_end, BK):
            cuda.syncthreads()
            for idx in range(t, BK * D, BQ):
                r, c = idx // D, idx % D
                k_s[r, c] = k[b, g, k0 + r, c] if k0 + r < n_k else ZERO
            for idx in range(t, BK * DV, BQ):
                r, c = idx // DV, idx % DV
                v_s[r, c] = v[b, g, k0 + r, c] if k0 + r < n_k else ZERO
            cuda.syncthreads()
            if row_lse > NEG_INF:
                for r in range(BK):
                    j = k0 + r
                    if j < n_k and (not CAUSAL or j <= i + causal_offset):
                        s = ZERO
                        dp = ZERO
                        for c in range(D):
                            s += q_r[c] * k_s[r, c]
                        for c in range(DV):
                            dp += do_r[c] * v_s[r, c]
                        ds = math.exp(s - row_lse) * (dp - row_delta)
                        for c in range(D):
                            dq_r[c] += ds * k_s[r, c]
        if i < n_q:
            for c in range(D):
                dq[b, h, i, c] = dq_r[c] * scale

    def jit(fn: Any, threads: int) -> Any:
        # launch_bounds = block size lets ptxas use up to 255 registers; the simulator's
        # jit does not accept the keyword
        if tc.simulator_enabled():
            return cuda.jit(fastmath=cfg.fastmath)(fn)
        return cuda.jit(fastmath=cfg.fastmath, launch_bounds=threads)(fn)

    return Kernels(
        config=cfg,
        fwd=jit(attn_fwd, BQ),
        bwd_preprocess=jit(attn_bwd_preprocess, BQ),
        bwd_dkdv=jit(attn_bwd_dkdv, BK),
        bwd_dq=jit(attn_bwd_dq, BQ),
        signatures=_signatures(cfg.dtype),
    )


# --- launching --------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_shapes(cfg: Config, q: Any, k: Any, v: Any) -> None:
    B, H, _, d = q.shape
    if k.shape[0] != B or k.shape[3] != d or v.shape[:3] != k.shape[:3] or H % k.shape[1]:
        raise ValueError(f"bad shapes q{q.shape} k{k.shape} v{v.shape}")
    if (d, v.shape[3]) != (cfg.d, cfg.dv):
        raise ValueError(f"kernels built for d={cfg.d}, dv={cfg.dv}; got {d}, {v.shape[3]}")


def forward(q: Any, k: Any, v: Any, cfg: Config, scale: float | None = None,
            causal_offset: int = 0) -> tuple[Any, Any]:
    """(out, lse). NumPy in -> NumPy out; device arrays in -> device arrays out."""
    _check_shapes(cfg, q, k, v)
    kern = make_kernels(cfg)
    F = getattr(np, cfg.dtype)
    B, H, n_q, _ = q.shape
    scale = 1.0 / math.sqrt(cfg.d) if scale is None else scale
    args = tc.as_device_arrays(q, k, v)
    dq_, dk_, dv_ = args.arrays
    out = args.empty((B, H, n_q, cfg.dv), cfg.dtype)
    lse = args.empty((B, H, n_q), cfg.dtype)
    grid = (_cdiv(n_q, cfg.bq), H, B)
    kern.fwd[grid, cfg.bq](dq_, dk_, dv_, out, lse, F(scale), np.int32(causal_offset))
    return args.result(out, lse)


def backward(q: Any, k: Any, v: Any, out: Any, lse: Any, dout: Any, cfg: Config,
             scale: float | None = None, causal_offset: int = 0) -> tuple[Any, Any, Any]:
    """(dq, dk, dv) from the saved out and lse."""
    _check_shapes(cfg, q, k, v)
    kern = make_kernels(cfg)
    F = getattr(np, cfg.dtype)
    B, H, n_q, _ = q.shape
    KV, n_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(cfg.d) if scale is None else scale
    args = tc.as_device_arrays(q, k, v, out, lse, dout)
    q_, k_, v_, o_, lse_, do_ = args.arrays
    delta = args.empty((B, H, n_q), cfg.dtype)
    dq = args.empty(q.shape, cfg.dtype)
    dk = args.empty(k.shape, cfg.dtype)
    dv = args.empty(v.shape, cfg.dtype)
    s, off = F(scale), np.int32(causal_offset)
    q_grid = (_cdiv(n_q, cfg.bq), H, B)
    kern.bwd_preprocess[q_grid, cfg.bq](o_, do_, delta)
    kern.bwd_dkdv[(_cdiv(n_k, cfg.bk), KV, B), cfg.bk](q_, k_, v_, do_, lse_, delta, dk, dv,
                                                        s, off)
    kern.bwd_dq[q_grid, cfg.bq](q_, k_, v_, do_, lse_, delta, dq, s, off)
    return args.result(dq, dk, dv)


# --- NumPy reference ----------------------------------------------------------------------------


def _allowed(n_q: int, n_k: int, causal: bool, causal_offset: int) -> np.ndarray:
    i = np.arange(n_q)[:, None]
    j = np.arange(n_k)[None, :]
    return (j <= i + causal_offset) if causal else np.ones((n_q, n_k), bool)


def _expand_kv(x: np.ndarray, heads: int) -> np.ndarray:
    return np.repeat(x, heads // x.shape[1], axis=1)  # kv head g serves heads g*G .. g*G+G-1


def reference_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                      causal: bool = False, causal_offset: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    H = q.shape[1]
    ke, ve = _expand_kv(k, H), _expand_kv(v, H)
    allowed = _allowed(q.shape[2], k.shape[2], causal, causal_offset)
    logits = np.where(allowed, scale * np.einsum("bhid,bhjd->bhij", q, ke), -np.inf)
    m = logits.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(logits - m_safe)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(l > 0, e / l, 0.0)
        lse = np.where(l[..., 0] > 0, np.log(l[..., 0]) + m_safe[..., 0], -np.inf)
    out = np.einsum("bhij,bhjd->bhid", p, ve)
    return out.astype(q.dtype), lse.astype(q.dtype)


def reference_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray,
                       scale: float, causal: bool = False, causal_offset: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Materialized softmax backward: dS = P * (dP - rowsum(dO * O))."""
    H, KV = q.shape[1], k.shape[1]
    ke, ve = _expand_kv(k, H), _expand_kv(v, H)
    allowed = _allowed(q.shape[2], k.shape[2], causal, causal_offset)
    logits = np.where(allowed, scale * np.einsum("bhid,bhjd->bhij", q, ke), -np.inf)
    m = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(m), m, 0.0))
    l = e.sum(axis=-1, keepdims=True)
    p = np.divide(e, l, out=np.zeros_like(e), where=l > 0)
    out = np.einsum("bhij,bhjd->bhid", p, ve)
    dp = np.einsum("bhid,bhjd->bhij", dout, ve)
    ds = p * (dp - (dout * out).sum(-1, keepdims=True))
    dq = scale * np.einsum("bhij,bhjd->bhid", ds, ke)
    dk_e = scale * np.einsum("bhij,bhid->bhjd", ds, q)
    dv_e = np.einsum("bhij,bhid->bhjd", p, dout)

    def fold(x: np.ndarray) -> np.ndarray:  # sum the query heads of each kv group
        B, _, n, c = x.shape
        return x.reshape(B, KV, H // KV, n, c).sum(axis=2)

    return dq.astype(q.dtype), fold(dk_e).astype(q.dtype), fold(dv_e).astype(q.dtype)


# --- PTX report -------------------------------------------------------------------------------


KERNEL_NAMES = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")


def ptx_report(cfg: Config, ccs: tuple[tuple[int, int], ...] = ((8, 0), (9, 0))
               ) -> list[dict[str, Any]]:
    """Compile every kernel to PTX per compute capability and assemble it with ptxas -v."""
    kern = make_kernels(cfg)
    rows = []
    for name in KERNEL_NAMES:
        threads = cfg.bk if name == "bwd_dkdv" else cfg.bq
        for cc in ccs:
            t0 = time.perf_counter()
            ptx = tc.compile_ptx(getattr(kern, name), kern.signatures[name], cc=cc,
                                 fastmath=cfg.fastmath, launch_bounds=threads)
            t1 = time.perf_counter()
            rep = tc.assemble(ptx, cc)
            rows.append({
                "kernel": name, "cc": cc, "registers": rep.registers,
                "spill_stores": rep.spill_stores, "spill_loads": rep.spill_loads,
                "stack": rep.stack_bytes, "smem": rep.shared_bytes,
                "f64": [ins.text for ins in tc.f64_instructions(ptx)],
                "compile_s": t1 - t0, "ptxas_s": time.perf_counter() - t1,
            })
    return rows


def _print_report(cfg: Config) -> None:
    print(f"# {cfg}\n# ptxas: {tc.find_ptxas()}")
    print("| kernel | sm | regs | spill st/ld (B) | stack (B) | smem (B) | f64 | nvvm s | ptxas s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in ptx_report(cfg):
        print(f"| {r['kernel']} | {r['cc'][0]}{r['cc'][1]} | {r['registers']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['smem']} | "
              f"{len(r['f64'])} | {r['compile_s']:.2f} | {r['ptxas_s']:.2f} |")


def _simulate() -> None:
    cfg = Config(bq=8, bk=8, d=8, dv=8, causal=True, dtype="float32")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 13, 8), dtype=np.float32)
    k = rng.standard_normal((1, 1, 17, 8), dtype=np.float32)
    v = rng.standard_normal((1, 1, 17, 8), dtype=np.float32)
    t0 = time.perf_counter()
    out, lse = forward(q, k, v, cfg, causal_offset=-3)
    ref_out, _ = reference_forward(q, k, v, 1 / math.sqrt(8), True, -3)
    print(f"simulated forward in {time.perf_counter() - t0:.2f} s; "
          f"max |out - ref| = {np.abs(out - ref_out).max():.2e}; lse[:3] = {lse[0, 0, :3]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", action="store_true", help="run a small case under the simulator")
    ap.add_argument("--tile", type=int, nargs=2, metavar=("BQ", "BK"))
    ap.add_argument("--d", type=int, help="head dim (d = dv)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--fastmath", action="store_true")
    args = ap.parse_args()
    if args.sim:
        _simulate()
        return
    if args.tile or args.d:
        tile, d = args.tile or (64, 64), args.d or 64
        configs = [Config(tile[0], tile[1], d, d, True, args.dtype, args.fastmath)]
    else:  # the table of docs/cuda.md
        configs = [Config(64, 64, 64, 64, True, "float32"),
                   Config(64, 64, 32, 32, True, "float32"),
                   Config(32, 32, 64, 64, True, "float32"),
                   Config(64, 64, 64, 64, True, "float32", fastmath=True),
                   Config(32, 32, 64, 64, True, "float64")]
    for cfg in configs:
        _print_report(cfg)

if __name__ == "__main__":
    main()
