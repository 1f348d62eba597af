"""attndsl: attention specs -> derived, proved gradients -> fused kernels (LANGUAGE.md §6)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from . import check as _check
from . import ir
from ._version import __version__ as __version__
from .errors import SpecError
from .lower import to_ir
from .runtime.kernel import Kernel
from .syntax import parse_tree

__all__ = ["SpecError", "load", "parse"]


def _prefer_workqueue() -> None:
    """Numba's threading layer for the cpu kernels, unless the user chose one: workqueue.
    Numba picks omp where libgomp is present (as beside torch), whose launches took 0.1 or 16
    ms at random on a busy machine (workqueue 0.2 ms) and whose pool ran 1.5-3x slower once
    torch's existed. Set at import, before anything (numba.get_num_threads() too) starts
    Numba's threads, which fixes the layer for the process (docs/language.md, Threads)."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
    numba = sys.modules.get("numba")
    if numba is not None:  # imported before attndsl: its config has read the environment
        numba.config.THREADING_LAYER = "workqueue"


_prefer_workqueue()


def parse(text: str, filename: str | None = None) -> ir.Spec:
    """Spec text -> checked ir.Spec; raises SpecError naming the file, line and column."""
    try:
        spec = to_ir(parse_tree(text))
        spec = _check.check(spec)
    except SpecError as err:
        raise err.located(text, filename) from None
    except RecursionError:
        raise SpecError("the spec is nested too deeply to read", 1, 1,
                        hint="split the expression with 'let'").located(text, filename) from None
    return _with_source(spec, text, filename)


def load(path: str | Path) -> ir.Spec:
    """Read and parse a spec file."""
    path = Path(path)
    return parse(path.read_text(encoding="utf-8"), filename=str(path))


def _with_source(spec: ir.Spec, text: str, filename: str | None) -> ir.Spec:
    return dataclasses.replace(spec, source=text, filename=filename)


def _as_spec(spec: ir.Spec | str | Path) -> ir.Spec:
    """A checked spec from a spec, spec text, or a path to a .attn file."""
    if isinstance(spec, ir.Spec):
        return spec if spec.checked else _check.check(spec)
    if isinstance(spec, Path) or (isinstance(spec, str) and "{" not in spec):
        return load(spec)
    return parse(spec)


def compile(spec: ir.Spec | str | Path, target: str = "cpu") -> Kernel:
    """A Kernel for `target`: "cpu" (Numba CPU), "cuda" (Numba CUDA) or "numpy" (reference)."""
    from .runtime.build import compile_spec

    return compile_spec(_as_spec(spec), target)


def derive(spec: ir.Spec | str | Path):  # type: ignore[no-untyped-def]
    """SymPy forward and gradient expressions; `.pretty()`, `.latex()`."""
    from .grad import derive_gradients
    from .symbolic import derive as derive_forward

    return derive_gradients(derive_forward(_as_spec(spec)))


def verify(spec: ir.Spec | str | Path, targets: str | tuple[str, ...] | list[str] = ("numpy",),
           proof: bool = True):  # type: ignore[no-untyped-def]
    """Symbolic proof of the gradients and numeric checks of every target ("numpy,cpu" or a
    list); a Report whose unrunnable checks are SKIP lines."""
    from .verification import verify as verify_spec

    return verify_spec(_as_spec(spec), targets=targets, proof=proof)
