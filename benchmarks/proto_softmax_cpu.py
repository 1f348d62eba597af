"""Hand-written fused softmax-attention prototype on attndsl.codegen.cpu_intrinsics vs torch SDPA.

What a generated CPU kernel should look like: FlashAttention-2 forward (64-query x 128-key
tiles, online softmax in base 2, scale*log2(e) folded into the score GEMM's alpha, K transposed
once per call, causal tile skipping with only the diagonal tile masked, round-robin work items)
and backward (P recomputed from the saved base-2 lse; one pass per head while B*H >= threads,
else dK/dV over key tiles + dQ over query tiles).

Usage (from the repo root, venv active):
    python benchmarks/proto_softmax_cpu.py                 # float32+float64 table, Markdown out
    python benchmarks/proto_softmax_cpu.py --micro         # row max / exp2 ns per element
    python benchmarks/proto_softmax_cpu.py --quick         # N=1024 only, 3 repeats
Set ATTNDSL_PREFER_512BIT=1 (before start) for 512-bit vectors; --both-widths runs both.
"""

from __future__ import annotations

import os

# BLAS inside prange must be single-threaded; set before NumPy/SciPy load their OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attndsl.codegen.cpu_intrinsics import (
    FASTMATH,
    exp2,
    exp2_shift,
    exp2_shift_sum,
    fmax,
    gemm_unchecked,
    row_max,
    single_threaded_blas,
)

BQ = 64  # queries per tile: a 64x128 float32 score tile is 32 KiB, fits L1 with its operands
BK = 128  # keys per tile
LOG2E = 1.4426950408889634
THREADS = 2

# ----------------------------------------------------------------------------------------------
# Kernels. Arrays are (BH, N, D) C-contiguous (BH = B*H) except kt: (BH, D, N); lse/delta
# (BH, N). Tiles are addressed in place through flat element offsets. nthreads comes from the
# launcher: numba.get_num_threads() inside a kernel is a "dynamic global" and defeats cache=True.
# ----------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def transpose_last2(x):
    """(BH, N, D) -> contiguous (BH, D, N): once per call so the score GEMM needs no transpose."""
    bh, n, d = x.shape
    out = np.empty((bh, d, n), x.dtype)
    for h in prange(bh):
        for i in range(n):
            for j in range(d):
                out[h, j, i] = x[h, i, j]
    return out


@njit(cache=True, fastmath=FASTMATH)
def _scale(x, off, n, c):
    """x[off:off+n] *= c; unsigned indices so Numba adds no wraparound and LLVM vectorizes."""
    base = np.uint64(off)
    cx = x.dtype.type(c)  # a float64 factor would drag a float32 row through float64
    for i in range(np.uint64(n)):
        x[base + i] *= cx


@njit(cache=True, fastmath=FASTMATH)
def _fill(x, off, n, value):
    base = np.uint64(off)
    for i in range(np.uint64(n)):
        x[base + i] = value


