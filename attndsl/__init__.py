"""attndsl: attention specs -> derived, proved gradients -> fused kernels (LANGUAGE.md §6)."""

from __future__ import annotations

from pathlib import Path

from . import check as _check
from . import ir
from .errors import SpecError
from .lower import to_ir
from .syntax import parse_tree

__all__ = ["SpecError", "load", "parse"]
__version__ = "0.1.0"


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
    import dataclasses

    return dataclasses.replace(spec, source=text, filename=filename)
