"""Another checkout of attndsl ("before") in the benchmark's own process, for before/after tables.

Timing each checkout in its own subprocess lets the shared machine's speed drift between them
(20-30% a few seconds apart on our VMs); one process calling both back to back on the same
arrays cancels that drift. Used by ab_cpu_one_process.py and bench_cpu.py --before.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType


def import_renamed(checkout: Path, name: str) -> ModuleType:
    """`checkout`'s attndsl package imported as `name`, from a rewritten copy (generated code
    names its runtime modules too, so the printers' templates are rewritten with it). The
    generated sources then differ from this tree's, so the two never share a kernel cache
    entry."""
    tmp = Path(tempfile.mkdtemp(prefix="ab_one_process_"))
    shutil.copytree(checkout / "attndsl", tmp / name)
    shutil.copytree(checkout / "grammar", tmp / "grammar")  # found beside the package
    pattern = re.compile(r"\battndsl(?=[.\s])")
    for path in (tmp / name).rglob("*.py"):
        path.write_text(pattern.sub(name, path.read_text()))
    sys.path.insert(0, str(tmp))
    return __import__(name)


def short_commit(checkout: Path) -> str:
    """`git rev-parse --short HEAD` of `checkout` (with '+dirty' when it has uncommitted
    changes): the report must say which code "before" was, not just where it lay."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True,
                              text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
