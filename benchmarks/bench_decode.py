"""Decoding on the cpu target (issue 12 item 6): a few query rows against a long KV cache.

    python benchmarks/bench_decode.py            # the grid below, 15 interleaved rounds
    python benchmarks/bench_decode.py --quick    # the target case only

Per case, in one process and interleaved round by round: attndsl's decode path
(`_attn_decode` + `_decode_merge`), the tiled forward it replaces (the same kernel module with
`cpu_kernel.DECODE_ROWS = 0`, i.e. before), the NumPy reference (small caches only) and
torch's `scaled_dot_product_attention` (`enable_gqa=True`; no mask for one row, a boolean mask
for several rows' causality). Spec `examples/causal.attn` at q_offset = n_k - n_q (the rows are the newest
positions), float32, d = dv = 64. Reports medians, ratios (other / attndsl: above 1 means
attndsl is faster), and the bytes of K and V read per second against the machine's copy
bandwidth (NumPy copying 256 MiB with every thread, read + write counted).

Each timed call runs warm on a quiet machine, as in benchmarks/bench_cpu.py: a PAUSE_S pause
(torch's OpenMP threads spin for 3-10 ms after each torch call: a 2 ms decoding call right
after SDPA shared the 2 cores with them the whole time), then an untimed call (after the
pause, an idle helper thread woke 1.8-2.8 ms late on these VMs), then the timed one.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy: the kernels own the threads

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from machine import lscpu_model  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attndsl
from attndsl.runtime import cpu_kernel

D = 64
# (B, heads, kv_heads, n_q, n_k): the target first, then the grid it names
TARGET = (1, 8, 2, 1, 32768)
PAUSE_S = 0.01  # before each timed call: the previous contender's threads go idle
GRID = [TARGET, (1, 8, 2, 1, 4096), (1, 8, 2, 1, 131072), (4, 8, 2, 1, 32768),
        (1, 8, 8, 1, 32768), (1, 8, 1, 1, 32768), (1, 8, 2, 2, 32768), (1, 8, 8, 4, 32768),
        (1, 8, 2, 16, 32768)]


def copy_bandwidth() -> float:
    """Bytes per second of a large copy (read + write), the best of 5, numba threads wide."""
    import numba

    @numba.njit(parallel=True)
    def copy(dst, src):  # type: ignore[no-untyped-def]
        for i in numba.prange(src.size):
            dst[i] = src[i]

    src = np.ones(2**26, np.float32)
    dst = np.empty_like(src)
    copy(dst, src)
    best = min(_timed(lambda: copy(dst, src)) for _ in range(5))
    return 2 * src.nbytes / best


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def case(torch, kernel, ref, shape, rounds: int) -> dict:  # type: ignore[no-untyped-def]
    B, H, KV, n_q, n_k = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, H, n_q, D), dtype=np.float32)
    k = rng.standard_normal((B, KV, n_k, D), dtype=np.float32)
    v = rng.standard_normal((B, KV, n_k, D), dtype=np.float32)
    off = n_k - n_q
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    # one new row sees the whole cache: no mask, SDPA's fastest form; more rows need causality
    mask = None if n_q == 1 else torch.from_numpy(np.arange(n_k)[None, :] <=
                                                  off + np.arange(n_q)[:, None])

    def sdpa():  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=mask, enable_gqa=True).numpy()

    def tiled():  # type: ignore[no-untyped-def]
        rows, cpu_kernel.DECODE_ROWS = cpu_kernel.DECODE_ROWS, 0
        try:
            return kernel.forward(q, k, v, q_offset=off)
        finally:
            cpu_kernel.DECODE_ROWS = rows

    runs = {"attndsl": lambda: kernel.forward(q, k, v, q_offset=off), "tiled (before)": tiled,
            "torch SDPA": sdpa}
    if B * H * n_q * n_k <= 2**20:  # the reference materializes the scores
        runs["numpy reference"] = lambda: ref.forward(q, k, v, q_offset=off)
    want = runs["attndsl"]()
    errors = {name: float(np.max(np.abs(run() - want))) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            time.sleep(PAUSE_S)
            run()  # untimed: this contender's threads are awake for the timed call
            times[name].append(_timed(run))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"shape": shape, "medians": medians, "errors": errors,
            "kv_bytes": 2 * B * KV * n_k * D * 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the target case only")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/decode.md")
    args = ap.parse_args()
    import numba
    import torch

    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    kernel = attndsl.compile(ROOT / "examples/causal.attn", target="cpu")
    ref = attndsl.compile(ROOT / "examples/causal.attn", target="numpy")
    bandwidth = copy_bandwidth()
    load = os.getloadavg()[0]
    rows = []
    for shape in [TARGET] if args.quick else GRID:
        r = case(torch, kernel, ref, shape, args.rounds)
        m = r["medians"]
        ours = m["attndsl"]
        rows.append((r, ours))
        print(shape, {n: f"{t * 1e3:.2f} ms" for n, t in m.items()}, flush=True)
    lines = [
        "# Decoding on the cpu target: a few query rows against a long KV cache",
        "",
        (f"Produced by `benchmarks/bench_decode.py` on {time.strftime('%Y-%m-%d %H:%M')} UTC. "
        f"Machine: lscpu \"{lscpu_model()}\", {os.cpu_count()} cores; numba "
        f"{numba.__version__} ({numba.threading_layer()}, {threads} threads), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads); load average {load:.2f} at "
        f"the start, {os.getloadavg()[0]:.2f} at the end. Copy bandwidth {bandwidth / 1e9:.1f} "
        "GB/s (read + write)."),
        "",
        ("Spec `examples/causal.attn`, float32, d = dv = 64, q_offset = n_k - n_q; medians of "
        f"{args.rounds} interleaved rounds. Ratios are other / attndsl (above 1: attndsl is "
        "faster). KV GB/s: bytes of K and V over attndsl's time."),
        "",
        ("| B | heads | kv_heads | n_q | n_k | attndsl ms | tiled (before) ms | SDPA ms | "
        "before / attndsl | SDPA / attndsl | KV GB/s | of copy bandwidth | max abs diff |"),
        ("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |"),
    ]
    for r, ours in rows:
        B, H, KV, n_q, n_k = r["shape"]
        m = r["medians"]
        rate = r["kv_bytes"] / ours
        lines.append(
            f"| {B} | {H} | {KV} | {n_q} | {n_k} | {ours * 1e3:.2f} | "
            f"{m['tiled (before)'] * 1e3:.2f} | {m['torch SDPA'] * 1e3:.2f} | "
            f"{m['tiled (before)'] / ours:.2f} | {m['torch SDPA'] / ours:.2f} | "
            f"{rate / 1e9:.1f} | {rate / bandwidth:.0%} | {max(r['errors'].values()):.1e} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
