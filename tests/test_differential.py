"""The differential fuzzer: random valid specs, every evaluator, one answer (issue 8, section 4).

Random specs from tests/spec_gen.py, random odd shapes (n_q, n_k in 1..9 never a tile multiple,
GQA, rows emptied by masks), float64. Tiers (tests/fuzz_tiers.py says what each compares):

  test_generated_specs_are_valid   the checker accepts every generated spec (else: generator bug)
  test_numpy_tier                  IR evaluator == numpy on out, lse; numpy grads == central
                                   differences of the IR evaluator (~0.1 s per spec)
  test_cpu_tier                    cpu == IR evaluator on out, lse; cpu == numpy on every
                                   gradient, also across partial tiles (cold Numba compile:
                                   ~5-10 s per spec)
  test_verify_tier                 attndsl.verify proves the spec (~1-15 s per spec)
  tests/cuda_sim/test_differential_cuda.py   the cuda target likewise, under the simulator

CI runs a fixed seed. Environment variables (all optional):

  ATTNDSL_FUZZ_EXAMPLES=N   cases in the numpy tier (default 300); the expensive tiers then run
                            N // 25 specs each unless their own variable says otherwise
  ATTNDSL_FUZZ_CPU=N        specs in the cpu tier (default 3)
  ATTNDSL_FUZZ_VERIFY=N     specs in the verify tier (default 5)
  ATTNDSL_FUZZ_CUDA=N       specs in the cuda tier (default 3)
  ATTNDSL_FUZZ_SEED=S       the seed (default 0); each tier offsets it so the tiers see
                            different specs
  ATTNDSL_FUZZ_ALL=1        also generate the constructs of spec_gen.OUTSIDE_ISSUE (bugs found
                            outside issue 8, avoided by default until they are fixed)

To see every failure grouped by cause rather than the first: tests/fuzz_report.py.

Measured on the shared 2-core machine (fresh kernel cache, load ~8): numpy tier 0.04-0.35 s per
case (300 cases ~ 10-100 s), cpu tier 10-100 s per spec (a cold Numba compile; ~97 s of the
first is shared intrinsics), verify 0.2-11 s per spec, cuda tier (simulator) 3-9 s per spec;
this file plus test_ir_eval.py took 170 s and the cuda tier 27 s.
"""

from __future__ import annotations

import functools
import os

import fuzz_tiers
import pytest
import spec_gen
from hypothesis import HealthCheck, Phase, given, seed, settings

import attndsl

SEED = int(os.environ.get("ATTNDSL_FUZZ_SEED", "0"))
# ATTNDSL_FUZZ_ALL=1 also generates the constructs of spec_gen.OUTSIDE_ISSUE (known bugs outside
# issue 8, avoided by default so that CI passes once the items are fixed).
AVOID = frozenset() if os.environ.get("ATTNDSL_FUZZ_ALL") == "1" else spec_gen.AVOID_IN_CI
EXAMPLES = int(os.environ.get("ATTNDSL_FUZZ_EXAMPLES", "300"))


def tier_examples(variable: str, default: int) -> int:
    """A tier's spec count: its own variable, else scaled from ATTNDSL_FUZZ_EXAMPLES."""
    if variable in os.environ:
        return int(os.environ[variable])
    if "ATTNDSL_FUZZ_EXAMPLES" in os.environ:
        return max(default, EXAMPLES // 25)
    return default


def fuzz_settings(examples: int, shrink: bool) -> settings:
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=examples, deadline=None, database=None, phases=phases,
                    suppress_health_check=list(HealthCheck), print_blob=False)


def run_tier(tier: str, case: spec_gen.Case) -> None:
    """The tier's checks; the failure message carries the spec and shapes to reproduce it."""
    try:
        fuzz_tiers.TIERS[tier](case)
    except Exception as exc:
        raise AssertionError(f"{fuzz_tiers.classify(tier, exc)}\n{exc}\nshapes: B={case.B} "
                             f"heads={case.heads} kv_heads={case.kv_heads} n_q={case.n_q} "
                             f"n_k={case.n_k} d={case.d} dv={case.dv} r={case.r} "
                             f"seed={case.seed}\n{case.gen.text}") from exc


@seed(SEED + 100)
@fuzz_settings(max(300, 2 * EXAMPLES), shrink=False)
@given(spec_gen.specs(avoid=frozenset()))  # every construct must be valid
def test_generated_specs_are_valid(gen: spec_gen.GenSpec) -> None:
    try:
        spec = attndsl.parse(gen.text)
    except attndsl.SpecError as err:
        pytest.fail(f"tests/spec_gen.py generated a spec the checker rejects:\n{err}\n{gen.text}")
    assert spec.checked


@seed(SEED)
@fuzz_settings(EXAMPLES, shrink=False)
@given(spec_gen.cases(avoid=AVOID))
def test_numpy_tier(case: spec_gen.Case) -> None:
    run_tier("numpy", case)


CPU_SPECS = tier_examples("ATTNDSL_FUZZ_CPU", 3)
VERIFY_SPECS = tier_examples("ATTNDSL_FUZZ_VERIFY", 5)


@functools.cache
def expensive_cases() -> list[spec_gen.Case]:
    """A few specs for the slow tiers, chosen from a seeded pool to cover the most features
    (Hypothesis's first draws are its simplest, so a plain @given would test trivial specs)."""
    return spec_gen.diverse_cases(SEED + 1, CPU_SPECS + VERIFY_SPECS,
                                  pool=max(120, 10 * (CPU_SPECS + VERIFY_SPECS)), avoid=AVOID)


@pytest.mark.parametrize("number", range(CPU_SPECS))
def test_cpu_tier(number: int) -> None:
    run_tier("cpu", expensive_cases()[number])


@pytest.mark.parametrize("number", range(VERIFY_SPECS))
def test_verify_tier(number: int) -> None:
    cases = expensive_cases()
    run_tier("verify", cases[(CPU_SPECS + number) % len(cases)])
