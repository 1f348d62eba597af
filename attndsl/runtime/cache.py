"""Generated source on disk: key = sha256(source + target + versions) -> a .py file, imported.

Numba caches only functions that live in a real file, and a file gives readable tracebacks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np


def cache_dir() -> Path:
    """ATTNDSL_CACHE, else the user's cache directory."""
    root = os.environ.get("ATTNDSL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attndsl"


def _versions() -> str:
    import numba

    from .. import __version__

    return f"attndsl {__version__} numpy {np.__version__} numba {numba.__version__}"


def key(source: str, target: str) -> str:
    text = f"{target}\n{_versions()}\n{source}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_module(source: str, target: str, stem: str) -> ModuleType:
    """Write `source` under the cache directory (once) and import it as a module."""
    digest = key(source, target)
    name = f"attndsl_{target}_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    folder = cache_dir() / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)  # atomic: concurrent processes never import half a file
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
