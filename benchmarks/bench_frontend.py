"""The front end's speed targets: parse + check per example (< 50 ms), verify per example (< 30 s).

These were wall-clock assertions in the tests, which failed a correct tree on a loaded machine;
here they are measured and reported, with lscpu's model name and the load average.

    python benchmarks/bench_frontend.py                  # every example, writes results/frontend.md
    python benchmarks/bench_frontend.py --no-verify      # parse + check only (seconds)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import lscpu_model  # benchmarks/machine.py, beside this script

import attndsl

PARSE_TARGET_S = 0.050
VERIFY_TARGET_S = 30.0




def parse_seconds(text: str, rounds: int) -> float:
    """The median of `rounds` parse + check times of one spec (the grammar is already built)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        attndsl.parse(text)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-verify", action="store_true", help="skip attndsl.verify (minutes)")
    ap.add_argument("--rounds", type=int, default=9, help="parse + check repetitions (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "frontend.md")
    args = ap.parse_args()
    examples = sorted((ROOT / "examples").glob("*.attn"))
    attndsl.parse(examples[0].read_text())  # builds the grammar once
    lines = ["# Front end: parse + check and verify per example", "",
             (f"CPU: {lscpu_model()}; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}; "
              f"load at start {os.getloadavg()[0]:.2f}. Targets: parse + check < "
              f"{PARSE_TARGET_S * 1e3:.0f} ms, verify (numpy) < {VERIFY_TARGET_S:.0f} s."), "",
             "| example | parse + check ms | verify s | verify ok |", "| --- | ---: | ---: | --- |"]
    worst_parse = worst_verify = 0.0
    for path in examples:
        parse_s = parse_seconds(path.read_text(), args.rounds)
        worst_parse = max(worst_parse, parse_s)
        verify_cell, ok_cell = "-", "-"
        if not args.no_verify:
            t0 = time.perf_counter()
            report = attndsl.verify(path)
            verify_s = time.perf_counter() - t0
            worst_verify = max(worst_verify, verify_s)
            verify_cell, ok_cell = f"{verify_s:.1f}", "yes" if report.ok else "NO"
        lines.append(f"| {path.stem} | {parse_s * 1e3:.2f} | {verify_cell} | {ok_cell} |")
        print(lines[-1], flush=True)
    lines += ["", (f"worst parse + check: {worst_parse * 1e3:.2f} ms "
              f"({'meets' if worst_parse < PARSE_TARGET_S else 'MISSES'} the target)")]
    if not args.no_verify:
        lines.append(f"worst verify: {worst_verify:.1f} s "
                     f"({'meets' if worst_verify < VERIFY_TARGET_S else 'MISSES'} the target)")
    lines += [f"load at end {os.getloadavg()[0]:.2f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
