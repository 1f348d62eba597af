"""The differential fuzzer's checks, one function per tier, shared by the tests and the collector.

Each tier takes a `spec_gen.Case` and returns None, or raises `Mismatch` (naming the check,
the target and the quantity) or whatever the project raised (classified by the collector).

  numpy   IR evaluator vs the numpy target on out and lse (float64, <= 1e-9 relative), and the
          numpy gradients vs central finite differences of the IR evaluator, one random
          direction per tensor (q, k, v, each param). No Numba compile: ~0.1 s per spec.
          Some cases carry a NaN in q, k or v (spec_gen.cases): the forward must put NaN in
          exactly the rows whose allowed pairs read it (no finite differences then).
  cpu     the Numba CPU target vs the IR evaluator on out and lse and vs the numpy target on
          every gradient (<= 1e-8 relative), at the case's shape and at one that spans several
          tiles (n_q = 67, n_k = 133: partial query and key tiles), that one twice: with the
          default tile and with a forward and a backward tile drawn from CPU_TILES (small and
          odd ones, so band fitting, row scans and strips meet tile edges at many offsets).
  cuda    the same for the CUDA target under the simulator, with 4 x 4 tiles (case shape only).
  verify  `attndsl.verify(spec)` proves the gradients (report.ok).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from ir_eval import evaluate, loss
from spec_gen import Case, arrays

import attndsl
from attndsl import check as _check
from attndsl.runtime import tiles as _tiles
from attndsl.runtime.cpu_intrinsics import PANEL

OUT_RTOL = 1e-9
GRAD_RTOL = 1e-8
FD_RTOL = 1e-5
FD_STEPS = (1e-5, 1.3e-6)  # a second, smaller step rules out a kink or jump inside the first
TILED = (67, 133)  # lengths that span partial CPU tiles (64 x 128)
# Query x key tiles the cpu tier runs TILED with too (through ATTNDSL_CPU_TILES): any tile the
# variable accepts must give the default tile's answer, so not only the tuner's candidates.
# Smaller than the fitting's STRIP (16), not multiples of it, and a single query row.
CPU_TILES = ((16, 32), (8, 16), (5, 7), (24, 40), (33, 17), (1, 64), (32, 256), (128, 256))


class Mismatch(AssertionError):
    """Two evaluators disagree: `check` (what was compared), `target`, `quantity`."""

    def __init__(self, check: str, target: str, quantity: str, detail: str) -> None:
        super().__init__(f"{check}: {target} {quantity}: {detail}")
        self.check, self.target, self.quantity = check, target, quantity


def rel_err(got: Any, want: Any) -> float:
    """max |got - want| / max(1, max |want|); inf when NaN/inf patterns differ."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return np.inf
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    if not np.array_equal(np.isfinite(got), np.isfinite(want)):
        return np.inf
    finite = np.isfinite(want) & ~same
    if not finite.any():
        return 0.0
    scale = max(1.0, float(np.max(np.abs(want[np.isfinite(want)]))))
    return float(np.max(np.abs(got[finite] - want[finite]))) / scale


def expect_close(check: str, target: str, quantity: str, got: Any, want: Any,
                 rtol: float) -> None:
    if got is None or want is None:
        if (got is None) != (want is None):
            raise Mismatch(check, target, quantity, f"got {type(got).__name__}, want "
                           f"{type(want).__name__}")
        return
    err = rel_err(got, want)
    if err == np.inf:
        raise Mismatch(check + " (NaN/inf where the other is finite)", target, quantity,
                       f"NaN/inf pattern differs: got {np.count_nonzero(~np.isfinite(got))} "
                       f"non-finite, want {np.count_nonzero(~np.isfinite(want))}")
    if not err <= rtol:
        raise Mismatch(check, target, quantity, f"relative error {err:.2e} > {rtol:.0e}")


def _spec_and_arrays(case: Case, n_q: int | None = None, n_k: int | None = None):  # type: ignore[no-untyped-def]
    spec = attndsl.parse(case.gen.text)
    if _check.uses_n(spec) and (n_q or n_k):
        n_k = n_q
    return spec, arrays(case, spec, n_q, n_k)


def _extras(a: dict[str, Any]) -> dict[str, Any]:
    return {**a["params"], **a["indices"]}


def _cancelled_poison(spec: Any, a: dict[str, Any]) -> Any:
    """The oracle's result when the poisoned entry (a NaN in q, k or v) cancels out: SymPy
    simplifies `(q @ W) - ((q @ W) - wr)` to `wr`, which the pair-by-pair evaluator cannot see.
    If the evaluator gives one result for two different finite values in the NaN's place, the
    entry does not matter, and that result is what a target must give; else None."""
    poisoned = [n for n in ("q", "k", "v") if np.isnan(a[n]).any()]
    if len(poisoned) != 1:
        return None
    results = []
    for value in (3.7, -2.9):
        moved = {n: np.where(np.isnan(a[n]), value, a[n]) if n in poisoned else a[n]
                 for n in ("q", "k", "v")}
        results.append(evaluate(spec, moved["q"], moved["k"], moved["v"], a["params"],
                                a["indices"]))
    same = all(np.allclose(getattr(results[0], f), getattr(results[1], f), rtol=1e-12,
                           atol=1e-12, equal_nan=True)
               for f in ("out", "lse") if getattr(results[0], f) is not None)
    return results[0] if same else None


