"""Causal linear attention on the `cpu` target, before/after in ONE process (issue 12 item 4).

The "before" checkout is imported as a renamed copy (see ab_cpu_one_process.py); every round
calls before and after back to back on the same arrays, alternating which goes first. Per side
and size: forward+backward wall time (the call as a user makes it: forward, then backward with
out given), the time inside the two Numba kernels alone (`_linear_fwd`, `_linear_bwd`, timed
by wrapping the module's functions), and the call's system time and minor page faults (the
NumPy prologue/epilogue allocates N x d temporaries; on a VM their page faults can cost more
than the kernels). Medians, and the median of the per-round after/before ratios.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_linear.py --before /tmp/before --sizes 8192,65536 --rounds 5
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy: the kernels own the threads
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")  # OpenMP's spinning workers slow
# the NumPy epilogue that runs right after each kernel

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
from ab_cpu_one_process import import_renamed  # beside this script
from machine import lscpu_model

ROOT = Path(__file__).resolve().parents[1]
B, H, D = 1, 8, 64
KERNELS = ("_linear_fwd", "_linear_bwd")


class Side:
    """One checkout's compiled spec, with its kernels' time recorded per call."""

    def __init__(self, package, spec_file: str) -> None:  # type: ignore[no-untyped-def]
        self.kern = package.compile(spec_file, target="cpu")
        self.module = self.kern.module(np.float32)
        self.inside = 0.0
        for name in KERNELS:
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        fn = getattr(self.module, name)

        def timed(*args):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            fn(*args)
            self.inside += time.perf_counter() - t0

        setattr(self.module, name, timed)

    def fwd_bwd(self, q, k, v, dout) -> dict[str, float]:  # type: ignore[no-untyped-def]
        self.inside = 0.0
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = self.kern.forward(q, k, v)
        self.kern.backward(q, k, v, dout, out=out)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        return {"wall": t1 - t0, "kernels": self.inside, "sys": r1.ru_stime - r0.ru_stime,
                "faults": r1.ru_minflt - r0.ru_minflt}


def run(sides: dict[str, Side], n: int, rounds: int, warm_up: int) -> dict[str, dict]:  # type: ignore[type-arg]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, n, D), dtype=np.float32) for _ in range(3))
    dout = rng.standard_normal((B, H, n, D), dtype=np.float32)
    got: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    order = list(sides)
    for r in range(-warm_up, rounds):
        for s in order if r % 2 else order[::-1]:
            m = sides[s].fwd_bwd(q, k, v, dout)
            if r >= 0:
                got[s].append(m)
    result = {}
    for s, ms in got.items():
        result[s] = {key: float(np.median([m[key] for m in ms])) for key in ms[0]}
        result[s]["best"] = min(m["wall"] for m in ms)
    ratios = [a["wall"] / b["wall"] for a, b in zip(got["after"], got["before"])]
    result["paired"] = {"wall": float(np.median(ratios))}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, type=Path, help="checkout before the change")
    ap.add_argument("--spec", default="causal_linear", help="an examples/ spec on the linear path")
    ap.add_argument("--sizes", default="8192,65536")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warm-up", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args()
    import numba

    sys.path.insert(0, str(ROOT))
    import attndsl

    numba.set_num_threads(min(2, os.cpu_count() or 1))
    spec_file = str(ROOT / "examples" / f"{args.spec}.attn")
    sides = {"before": Side(import_renamed(args.before.resolve(), "attndsl_before"), spec_file),
             "after": Side(attndsl, spec_file)}
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "")
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "other")
    lines = [(f"# {args.spec} fwd+bwd, before/after in one process: {args.before.resolve()} vs "
             f"{ROOT}"), "",
             (f"CPU: {lscpu_model()}; {isa}; {os.cpu_count()} cores, {numba.get_num_threads()} "
             f"threads; {time.strftime('%Y-%m-%d %H:%M')}; load at start "
             f"{os.getloadavg()[0]:.2f}; {args.rounds} rounds after {args.warm_up} warm-up; "
             f"B={B}, H={H}, d=dv={D}, float32; medians"), "",
             ("| N | side | fwd+bwd ms (median / best) | in the kernels ms | outside them ms |"
             " sys ms | minor faults | median per-round after/before |"),
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    results = {}
    for n in (int(x) for x in args.sizes.split(",")):
        res = results[n] = run(sides, n, args.rounds, args.warm_up)
        for s in ("before", "after"):
            m = res[s]
            paired = f"{res['paired']['wall']:.3f}" if s == "after" else ""
            lines.append(f"| {n} | {s} | {1e3 * m['wall']:.1f} / {1e3 * m['best']:.1f} | "
                         f"{1e3 * m['kernels']:.1f} | {1e3 * (m['wall'] - m['kernels']):.1f} | "
                         f"{1e3 * m['sys']:.0f} | {m['faults']:.0f} | {paired} |")
            print(lines[-1], flush=True)
    sizes = sorted(results)
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        lines += ["", f"time({hi}) / time({lo}), medians:"]
        for s in ("before", "after"):
            wall = results[hi][s]["wall"] / results[lo][s]["wall"]
            inside = results[hi][s]["kernels"] / results[lo][s]["kernels"]
            lines.append(f"- {s}: fwd+bwd {wall:.1f}, inside the kernels {inside:.1f}")
    lines += ["", f"load at end {os.getloadavg()[0]:.2f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
