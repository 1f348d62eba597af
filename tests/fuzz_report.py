"""Run the differential fuzzer outside pytest and report its failures grouped by cause.

    python tests/fuzz_report.py --examples 2000 --tiers numpy
    python tests/fuzz_report.py --examples 100 --tiers numpy,cpu,verify --seed 3

Each generated case runs through the chosen tiers (tests/fuzz_tiers.py); a failure is caught,
classified (the comparison and quantity that disagreed, or the exception type and its first
frame inside attndsl) and counted; the table lists every cause with its count, the tiers it
appeared in, and the shortest spec that showed it. A spec the checker rejects is counted as
"generator" (a bug of tests/spec_gen.py). Per-tier seconds per spec are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--tiers", default="numpy", help="comma-separated: numpy,cpu,cuda,verify")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-guards", action="store_true",
                        help="no NaN in untaken where branches or at masked pairs")
    parser.add_argument("--poison", type=float, default=0.15,
                        help="the fraction of cases with a NaN in q, k or v")
    parser.add_argument("--all", action="store_true",
                        help="also generate spec_gen.OUTSIDE_ISSUE's constructs (bugs outside "
                        "issue 8, avoided by default)")
    parser.add_argument("--avoid", default="",
                        help="comma-separated extra OUTSIDE_ISSUE keys to avoid (e.g. "
                        "param_only_vectors,size_dv)")
    parser.add_argument("--distinct", action="store_true",
                        help="run the tiers only on spec texts not run before in this process "
                        "(Hypothesis draws a spec again with other shapes): every counted "
                        "case is then a new spec")
    parser.add_argument("--show", type=int, default=1, help="example specs shown per cause")
    parser.add_argument("--dump", help="write every failure (cause, spec) to this JSON-lines file")
    parser.add_argument("--every", type=int, default=0,
                        help="also print the table every N cases (for long runs)")
    args = parser.parse_args()
    tiers = [t for t in args.tiers.split(",") if t]
    if "cuda" in tiers:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba is imported

    import warnings

    import fuzz_tiers
    import spec_gen
    from hypothesis import HealthCheck, Phase, given, seed, settings

    import attndsl

    warnings.simplefilter("ignore")
    failures: dict[str, list[str]] = defaultdict(list)
    tiers_of: dict[str, set[str]] = defaultdict(set)
    seconds: dict[str, float] = defaultdict(float)
    counts = {"cases": 0, "failed": 0, "refused": 0, "repeats": 0}
    unique: set[str] = set()
    report_every: list = [0]

    avoid = frozenset() if args.all else spec_gen.AVOID_IN_CI
    avoid |= {a for a in args.avoid.split(",") if a}

    @seed(args.seed)
    @settings(max_examples=args.examples, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(spec_gen.cases(nan_guards=not args.no_guards, avoid=avoid, poison=args.poison))
    def run(case: spec_gen.Case) -> None:
        if args.distinct and case.gen.text in unique:
            counts["repeats"] += 1
            return
        counts["cases"] += 1
        unique.add(case.gen.text)
        try:
            attndsl.parse(case.gen.text)
        except attndsl.SpecError as err:
            failures[f"generator: SpecError ({str(err).splitlines()[0][:70]})"].append(
                case.gen.text)
            counts["failed"] += 1
            return
        failed = False
        counts["refused"] += fuzz_tiers.documented_refusal(case.gen.text) is not None
        for tier in tiers:
            t0 = time.perf_counter()
            try:
                fuzz_tiers.TIERS[tier](case)
            except Exception as exc:  # noqa: BLE001 -- every failure is data here
                cause = fuzz_tiers.classify(tier, exc)
                if args.dump:
                    with open(args.dump, "a") as f:
                        f.write(json.dumps({"cause": cause, "text": case.gen.text,
                                            "detail": str(exc)[:300],
                                            # the case's shapes and array seed: enough to
                                            # rerun it (spec_gen.Case(gen, **case))
                                            "case": {f: getattr(case, f) for f in (
                                                "B", "heads", "kv_heads", "n_q", "n_k", "d",
                                                "dv", "r", "seed", "poison")}}) + "\n")
                failures[cause].append(case.gen.text)
                tiers_of[cause].add(tier)
                failed = True
            seconds[tier] += time.perf_counter() - t0
        counts["failed"] += failed
        if counts["cases"] % 100 == 0:
            print(f"... {counts['cases']} cases, {counts['failed']} failed", flush=True)
        if report_every[0] and counts["cases"] % report_every[0] == 0:
            report_every[1]()

    def summary() -> None:
        total = time.perf_counter() - t0
        print(f"\n{counts['cases']} cases ({len(unique)} distinct specs), seed {args.seed}, "
              f"tiers {','.join(tiers)}: {counts['failed']} failed, {total:.0f} s")
        print(f"  avoided constructs: {', '.join(sorted(avoid)) or 'none'}")
        if args.distinct:
            print(f"  repeated spec texts skipped (--distinct): {counts['repeats']}")
        print(f"  refused as documented (LANGUAGE.md x3), checked on every tier: "
              f"{counts['refused']}")
        for tier in tiers:
            print(f"  {tier}: {seconds[tier] / max(counts['cases'], 1):.3f} s per case")
        print(f"\n{'count':>6}  {'specs':>6}  cause")
        for cause, texts in sorted(failures.items(), key=lambda kv: -len(kv[1])):
            print(f"{len(texts):>6}  {len(set(texts)):>6}  {cause}")
        for cause, texts in sorted(failures.items(), key=lambda kv: -len(kv[1])):
            print(f"\n=== {cause}  ({len(texts)} cases)")
            for text in sorted(set(texts), key=len)[:args.show]:
                print(text.rstrip())
        sys.stdout.flush()

    t0 = time.perf_counter()
    report_every[0] = args.every
    report_every.append(summary)
    run()
    summary()
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
