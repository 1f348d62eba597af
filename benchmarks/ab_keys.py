"""The cpu kernels' key layout, A/B in one process: keys transposed, read as stored, packed.

`attndsl/runtime/tiles.py` picks per machine whether the GEMMs read each key operand from a
transposed copy (NN), as stored (NT), or packed in panels for attndsl's own micro_gemm;
`ATTNDSL_CPU_KEYS` fixes it. This script rotates the three layouts call by call on the same
arrays and kernels, with the tile the tuner chose for each call (the same for all), each timed
call warm on a quiet machine as in bench_cpu.py (a short pause, one untimed call). It prints a
Markdown table: medians, and stored / packed (> 1: the packed keys and micro_gemm are faster).

    python benchmarks/ab_keys.py --specs sliding_window,full --sizes 2048,4096 --rounds 11
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy: the kernels own the threads
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from machine import lscpu_model, vector_isa  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attndsl
from attndsl.runtime import tiles

FILES = {"full": "scaled_dot_product", "causal": "causal", "alibi": "alibi",
         "softcap": "softcap", "sliding_window": "sliding_window"}
B, H, D = 1, 8, 64
PAUSE_S = 0.01
LAYOUTS = tiles.LAYOUTS


def calls(name: str, n: int):  # type: ignore[no-untyped-def]
    """The forward and forward + backward of one spec at length n (alibi: its 2 kv heads)."""
    kernel = attndsl.compile(ROOT / "examples" / f"{FILES[name]}.attn", target="cpu")
    rng = np.random.default_rng(0)
    kv_heads = 2 if name == "alibi" else H
    q = rng.standard_normal((B, H, n, D), dtype=np.float32)
    k, v = (rng.standard_normal((B, kv_heads, n, D), dtype=np.float32) for _ in range(2))
    extra = {"slope": np.linspace(0.1, 1.0, H, dtype=np.float32)} if name == "alibi" else {}

    def forward():  # type: ignore[no-untyped-def]
        return kernel.forward(q, k, v, return_lse=True, **extra)

    def forward_backward():  # type: ignore[no-untyped-def]
        out, lse = forward()
        return kernel.backward(q, k, v, q, out=out, lse=lse, **extra)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def timed(run, layout: str) -> float:  # type: ignore[no-untyped-def]
    os.environ[tiles.KEYS_VARIABLE] = layout
    time.sleep(PAUSE_S)
    run()  # untimed: the threads are awake, the previous layout's buffers reused
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default="sliding_window,full,causal,alibi,softcap")
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    print(f"CPU: lscpu \"{lscpu_model()}\", {vector_isa()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; float32, B={B}, H={H}, D={D}; medians of "
          f"{args.rounds} rounds, the layouts rotating (each call warm: a {PAUSE_S * 1e3:.0f}"
          " ms pause and an untimed call first); the tile is the tuned one, the same for all\n")
    print("| case | mode | transposed ms | stored ms | packed ms | stored / packed |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.specs.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            for mode, run in calls(name, n).items():
                times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
                for r in range(args.rounds):  # each layout first in turn
                    for layout in LAYOUTS[r % len(LAYOUTS):] + LAYOUTS[:r % len(LAYOUTS)]:
                        times[layout].append(timed(run, layout))
                a, b, c = (statistics.median(times[layout]) * 1e3 for layout in LAYOUTS)
                print(f"| {name} N={n} | {mode} | {a:.2f} | {b:.2f} | {c:.2f} | {b / c:.3f} |",
                      flush=True)
    os.environ.pop(tiles.KEYS_VARIABLE, None)


if __name__ == "__main__":
    main()
