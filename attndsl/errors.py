"""SpecError: a mistake in a spec, located by line and column, rendered with a caret."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpecError(Exception):
    """An error in a spec. `str(err)` is `file:line:col: message`, the line as written (tabs
    expanded to 4 columns) and a caret under the column, as in LANGUAGE.md section 7."""

    def __init__(
        self,
        message: str,
        line: int = 0,
        column: int = 0,
        hint: str | None = None,
        source: str | None = None,
        filename: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column
        self.hint = hint
        self.source = source
        self.filename = filename

    def located(self, source: str, filename: str | None) -> SpecError:
        """Attach the spec text and file name (done once, where the text is known)."""
        if self.source is None:
            self.source = source
        if self.filename is None:
            self.filename = filename
        return self

    def __str__(self) -> str:
        where = self.filename or "<spec>"
        head = f"{where}:{self.line}:{self.column}: {self.message}"
        if self.hint and self.hint not in self.message:
            head += f"; {self.hint}"
        lines = (self.source or "").splitlines()
        if not 1 <= self.line <= len(lines):
            return head
        raw = lines[self.line - 1]
        text = raw.expandtabs(4).rstrip()
        caret = " " * len(raw[: max(self.column - 1, 0)].expandtabs(4)) + "^"
        return f"{head}\n{text}\n{caret}"


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A hint naming the closest candidate, if one is close enough."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else None