@njit(cache=True, fastmath=FASTMATH)
def _mask_causal(s, bq, bk, q0, k0):
    """Score tile entries whose key comes after the query get -inf (only the diagonal tile)."""
    for i in range(bq):
        j0 = min(bk, max(0, q0 + i - k0 + 1))
        _fill(s, i * BK + j0, bk - j0, s.dtype.type(-np.inf))


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def fwd_kernel(q, kt, v, o, lse, scale_log2, causal, nthreads):
    """o = softmax(scale q k^T) v per head; lse = base-2 log-sum-exp of the scaled scores."""
    n_bh, n, d = q.shape
    n_qt = (n + BQ - 1) // BQ
    total = n_bh * n_qt
    zero = q.dtype.type(0.0)
    of = o.reshape(o.size)  # flat view for row updates by offset
    for w in prange(nthreads):
        s = np.empty(BQ * BK, q.dtype)
        m = np.empty(BQ, q.dtype)
        ll = np.empty(BQ, q.dtype)
        # Round-robin work items: each thread gets a mix of short and long causal rows.
        for item in range(w, total, nthreads):
            bh = item // n_qt
            q0 = (item % n_qt) * BQ
            bq = min(BQ, n - q0)
            qo = bh * n * d + q0 * d  # flat offset of this query tile in q / o
            k_end = min(n, q0 + bq) if causal else n  # causal: keys beyond the tile are masked
            for i in range(bq):
                m[i] = -np.inf
                ll[i] = zero
            _fill(of, qo, bq * d, zero)
            for k0 in range(0, k_end, BK):
                bk = min(BK, k_end - k0)
                # S = (scale * log2 e) Q K^T: base-2 logits straight out of the GEMM.
                gemm_unchecked(
                    False, False, bq, bk, d, scale_log2,
                    q, qo, d, kt, bh * d * n + k0, n, 0.0, s, 0, BK,
                )  # fmt: skip
                if causal and k0 + bk - 1 > q0:
                    _mask_causal(s, bq, bk, q0, k0)
                for i in range(bq):
                    m_new = fmax(m[i], row_max(s, i * BK, bk))
                    corr = exp2(m[i] - m_new)  # 0 on the first tile (m = -inf)
                    ll[i] = ll[i] * corr + exp2_shift_sum(s, i * BK, bk, m_new)
                    m[i] = m_new
                    if corr != 1.0:
                        _scale(of, qo + i * d, d, corr)
                # O += P V (beta = 1 accumulates in place in the output).
                gemm_unchecked(
                    False, False, bq, d, bk, 1.0,
                    s, 0, BK, v, bh * n * d + k0 * d, d, 1.0, o, qo, d,
                )  # fmt: skip
            for i in range(bq):
                _scale(of, qo + i * d, d, 1.0 / ll[i])
                lse[bh, q0 + i] = m[i] + math.log2(ll[i])


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def delta_kernel(o, do, delta):
    """delta_i = sum_d dO_id O_id (the softmax-backward row term)."""
    n_bh, n, d = o.shape
    for bh in prange(n_bh):
        for i in range(n):
            acc = o.dtype.type(0.0)
            orow, drow = o[bh, i], do[bh, i]
            for j in range(d):
                acc += orow[j] * drow[j]
            delta[bh, i] = acc


@njit(cache=True, fastmath=FASTMATH)
def _probabilities(s, bq, bk, lse, q0, k0, causal):
    """s <- P = 2**(S - lse) row-wise, recomputed from the saved base-2 lse (masked -> 0)."""
    if causal and k0 + bk - 1 > q0:
        _mask_causal(s, bq, bk, q0, k0)
    for i in range(bq):
        exp2_shift(s, i * BK, bk, lse[q0 + i])


@njit(cache=True, fastmath=FASTMATH)
def _ds(s, dp, bq, bk, delta, row0):
    """dp <- dS = P * (dP - delta_i) on a tile (vectorized row by row)."""
    for i in range(bq):
        di = delta[row0 + i]
        base = np.uint64(i * BK)
        for j in range(np.uint64(bk)):
            dp[base + j] = s[base + j] * (dp[base + j] - di)