def forward_matches_oracle(spec: Any, kernel: Any, a: dict[str, Any], target: str) -> None:
    ref = evaluate(spec, a["q"], a["k"], a["v"], a["params"], a["indices"])
    out, lse = kernel.forward(a["q"], a["k"], a["v"], return_lse=True, **_extras(a))
    if rel_err(out, ref.out) == np.inf:  # a NaN pattern apart: did the NaN cancel?
        ref = _cancelled_poison(spec, a) or ref
    expect_close("forward vs ir_eval", target, "out", out, ref.out, OUT_RTOL)
    expect_close("forward vs ir_eval", target, "lse", lse, ref.lse, OUT_RTOL)


def _directional_fd(spec: Any, a: dict[str, Any], name: str, direction: np.ndarray,
                    step: float) -> float:
    def at(sign: float) -> float:
        moved = {**a, "params": dict(a["params"])}
        if name in ("q", "k", "v"):
            moved[name] = a[name] + sign * step * direction
        else:
            moved["params"][name] = a["params"][name] + sign * step * direction
        return loss(spec, moved["q"], moved["k"], moved["v"], a["dout"], moved["params"],
                    a["indices"])
    return (at(1.0) - at(-1.0)) / (2 * step)


def gradients_match_fd(spec: Any, grads: dict[str, np.ndarray], a: dict[str, Any],
                       seed: int) -> None:
    """<grad, u> against central differences of the IR evaluator's loss, per tensor."""
    rng = np.random.default_rng(seed + 1)
    for name in ["q", "k", "v", *a["params"]]:
        value = a[name] if name in ("q", "k", "v") else a["params"][name]
        direction = rng.normal(size=np.shape(value))
        direction /= max(float(np.linalg.norm(direction)), 1e-300)
        analytic = float(np.sum(np.asarray(grads[name]) * direction))
        scale = max(1.0, abs(analytic), float(np.linalg.norm(grads[name])))
        errors = []
        for step in FD_STEPS:
            numeric = _directional_fd(spec, a, name, direction, step)
            errors.append(abs(numeric - analytic) / scale)
            if errors[-1] <= FD_RTOL:
                break
        else:
            check = "gradient vs finite differences"
            if not np.isfinite(analytic):
                check += " (NaN/inf gradient)"
            raise Mismatch(check, "numpy", f"d{name}",
                           f"<grad, u> = {analytic:.6g}, finite differences = {numeric:.6g} "
                           f"(relative error {min(errors):.1e})")


def tier_numpy(case: Case) -> None:
    spec, a = _spec_and_arrays(case)
    kernel = attndsl.compile(spec, "numpy")
    forward_matches_oracle(spec, kernel, a, "numpy")
    grads = kernel.backward(a["q"], a["k"], a["v"], a["dout"], **_extras(a))
    if not case.poison:  # with a NaN input the loss is NaN: no finite differences
        gradients_match_fd(spec, grads, a, case.seed)


def targets_agree(spec: Any, kernel: Any, reference: Any, a: dict[str, Any], target: str,
                  oracle: bool, tiled: str = "tiled") -> None:
    """`kernel` vs the IR evaluator (forward, when `oracle`) and vs numpy (every gradient);
    `tiled` names the shape's tiles in the check when not `oracle`."""
    if oracle:
        forward_matches_oracle(spec, kernel, a, target)
    else:
        want = reference.forward(a["q"], a["k"], a["v"], return_lse=True, **_extras(a))
        got = kernel.forward(a["q"], a["k"], a["v"], return_lse=True, **_extras(a))
        expect_close(f"forward vs numpy ({tiled})", target, "out", got[0], want[0], OUT_RTOL)
        expect_close(f"forward vs numpy ({tiled})", target, "lse", got[1], want[1], OUT_RTOL)
    args = (a["q"], a["k"], a["v"], a["dout"])
    want = reference.backward(*args, **_extras(a))
    got = kernel.backward(*args, **_extras(a))
    check = "backward vs numpy" + ("" if oracle else f" ({tiled})")
    for name in want:
        expect_close(check, target, f"d{name}", got.get(name), want[name], GRAD_RTOL)


