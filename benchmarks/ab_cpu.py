"""Before/after A/B of the `cpu` target: two checkouts of attndsl, interleaved, in one run.

A change that must not slow the kernels (a fix, a refactor) is measured against the commit
before it on the same machine, at the same time: every round runs one subprocess per checkout,
alternating which goes first, and each subprocess times attndsl (forward with lse, and forward
+ backward given out and lse) next to torch's SDPA on the same inputs. The report gives the
medians over rounds, after/before, and both sides' ratio to SDPA (which cancels machine drift
between rounds), with lscpu's model name and the load average.

    git worktree add /tmp/before <commit>
    python benchmarks/ab_cpu.py --before /tmp/before --after . --specs full,causal --sizes 2048

torch comes from the `bench` extra; attndsl never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import lscpu_model  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"full": "scaled_dot_product", "causal": "causal", "alibi": "alibi",
         "softcap": "softcap", "sliding_window": "sliding_window", "bahdanau": "bahdanau",
         "cosine": "cosine"}

# One side of one round: imports attndsl from the checkout given as argv[1].
ROUND = r"""
import json, os, sys, time
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
sys.path.insert(0, sys.argv[1])
import numpy as np, numba, torch
import attndsl
numba.set_num_threads(2)
torch.set_num_threads(2)
spec_file, n, reps, causal = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
B, H, D = 1, 8, 64
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((B, H, n, D), dtype=np.float32) for _ in range(3))
extra = {}
gqa = "alibi" in spec_file  # examples/alibi.attn fixes heads 8, kv_heads 2
if gqa:
    extra["slope"] = np.linspace(0.05, 0.5, H, dtype=np.float32)
    k, v = np.ascontiguousarray(k[:, :2]), np.ascontiguousarray(v[:, :2])
if "bahdanau" in spec_file:  # r = 16, as in bench_cpu.py; SDPA is only the clock here
    extra["Wq"], extra["Wk"] = (rng.standard_normal((D, 16), dtype=np.float32) / 8
                                for _ in range(2))
    extra["w"] = rng.standard_normal(16, dtype=np.float32)
if "cosine" in spec_file:
    extra["tau"] = np.array(0.1, np.float32)
kern = attndsl.compile(spec_file, target="cpu")
dout = np.ones_like(q)

def fwd():
    return kern.forward(q, k, v, return_lse=True, **extra)

def fwd_bwd():
    out, lse = fwd()
    return kern.backward(q, k, v, dout, out=out, lse=lse, **extra)

tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
sdpa = torch.nn.functional.scaled_dot_product_attention

def t_fwd():
    with torch.no_grad():
        return sdpa(tq, tk, tv, is_causal=causal, enable_gqa=gqa)

def t_fwd_bwd():
    out = sdpa(tq, tk, tv, is_causal=causal, enable_gqa=gqa)
    return torch.autograd.grad(out, (tq, tk, tv), torch.ones_like(out))

cases = {"attndsl|fwd": fwd, "attndsl|fwd+bwd": fwd_bwd, "sdpa|fwd": t_fwd,
         "sdpa|fwd+bwd": t_fwd_bwd}
for f in cases.values():  # warm-up: compiles, loads caches
    f()
times = {key: [] for key in cases}
for _ in range(reps):
    for key, f in cases.items():
        t0 = time.perf_counter()
        f()
        times[key].append(time.perf_counter() - t0)
print(json.dumps({key: sorted(v) for key, v in times.items()}))
"""




def one_side(checkout: Path, name: str, n: int, reps: int) -> dict[str, list[float]]:
    """One subprocess: every timed call per key, sorted."""
    spec_file = str(checkout / "examples" / f"{SPECS[name]}.attn")
    causal = "1" if name == "causal" else "0"
    done = subprocess.run([sys.executable, "-c", ROUND, str(checkout), spec_file, str(n),
                           str(reps), causal], capture_output=True, text=True, timeout=1800,
                          check=False, cwd=checkout)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout} {name} N={n}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(x: list[float]) -> float:
    return float(np.median(x))


def _row(case: str, mode: str, runs: dict[str, list[dict[str, list[float]]]]) -> str:
    """Medians over rounds of each subprocess's median call, and the best call of all rounds:
    noise on a shared VM only adds time, so the best call is the steadier estimate."""
    med = {s: np.array([_median(x[f"attndsl|{mode}"]) for x in runs[s]]) for s in runs}
    sdpa = {s: np.array([_median(x[f"sdpa|{mode}"]) for x in runs[s]]) for s in runs}
    best = {s: min(min(x[f"attndsl|{mode}"]) for x in runs[s]) for s in runs}
    best_sdpa = {s: min(min(x[f"sdpa|{mode}"]) for x in runs[s]) for s in runs}
    per_round = med["after"] / med["before"]
    return (f"| {case} | {mode} | {np.median(med['before']) * 1e3:.1f} | "
            f"{np.median(med['after']) * 1e3:.1f} | "
            f"{np.median(med['after']) / np.median(med['before']):.3f} | "
            f"{np.median(med['before'] / sdpa['before']):.3f} | "
            f"{np.median(med['after'] / sdpa['after']):.3f} | "
            f"{best['before'] * 1e3:.1f} | {best['after'] * 1e3:.1f} | "
            f"{best['after'] / best['before']:.3f} | "
            f"{best['before'] / best_sdpa['before']:.3f} | {best['after'] / best_sdpa['after']:.3f} | "
            f"{per_round.min():.3f} - {per_round.max():.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, type=Path, help="checkout before the change")
    ap.add_argument("--after", default=ROOT, type=Path, help="checkout after (default: this one)")
    ap.add_argument("--specs", default="full,causal", help=f"some of {','.join(SPECS)}")
    ap.add_argument("--sizes", default="2048")
    ap.add_argument("--rounds", type=int, default=5, help="subprocess pairs per case")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per subprocess (median)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args()
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    lines = [f"# cpu A/B: {sides['before']} vs {sides['after']}", "",
             (f"CPU: {lscpu_model()}; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}; "
              f"load at start {os.getloadavg()[0]:.2f}; {args.rounds} rounds x {args.reps} calls, "
              "medians; ratio to SDPA = attndsl time / SDPA time in the same subprocess; best = "
              "the fastest call over all rounds"), "",
             ("| case | mode | before ms | after ms | after/before | before/SDPA | after/SDPA |"
              " best before ms | best after ms | best after/before | best before/SDPA |"
              " best after/SDPA | spread of after/before over rounds |"),
             "| --- | --- " + "| ---: " * 10 + "| --- |"]
    for name in args.specs.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for r in range(args.rounds):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for side in order:
                    runs[side].append(one_side(sides[side], name, n, args.reps))
                print(f"{name} N={n} round {r + 1}: " + ", ".join(
                    f"{s} {_median(runs[s][-1]['attndsl|fwd+bwd']) * 1e3:.1f} ms" for s in runs),
                    flush=True)
            for mode in ("fwd", "fwd+bwd"):
                lines.append(_row(f"{name} N={n}", mode, runs))
    lines += ["", f"load at end {os.getloadavg()[0]:.2f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
