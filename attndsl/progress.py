"""One progress line on stderr for long work (`attndsl bench`, `attndsl verify` over several
files): rewritten in place on a terminal, one line per step in a log, never on stdout (which
carries the reports and tables)."""

from __future__ import annotations

import sys


def progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


def progress_done() -> None:
    """Clears the progress line of a terminal before a report or table is printed."""
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def quiet(text: str) -> None:
    """The progress of a caller that shows none."""
