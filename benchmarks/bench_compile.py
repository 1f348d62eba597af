"""How long a new spec takes on its first `cpu` call: the Numba compile a user waits for.

A spec compiles on its first forward and its first backward (per dtype), into the kernel cache.
Each measurement is one subprocess with an empty `ATTNDSL_CACHE`, so nothing of the spec is
cached; the helpers every kernel calls (runtime/cpu_intrinsics.py, numba_funcs.py) are cached
by Numba beside their checkout and compiled once before the first round, as on a user's
machine after the first spec. Shapes are small (n = 67, no tile tuning), so the times are the
compiles. With `--before`, two checkouts alternate round by round, in one run:

    git worktree add /tmp/before <commit>
    python benchmarks/bench_compile.py --before /tmp/before --specs causal,bahdanau
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import lscpu_model  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]

# One measurement: imports attndsl from the checkout given as argv[1].
ROUND = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
t0 = time.perf_counter()
import numpy as np
import attndsl
from attndsl.demo import demo_inputs
spec = attndsl.load(sys.argv[2])
x = demo_inputs(spec, 67, 71, d=16, dv=16)
q, k, v = (a.astype(np.float32) for a in (x.q, x.k, x.v))
extra = {n: (a.astype(np.float32) if a.dtype.kind == "f" else a) for n, a in x.extra.items()}
t1 = time.perf_counter()
kern = attndsl.compile(spec, target="cpu")
t2 = time.perf_counter()
out, lse = kern.forward(q, k, v, return_lse=True, **extra)
t3 = time.perf_counter()
kern.backward(q, k, v, np.ones_like(out), out=out, lse=lse, **extra)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "derive": t2 - t1, "forward": t3 - t2, "backward": t4 - t3}))
"""

PARTS = ("derive", "forward", "backward")


def measure(checkout: Path, name: str) -> dict[str, float]:
    spec_file = str(checkout / "examples" / f"{name}.attn")
    with tempfile.TemporaryDirectory(prefix="attndsl-compile-") as cache:
        done = subprocess.run([sys.executable, "-c", ROUND, str(checkout), spec_file],
                              capture_output=True, text=True, timeout=1800, check=False,
                              cwd=checkout, env={**os.environ, "ATTNDSL_CACHE": cache})
    if done.returncode != 0:
        raise RuntimeError(f"{checkout} {name}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="checkout before a change (optional)")
    ap.add_argument("--after", type=Path, default=ROOT, help="checkout (default: this one)")
    ap.add_argument("--specs", default="causal,scaled_dot_product,alibi,bahdanau",
                    help="examples/<name>.attn, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    a = ap.parse_args()
    sides = {"after": a.after.resolve()}
    if a.before:
        sides = {"before": a.before.resolve(), **sides}
    specs = [s.strip() for s in a.specs.split(",") if s.strip()]
    for checkout in sides.values():  # the helpers' Numba caches, once per checkout
        measure(checkout, specs[0])
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for name in specs:
        for r in range(a.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                got = measure(sides[side], name)
                runs.setdefault((name, side), []).append(got)
                total = sum(got[p] for p in PARTS)
                print(f"{name} round {r + 1} {side}: {total:.1f} s "
                      f"(forward {got['forward']:.1f}, backward {got['backward']:.1f})",
                      file=sys.stderr)
    lines = ["# cpu compile time of a new spec (float32, first forward and backward)", "",
             (f"CPU: {lscpu_model()}; {time.strftime('%Y-%m-%d %H:%M')}; {a.rounds} rounds, "
              "medians; each a fresh process with an empty kernel cache"), ""]
    head = "| spec | " + " | ".join(f"{side} {p} s" for side in sides for p in PARTS)
    head += " | " + " | ".join(f"{side} total s" for side in sides)
    lines += [head + (" | after/before |" if a.before else " |"),
              "| --- |" + " ---: |" * (len(sides) * (len(PARTS) + 1) + bool(a.before))]
    for name in specs:
        cells = [f"{np.median([x[p] for x in runs[name, side]]):.1f}"
                 for side in sides for p in PARTS]
        totals = {side: float(np.median([sum(x[p] for p in PARTS) for x in runs[name, side]]))
                  for side in sides}
        cells += [f"{totals[side]:.1f}" for side in sides]
        if a.before:
            cells.append(f"{totals['after'] / totals['before']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
