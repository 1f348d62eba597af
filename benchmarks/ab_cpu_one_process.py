"""Before/after A/B of the `cpu` target with both checkouts in ONE process, call by call.

`ab_cpu.py` times each checkout in its own subprocess per round; on a shared VM the machine's
speed drifts by 20-30% between subprocesses a few seconds apart, more than the 5% a fix may
cost. Here the "before" checkout is imported too, as a renamed copy (`attndsl_before`, its
imports rewritten in a temporary directory), and every round calls before and after back to
back on the same arrays (PAUSE_S apart), alternating which goes first, with torch's SDPA as a
third column. The report gives, per case and mode, the best call, the 10th percentile and the
median of each side, and the median of the per-round ratios after/before (drift cancels inside
a round).

    git worktree add /tmp/before <commit>
    python benchmarks/ab_cpu_one_process.py --before /tmp/before --specs full,causal --sizes 2048

torch comes from the `bench` extra; attndsl never imports it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy: the kernels own the threads
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from before import import_renamed  # benchmarks/before.py, beside this script
from machine import lscpu_model, vector_isa

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"full": "scaled_dot_product", "causal": "causal", "alibi": "alibi",
         "softcap": "softcap", "sliding_window": "sliding_window",
         "linear": "linear", "causal_linear": "causal_linear"}
NO_SDPA = {"linear", "causal_linear"}  # not softmax attention: SDPA is no yardstick there
B, H, D = 1, 8, 64
WARM_UP = 3  # untimed rounds before each case's timed ones


def cases(side, spec_file: str, q, k, v, extra):  # type: ignore[no-untyped-def]
    kern = side.compile(spec_file, target="cpu")
    dout = np.ones_like(q)

    def fwd():  # type: ignore[no-untyped-def]
        return kern.forward(q, k, v, return_lse=True, **extra)

    def fwd_bwd():  # type: ignore[no-untyped-def]
        out, lse = fwd()
        return kern.backward(q, k, v, dout, out=out, lse=lse, **extra)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def sdpa_cases(q, k, v, causal: bool):  # type: ignore[no-untyped-def]
    """torch's SDPA on the same q, k, v (key/value heads repeated for GQA): a yardstick."""
    import torch

    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return sdpa(tq, tk, tv, is_causal=causal)

    def fwd_bwd():  # type: ignore[no-untyped-def]
        out = sdpa(tq, tk, tv, is_causal=causal)
        return torch.autograd.grad(out, (tq, tk, tv), torch.ones_like(out))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


# before each call: the previous side's threads go idle (attndsl's helpers spin for the next
# launch for runtime/threads.SPIN_S after each; so do torch's OpenMP threads)
PAUSE_S = 0.01


def run_case(sides: dict, name: str, n: int, rounds: int) -> list[str]:  # type: ignore[type-arg]
    rng = np.random.default_rng(0)
    spec_file = str(ROOT / "examples" / f"{SPECS[name]}.attn")
    spec = sides["after"].load(spec_file)
    kv = spec.kv_heads or H  # alibi.attn: 8 heads on 2 key/value heads
    q = rng.standard_normal((B, H, n, D), dtype=np.float32)
    k, v = (rng.standard_normal((B, kv, n, D), dtype=np.float32) for _ in range(2))
    extra = {}
    for p in spec.params:  # alibi's slopes; no other benchmarked spec has params
        assert p.dims == ("heads",), f"{name}: no values for param {p.name}{list(p.dims)}"
        extra[p.name] = np.linspace(0.05, 0.5, H, dtype=np.float32)
    calls = {s: cases(m, spec_file, q, k, v, extra) for s, m in sides.items()}
    if name not in NO_SDPA:
        calls["sdpa"] = sdpa_cases(q, k, v, name == "causal")
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        times: dict[str, list[float]] = {s: [] for s in calls}
        order = list(calls)
        # the first rounds warm up (compile, load caches): measured, a process's first case
        # ran one side 17% slow over all its rounds while the same case later agreed
        for r in range(-WARM_UP, rounds):
            for s in order if r % 2 else order[::-1]:
                time.sleep(PAUSE_S)
                t0 = time.perf_counter()
                calls[s][mode]()
                if r >= 0:
                    times[s].append(time.perf_counter() - t0)
        t = {s: np.array(x) * 1e3 for s, x in times.items()}
        paired = np.median(t["after"] / t["before"])
        sdpa = f"{np.median(t['sdpa']) / np.median(t['after']):.3f}" if "sdpa" in t else "-"
        rows.append(
            f"| {name} N={n} | {mode} | " + " | ".join(
                f"{t[s].min():.1f} / {np.percentile(t[s], 10):.1f} / {np.median(t[s]):.1f}"
                if s in t else "-" for s in ("before", "after", "sdpa"))
            + f" | {t['after'].min() / t['before'].min():.3f} | "
            f"{np.percentile(t['after'], 10) / np.percentile(t['before'], 10):.3f} | "
            f"{paired:.3f} | {sdpa} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, type=Path, help="checkout before the change")
    ap.add_argument("--specs", default="full,causal", help=f"some of {','.join(SPECS)}")
    ap.add_argument("--sizes", default="2048")
    ap.add_argument("--rounds", type=int, default=30, help="calls of each side per case")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args()
    import numba

    sys.path.insert(0, str(ROOT))
    import attndsl

    numba.set_num_threads(min(2, os.cpu_count() or 1))
    sides = {"before": import_renamed(args.before.resolve(), "attndsl_before"), "after": attndsl}
    import torch

    torch.set_num_threads(numba.get_num_threads())
    isa = vector_isa()
    lines = [f"# cpu A/B in one process: {args.before.resolve()} vs {ROOT}", "",
             (f"CPU: {lscpu_model()}; {isa}; {os.cpu_count()} cores, {numba.get_num_threads()} "
              f"threads; {time.strftime('%Y-%m-%d %H:%M')}; load at start "
              f"{os.getloadavg()[0]:.2f}; {args.rounds} rounds, before / after / SDPA called "
              f"in turn in each, {PAUSE_S * 1e3:.0f} ms apart; B=1, H=8, D=64, float32"), "",
             ("| case | mode | before ms best / p10 / median | after ms best / p10 / median |"
              " SDPA ms best / p10 / median | best after/before | p10 after/before |"
              " median of per-round after/before | SDPA / after (medians) |"),
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    # B=1, H=8 (alibi: 8 query heads on 2 key/value heads), D=64
    for name in args.specs.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            lines += run_case(sides, name, n, args.rounds)
    lines += ["", f"load at end {os.getloadavg()[0]:.2f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