@njit(cache=True, fastmath=FASTMATH)
def _bwd_tile(q, k, kt, v, do, lse2, delta2, dq, dk, dv, s, dp, bh, q0, k0, scale, causal,
              do_q, do_kv):  # fmt: skip
    """All of one (query tile, key tile) pair: S, P, [dV], dP, dS, [dQ], [dK] -- up to 5 GEMMs."""
    _, n, d = q.shape
    bq = min(BQ, n - q0)
    bk = min(BK, n - k0)
    base = bh * n * d
    qo, ko = base + q0 * d, base + k0 * d
    gemm_unchecked(
        False, False, bq, bk, d, scale * LOG2E,
        q, qo, d, kt, bh * d * n + k0, n, 0.0, s, 0, BK,
    )  # fmt: skip
    _probabilities(s, bq, bk, lse2[bh], q0, k0, causal)
    if do_kv:  # dV_j += P^T dO_i
        gemm_unchecked(True, False, bk, d, bq, 1.0, s, 0, BK, do, qo, d, 1.0, dv, ko, d)
    # dP = dO_i V_j^T
    gemm_unchecked(False, True, bq, bk, d, 1.0, do, qo, d, v, ko, d, 0.0, dp, 0, BK)
    _ds(s, dp, bq, bk, delta2[bh], q0)
    if do_q:  # dQ_i += scale dS K_j
        gemm_unchecked(False, False, bq, d, bk, scale, dp, 0, BK, k, ko, d, 1.0, dq, qo, d)
    if do_kv:  # dK_j += scale dS^T Q_i
        gemm_unchecked(True, False, bk, d, bq, scale, dp, 0, BK, q, qo, d, 1.0, dk, ko, d)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def bwd_per_head(q, k, kt, v, do, lse, delta, dq, dk, dv, scale, causal, nthreads):
    """One pass per head (race-free while B*H >= threads): key tiles outer, query tiles inner."""
    n_bh, n, _ = q.shape
    n_qt = (n + BQ - 1) // BQ
    for bh in prange(n_bh):
        s = np.empty(BQ * BK, q.dtype)
        dp = np.empty(BQ * BK, q.dtype)
        for k0 in range(0, n, BK):
            first = k0 // BQ if causal else 0  # query tiles entirely before k0 see no key here
            for qt in range(first, n_qt):
                _bwd_tile(q, k, kt, v, do, lse, delta, dq, dk, dv, s, dp, bh, qt * BQ, k0,
                          scale, causal, True, True)  # fmt: skip


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def bwd_kv(q, k, kt, v, do, lse, delta, dq, dk, dv, scale, causal, nthreads):
    """Two-pass backward, pass 1: dK, dV; work items = (head, key tile), round-robin."""
    n_bh, n, _ = q.shape
    n_qt = (n + BQ - 1) // BQ
    n_kt = (n + BK - 1) // BK
    total = n_bh * n_kt
    for w in prange(nthreads):
        s = np.empty(BQ * BK, q.dtype)
        dp = np.empty(BQ * BK, q.dtype)
        for item in range(w, total, nthreads):
            bh = item // n_kt
            k0 = (item % n_kt) * BK
            first = k0 // BQ if causal else 0
            for qt in range(first, n_qt):
                _bwd_tile(q, k, kt, v, do, lse, delta, dq, dk, dv, s, dp, bh, qt * BQ, k0,
                          scale, causal, False, True)  # fmt: skip


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def bwd_q(q, k, kt, v, do, lse, delta, dq, dk, dv, scale, causal, nthreads):
    """Two-pass backward, pass 2: dQ; work items = (head, query tile), round-robin."""
    n_bh, n, _ = q.shape
    n_qt = (n + BQ - 1) // BQ
    total = n_bh * n_qt
    for w in prange(nthreads):
        s = np.empty(BQ * BK, q.dtype)
        dp = np.empty(BQ * BK, q.dtype)
        for item in range(w, total, nthreads):
            bh = item // n_qt
            q0 = (item % n_qt) * BQ
            k_end = min(n, q0 + BQ) if causal else n
            for k0 in range(0, k_end, BK):
                _bwd_tile(q, k, kt, v, do, lse, delta, dq, dk, dv, s, dp, bh, q0, k0,
                          scale, causal, True, False)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launchers (what a generated module's Python entry points do).
# ----------------------------------------------------------------------------------------------


def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> tuple:
    """(B, H, N, D) inputs -> (o, saved) with saved = (q3, k3, kt, v3, o3, lse) for backward."""
    b, h, n, d = q.shape
    q3, k3, v3 = (np.ascontiguousarray(x).reshape(b * h, n, d) for x in (q, k, v))
    o3 = np.empty_like(q3)
    lse = np.empty((b * h, n), q.dtype)
    scale = 1.0 / math.sqrt(d)
    with single_threaded_blas():
        kt = transpose_last2(k3)
        fwd_kernel(q3, kt, v3, o3, lse, scale * LOG2E, causal, numba.get_num_threads())
    return o3.reshape(q.shape), (q3, k3, kt, v3, o3, lse, scale, causal)


def backward(do: np.ndarray, saved: tuple, two_pass: bool | None = None) -> tuple:
    """Gradients (dq, dk, dv) of sum(o * do); two_pass=None picks by B*H vs threads."""
    q3, k3, kt, v3, o3, lse, scale, causal = saved
    do3 = np.ascontiguousarray(do).reshape(o3.shape)
    delta = np.empty_like(lse)
    dq, dk, dv = (np.zeros_like(q3) for _ in range(3))
    nthreads = numba.get_num_threads()
    if two_pass is None:
        two_pass = q3.shape[0] < nthreads
    args = (q3, k3, kt, v3, do3, lse, delta, dq, dk, dv, scale, causal, nthreads)
    with single_threaded_blas():
        delta_kernel(o3, do3, delta)
        if two_pass:
            bwd_kv(*args)
            bwd_q(*args)
        else:
            bwd_per_head(*args)
    return tuple(x.reshape(do.shape) for x in (dq, dk, dv))


# ----------------------------------------------------------------------------------------------
# Benchmark harness.
# ----------------------------------------------------------------------------------------------


def _busy_jiffies() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process incl. all threads)."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(cpu) - cpu[3] - cpu[4], int(fields[11]) + int(fields[12])  # minus idle, iowait


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds other processes used meanwhile) for one call of fn."""
    tick = os.sysconf("SC_CLK_TCK")
    busy0, own0 = _busy_jiffies()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    busy1, own1 = _busy_jiffies()
    return wall, max(0, (busy1 - busy0) - (own1 - own0)) / tick


def _median_interleaved(
    fns: dict[str, Callable[[], object]], reps: int, max_foreign: float = 0.10
) -> tuple[dict[str, float], int]:
    """Median wall time of each fn, run in alternation so drift hits all of them alike.

    The machine is shared (2 cores): a round in which other processes used more than
    max_foreign of the cores' time is discarded and repeated (up to 6*reps extra rounds).
    Returns the medians and the number of discarded rounds.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    discarded = 0
    while len(next(iter(times.values()))) < reps:
        got = {name: _timed(fn) for name, fn in fns.items()}
        noisy = any(foreign > max_foreign * THREADS * wall for wall, foreign in got.values())
        if noisy and discarded < 6 * reps:
            discarded += 1
            time.sleep(0.2)
            continue
        for name, (wall, _) in got.items():
            times[name].append(wall)
    return {k: float(np.median(v)) for k, v in times.items()}, discarded