@contextmanager
def cpu_tiles(forward: tuple[int, int], backward: tuple[int, int], keys: str = "transposed"
              ) -> Iterator[None]:
    """The cpu kernels run these tiles and key layout inside the block (ATTNDSL_CPU_TILES,
    ATTNDSL_CPU_KEYS, restored after)."""
    settings = {_tiles.VARIABLE: f"{forward[0]}x{forward[1]},{backward[0]}x{backward[1]}",
                _tiles.KEYS_VARIABLE: keys}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def tier_target(case: Case, target: str, kernel: Any = None, tiled: bool = True) -> None:
    spec, a = _spec_and_arrays(case)
    reference = attndsl.compile(spec, "numpy")
    kernel = kernel or attndsl.compile(spec, target)
    targets_agree(spec, kernel, reference, a, target, oracle=True)
    if tiled:
        spec, big = _spec_and_arrays(case, *TILED)
        targets_agree(spec, kernel, reference, big, target, oracle=False)
        if target == "cpu":  # again, on tiles drawn for the case (the failure names them)
            rng = np.random.default_rng(case.seed)
            forward, backward = (CPU_TILES[i] for i in rng.integers(0, len(CPU_TILES), 2))
            fit = forward[1] % PANEL == 0 and backward[1] % PANEL == 0  # packed needs it
            keys = _tiles.LAYOUTS[int(rng.integers(0, 3 if fit else 2))]
            label = f"tiles {forward[0]}x{forward[1]},{backward[0]}x{backward[1]}, keys {keys}"
            with cpu_tiles(forward, backward, keys):
                targets_agree(spec, kernel, reference, big, target, oracle=False, tiled=label)


def tier_cpu(case: Case) -> None:
    tier_target(case, "cpu")


def tier_cuda(case: Case) -> None:
    """4 x 4 tiles, so the case's lengths (up to 9) span partial tiles; the simulator runs every
    thread in Python, so no larger shape."""
    tier_target(case, "cuda", _cuda_kernel(case.gen.text), tiled=False)


def _cuda_kernel(text: str) -> Any:
    from attndsl.runtime.cuda_kernel import compile_kernel

    return compile_kernel(attndsl.parse(text), tiles=(4, 4, 4, 4))


def tier_verify(case: Case) -> None:
    report = attndsl.verify(attndsl.parse(case.gen.text))
    if not report.ok:
        failed = [c for c in report.checks if not c.ok]
        raise Mismatch("verify", "proof", failed[0].what if failed else "?", str(report))


# The derivation refuses one construct the checker accepts (LANGUAGE.md x3): a sum, dot or norm
# over a param dimension of a vector that folds to a constant (`sum(exp(wr - wr))`). For such a
# spec every tier must refuse it the same way: a SpecError at the reduction, with a caret.
DOCUMENTED_REFUSAL = "of a vector that does not vary over its features is not supported"


def documented_refusal(text: str) -> attndsl.SpecError | None:
    """The x3 refusal the forward derivation raises for this spec, if it is refused."""
    from attndsl.symbolic import derive

    try:
        derive(attndsl.parse(text))
    except attndsl.SpecError as err:
        if DOCUMENTED_REFUSAL in err.message:
            return err
        raise
    return None


def refuses_cleanly(tier: str, case: Case, refusal: attndsl.SpecError) -> None:
    """The tier's entry point raises the same located SpecError as the derivation."""
    run = {"numpy": lambda: attndsl.compile(case.gen.text, "numpy"),
           "cpu": lambda: attndsl.compile(case.gen.text, "cpu"),
           "cuda": lambda: _cuda_kernel(case.gen.text),
           "verify": lambda: attndsl.verify(case.gen.text)}[tier]
    try:
        run()
    except attndsl.SpecError as err:
        shown = str(err).splitlines()
        if (err.message, err.line, err.column) == (refusal.message, refusal.line,
                                                   refusal.column) and len(shown) == 3:
            return
        raise Mismatch("refusal", tier, "SpecError", f"not the derivation's, with a caret: {err}")
    raise Mismatch("refusal", tier, "SpecError", "accepted a spec the derivation refuses")


def _refusing_or(tier: str, run: Any) -> Any:
    def checked(case: Case) -> None:
        refusal = documented_refusal(case.gen.text)
        if refusal is not None:
            refuses_cleanly(tier, case, refusal)
        else:
            run(case)
    checked.__doc__ = run.__doc__
    return checked


TIERS = {name: _refusing_or(name, run) for name, run in (
    ("numpy", tier_numpy), ("cpu", tier_cpu), ("cuda", tier_cuda), ("verify", tier_verify))}


@dataclass
class Failure:
    tier: str
    cause: str
    text: str
    detail: str


def classify(tier: str, exc: BaseException) -> str:
    """A failure's cause: which comparison on which quantity, or the exception type and the
    innermost frame inside attndsl (or its generated code)."""
    if isinstance(exc, Mismatch):
        return f"{exc.check}: {exc.target} {exc.quantity}"
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/attndsl/" in f.filename or "attndsl_" in f.filename]
    where = ""
    if frames:  # the innermost frame in attndsl or in its generated code: where it broke
        f = frames[-1]
        path = f.filename.split("/attndsl/")[-1] if "/attndsl/" in f.filename else "generated"
        where = f" at {path}:{f.name}"
    import re

    message = str(exc).split("\n")[0]
    message = re.sub(r"attndsl_\w+\.py", "<generated>", message)  # one name per spec
    message = re.sub(r"'[^']*'|\d+", "_", message)[:60]
    return f"{tier}: {type(exc).__name__}{where} ({message})"
