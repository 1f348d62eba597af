"""The pair program's backward (attndsl/program.py): the steps every backend prints, in order.

The kernels' numbers are tested against numpy elsewhere (tests/test_cpu_issue8.py and
tests/cuda_sim/test_issue8_sim.py run the nested specs below on both backends); here, the
program itself: every adjoint has exactly one final step, gathered locals start before the loops
that add to them and are read only after the last of those loops, and readers come first.
"""

from __future__ import annotations

import pytest
from nested_specs import NESTED, text

import attndsl
from attndsl import program
from attndsl.plan import make_plan


def steps_of(spec_text: str) -> tuple[list[program.Step], object]:
    plan = make_plan(attndsl.parse(spec_text))
    return program.backward_steps(plan), plan


def test_scaled_dot_product_is_one_gemm() -> None:
    steps, plan = steps_of("attention t {\n    score q . k\n    scale 1 / sqrt(d)\n}")
    assert len(steps) == 1 and isinstance(steps[0], program.Gemm)
    assert steps[0].gemm is plan.gemms[0]  # type: ignore[attr-defined]
    assert not steps[0].source.gathered and steps[0].source.partial is not None


def test_row_scalars_and_lookups_are_adds() -> None:
    steps, plan = steps_of("attention t {\n    param sb[heads]\n    score q . k\n"
                           "    bias sb[h] * (j - i) + norm(q)\n}")
    kinds = [type(s).__name__ for s in steps]
    assert kinds[0] == "Gemm" and set(kinds[1:]) == {"Add"} and len(kinds) == 3
    assert {s.source.node.symbol for s in steps[1:]} == set(plan.grads.dlogit) - {
        plan.gemms[0].symbol}


@pytest.mark.parametrize("name", sorted(NESTED))
def test_nested_specs_order(name: str) -> None:
    steps, plan = steps_of(text(name))
    finals = [s for s in steps if not isinstance(s, program.Gather)]
    # one final step per node with an adjoint: the logit's direct reads and what loops read
    owners = [s.source.node.symbol for s in finals]
    assert len(owners) == len(set(owners))
    assert set(owners) == set(plan.grads.dlogit) | set(plan.nested)
    gathers = [i for i, s in enumerate(steps) if isinstance(s, program.Gather)]
    loops = [i for i, s in enumerate(steps) if isinstance(s, program.Loop)]
    assert {steps[i].source.node.symbol for i in gathers} == set(plan.nested)
    assert not gathers or not loops or max(gathers) < min(loops)
    # a gathered adjoint is complete before it is used: after every loop that reads it
    for i, step in enumerate(steps):
        if isinstance(step, program.Gather):
            continue
        assert step.source.gathered == (step.source.node.symbol in plan.nested)
        if step.source.gathered:
            readers = [j for j in loops if step.source.node.symbol in
                       {s for s, _ in steps[j].reads}]  # type: ignore[attr-defined]
            assert all(j < i for j in readers), (name, step)
    # loops in reverse node order: a loop read by another loop's body comes after it
    order = [steps[i].loop for i in loops]  # type: ignore[attr-defined]
    assert order == [r for r in reversed(plan.loops) if r in order]
