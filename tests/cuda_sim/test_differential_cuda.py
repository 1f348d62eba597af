"""The differential fuzzer's cuda tier (tests/test_differential.py), under Numba's simulator.

The CUDA target against the IR evaluator (out, lse) and the numpy target (every gradient), on a
few generated specs chosen for coverage, with 4 x 4 tiles so that odd lengths up to 9 span
partial tiles. ATTNDSL_FUZZ_CUDA=N sets how many specs (default 3); ATTNDSL_FUZZ_SEED the seed;
ATTNDSL_FUZZ_ALL=1 generates every construct (see spec_gen.OUTSIDE_ISSUE).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fuzzer's modules

import fuzz_tiers
import spec_gen

SEED = int(os.environ.get("ATTNDSL_FUZZ_SEED", "0"))
CUDA_SPECS = int(os.environ.get("ATTNDSL_FUZZ_CUDA", "3"))
# As tests/test_differential.py, and the cuda-only bugs outside issue 8 too (spec_gen.CUDA_ONLY).
AVOID = (frozenset() if os.environ.get("ATTNDSL_FUZZ_ALL") == "1"
         else spec_gen.AVOID_IN_CI | spec_gen.CUDA_ONLY)


@functools.cache
def cuda_cases() -> list[spec_gen.Case]:
    return spec_gen.diverse_cases(SEED + 3, CUDA_SPECS, pool=max(120, 10 * CUDA_SPECS),
                                  avoid=AVOID)


@pytest.mark.parametrize("number", range(CUDA_SPECS))
def test_cuda_tier(number: int) -> None:
    case = cuda_cases()[number]
    try:
        fuzz_tiers.tier_cuda(case)
    except Exception as exc:
        raise AssertionError(f"{fuzz_tiers.classify('cuda', exc)}\n{exc}\nshapes: B={case.B} "
                             f"heads={case.heads} kv_heads={case.kv_heads} n_q={case.n_q} "
                             f"n_k={case.n_k} d={case.d} dv={case.dv} r={case.r} "
                             f"seed={case.seed}\n{case.gen.text}") from exc