def _torch_fns(torch, q, k, v, do, causal: bool):
    tq, tk, tv, tdo = (torch.from_numpy(x) for x in (q, k, v, do))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.no_grad():
            return sdpa(tq, tk, tv, is_causal=causal)

    leaves = [x.clone().requires_grad_(True) for x in (tq, tk, tv)]

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        out = sdpa(*leaves, is_causal=causal)
        out.backward(tdo)
        return out, [x.grad for x in leaves]

    return fwd, fwd_bwd


def run_case(torch, dtype, n: int, causal: bool, reps: int, two_pass: bool | None) -> dict:
    rng = np.random.default_rng(n + causal)
    shape = (1, 8, n, 64)
    q, k, v, do = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    t_fwd, t_fwd_bwd = _torch_fns(torch, q, k, v, do, causal)

    def ours_fwd():
        return forward(q, k, v, causal)

    def ours_fwd_bwd():
        o, saved = forward(q, k, v, causal)
        return o, backward(do, saved, two_pass)

    # Correctness vs torch (same inputs); also warms up / compiles.
    o, grads = ours_fwd_bwd()
    to, tgrads = t_fwd_bwd()
    err_o = float(np.max(np.abs(o - to.detach().numpy())))
    err_g = max(float(np.max(np.abs(g - tg.numpy()))) for g, tg in zip(grads, tgrads, strict=True))
    t_fwd(), ours_fwd()
    fwd_t, noisy_f = _median_interleaved({"ours": ours_fwd, "torch": t_fwd}, reps)
    fb_t, noisy_b = _median_interleaved({"ours": ours_fwd_bwd, "torch": t_fwd_bwd}, reps)
    return {
        "dtype": np.dtype(dtype).name, "n": n, "causal": causal,
        "fwd_ours_ms": fwd_t["ours"] * 1e3, "fwd_torch_ms": fwd_t["torch"] * 1e3,
        "fb_ours_ms": fb_t["ours"] * 1e3, "fb_torch_ms": fb_t["torch"] * 1e3,
        "err_o": err_o, "err_grad": err_g, "discarded_rounds": noisy_f + noisy_b,
    }  # fmt: skip


def _reference_check_f64(n: int = 256) -> dict:
    """float64 kernel vs a direct NumPy float64 softmax attention and its analytic gradient."""
    rng = np.random.default_rng(7)
    q, k, v, do = (rng.standard_normal((1, 2, n, 64)) for _ in range(4))
    out = {}
    for causal in (False, True):
        s = q @ k.transpose(0, 1, 3, 2) / 8.0
        if causal:
            s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o_ref = p @ v
        dp = do @ v.transpose(0, 1, 3, 2)
        ds = p * (dp - (do * o_ref).sum(-1, keepdims=True))
        ref = (
            o_ref,
            ds @ k / 8.0,
            ds.transpose(0, 1, 3, 2) @ q / 8.0,
            p.transpose(0, 1, 3, 2) @ do,
        )
        o, saved = forward(q, k, v, causal)
        errs = []
        for two_pass in (False, True):
            grads = backward(do, saved, two_pass)
            errs.append(
                max(float(np.max(np.abs(a - b))) for a, b in zip(grads, ref[1:], strict=True))
            )
        out["causal" if causal else "full"] = (float(np.max(np.abs(o - ref[0]))), max(errs))
    return out


