"""SourceWriter: lines, indentation and blank lines for generated Python source."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class SourceWriter:
    def __init__(self, indent: str = "    ") -> None:
        self.lines: list[str] = []
        self.level = 0
        self.indent = indent

    def __call__(self, line: str = "") -> None:
        self.lines.append(self.indent * self.level + line if line else "")

    def comment(self, text: str) -> None:
        for line in text.splitlines():
            self(f"# {line}".rstrip())

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self(header)
        self.level += 1
        try:
            yield
        finally:
            self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"