def micro() -> dict:
    """ns/element of the vectorized row max, Numba's max, and exp2_shift_sum on 64x128 tiles."""

    @njit(fastmath=FASTMATH)
    def rm_loop(x, reps):
        acc = x.dtype.type(0.0)
        for _ in range(reps):
            for j in range(x.size // BK):
                acc += row_max(x, j * BK, BK)
        return acc

    @njit(fastmath=FASTMATH)
    def numba_max_loop(x, reps):
        acc = x.dtype.type(0.0)
        for _ in range(reps):
            for j in range(x.size // BK):
                row = x[j * BK : (j + 1) * BK]
                mx = x.dtype.type(-np.inf)
                for i in range(row.size):
                    mx = max(mx, row[i])
                acc += mx
        return acc

    @njit(fastmath=FASTMATH)
    def exp_loop(x, reps):
        acc = x.dtype.type(0.0)
        for _ in range(reps):
            for j in range(x.size // BK):
                acc += exp2_shift_sum(x, j * BK, BK, x.dtype.type(0.0))
        return acc

    res = {}
    for dtype in (np.float32, np.float64):
        x0 = -np.random.default_rng(0).random(BQ * BK).astype(dtype)
        for name, fn in (("row_max", rm_loop), ("numba max()", numba_max_loop),
                         ("exp2_shift_sum", exp_loop)):  # fmt: skip
            fn(x0.copy(), 1)
            best = min(_time_once(fn, x0.copy(), 300) for _ in range(7))
            res[f"{name} {np.dtype(dtype).name}"] = best / (300 * x0.size) * 1e9
    return res


def _time_once(fn, x, reps) -> float:
    t0 = time.perf_counter()
    fn(x, reps)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--two-pass", action="store_true", help="force the two-pass backward")
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument(
        "--first", choices=("numba", "torch"), default="numba",
        help="whose OpenMP runtime starts first: Numba's omp layer and torch share one libgomp "
        "(same soname); the one started second ran 1.5-3x slower in our measurements",
    )  # fmt: skip
    args = ap.parse_args()
    if args.first == "torch" and not args.micro:
        import torch

        torch.set_num_threads(THREADS)
        torch.nn.functional.scaled_dot_product_attention(*(torch.ones(1, 1, 8, 8),) * 3)
    numba.set_num_threads(THREADS)
    width = "512" if "-prefer-256-bit" in (os.environ.get("NUMBA_CPU_FEATURES") or "") else "256"
    if args.micro:
        res = micro()
        for k, v in res.items():
            print(f"{k:28s} {v:7.3f} ns/element  (prefer {width}-bit)")
        if args.json:
            Path(args.json).write_text(json.dumps({"width": width, "micro": res}))
        return
    import torch

    torch.set_num_threads(THREADS)
    sizes = [1024] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = 3 if args.quick else args.reps
    rows = []
    print(f"# torch {torch.__version__}, numba {numba.__version__}, threads {THREADS}, "
          f"prefer {width}-bit, reps {reps}, {args.first} started first", flush=True)  # fmt: skip
    print("f64 reference check (max abs err o, grads):", _reference_check_f64(), flush=True)
    for dtype in [np.dtype(x).type for x in args.dtypes.split(",")]:
        for n in sizes:
            for causal in (False, True):
                r = run_case(torch, dtype, n, causal, reps, True if args.two_pass else None)
                rows.append(r)
                print(
                    f"{r['dtype']} N={n:5d} {'causal' if causal else 'full  '}: "
                    f"fwd {r['fwd_ours_ms']:8.1f} / {r['fwd_torch_ms']:8.1f} ms "
                    f"= {r['fwd_torch_ms'] / r['fwd_ours_ms']:.2f}x | "
                    f"fwd+bwd {r['fb_ours_ms']:8.1f} / {r['fb_torch_ms']:8.1f} ms "
                    f"= {r['fb_torch_ms'] / r['fb_ours_ms']:.2f}x | "
                    f"err o {r['err_o']:.1e} grad {r['err_grad']:.1e} "
                    f"(noisy rounds redone: {r['discarded_rounds']})",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps({"width": width, "first": args.first, "rows": rows}))


if __name__ == "__main__":
    if "--both-widths" in sys.argv:  # each width needs its own process (see cpu_intrinsics)
        rest = [a for a in sys.argv[1:] if a != "--both-widths"]
        for flag in ("0", "1"):
            env = dict(os.environ, ATTNDSL_PREFER_512BIT=flag)
            env.pop("NUMBA_CPU_FEATURES", None)
            subprocess.run([sys.executable, __file__, *rest], env=env, check=True)
    else:
        main()
