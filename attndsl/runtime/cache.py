"""Generated source on disk: key = sha256(source + target + versions) -> a .py file, imported.

Numba caches only functions that live in a real file, and a file gives readable tracebacks.

Threads and processes may share one cache: a writer writes a temp file of its own and renames it
(atomic), and a lock per module makes the threads of a process import it (and Numba compile it)
once. A corrupt entry (a generated .py that does not match its key, a Numba .nbi/.nbc that
cannot be read back) is dropped with a warning naming the file and built again. A cache folder
that cannot be created or written is replaced, with one warning, by a temporary folder for this
process (entries already in a read-only cache are copied from it), never by ~/.cache/numba.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import io
import os
import pickle
import pickletools
import shutil
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np


class CacheWarning(UserWarning):
    """The kernel cache could not be used as it is; attndsl carried on as the message says."""


_lock = threading.Lock()  # guards the tables below, never held while compiling
_module_locks: dict[str, threading.Lock] = {}
_modules: dict[str, ModuleType] = {}
_folders: dict[Path, tuple[Path, Path | None]] = {}  # configured -> (used, read-only source)
_warned: set[Path] = set()
_fallback: Path | None = None


def cache_dir() -> Path:
    """ATTNDSL_CACHE, else the user's cache directory."""
    root = os.environ.get("ATTNDSL_CACHE")
    if root:
        return Path(root).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).absolute() / "attndsl"


def _versions(target: str) -> str:
    import numba

    from .._version import __version__

    text = f"attndsl {__version__} numpy {np.__version__} numba {numba.__version__}"
    if target == "cpu":  # Numba's cache cannot see a change in the helpers the kernels call
        from .cpu_intrinsics import INTRINSICS_VERSION

        text += f" intrinsics {INTRINSICS_VERSION}"
    return text


def key(source: str, target: str) -> str:
    text = f"{target}\n{_versions(target)}\n{source}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_module(source: str, target: str, stem: str) -> ModuleType:
    """Write `source` under the cache directory (once) and import it as a module."""
    name = f"attndsl_{target}_{stem}_{key(source, target)}"
    with _lock:
        lock = _module_locks.setdefault(name, threading.Lock())
    with lock:
        if name not in _modules:
            _modules[name] = _import(name, _entry(name, source, target), source)
        return _modules[name]


# ---- where entries live -------------------------------------------------------------------


def _user_level() -> int:
    """The `stacklevel` of the first caller outside attndsl and Numba: the user's line."""
    import numba

    inside = (str(Path(__file__).parent.parent), str(Path(numba.__file__).parent))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _probe(folder: Path) -> None:
    """Raise OSError unless `folder` and its __pycache__ (Numba's files) can be written."""
    for path in (folder, folder / "__pycache__"):
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()


def _folder(target: str) -> tuple[Path, Path | None]:
    """The folder `target`'s entries are written to, and the configured one when it is
    read-only (entries are copied from it)."""
    configured = cache_dir() / target
    with _lock:
        if configured not in _folders:
            try:
                _probe(configured)
                _folders[configured] = (configured, None)
            except OSError as err:
                _folders[configured] = (_fall_back(configured, err), configured)
        return _folders[configured]


def _fall_back(configured: Path, err: OSError) -> Path:
    """A folder of this process's temporary cache, after one warning naming ATTNDSL_CACHE."""
    global _fallback
    root = configured.parent
    named = (f"ATTNDSL_CACHE={root}" if os.environ.get("ATTNDSL_CACHE")
             else f"the kernel cache {root} (ATTNDSL_CACHE is not set)")
    reason = err.strerror or str(err)
    if err.strerror and err.filename:
        reason += f": {err.filename}"
    try:
        if _fallback is None:
            _fallback = Path(tempfile.mkdtemp(prefix="attndsl-cache-"))
            atexit.register(shutil.rmtree, _fallback, True)
        folder = _fallback / configured.name
        _probe(folder)
    except OSError as again:
        raise RuntimeError(f"{named} cannot be written ({reason}), nor can a temporary folder "
                           f"({again}); set ATTNDSL_CACHE to a writable directory") from err
    if root not in _warned:
        warnings.warn(f"{named} cannot be written ({reason}); kernels are compiled into "
                      f"{_fallback} for this process only (entries already in the cache are "
                      "read). Set ATTNDSL_CACHE to a writable directory to keep them.",
                      CacheWarning, stacklevel=_user_level())
        _warned.add(root)
    return folder


def _entry(name: str, source: str, target: str) -> Path:
    """The path of `name`'s .py, written if missing or corrupt."""
    folder, read_only = _folder(target)
    path = folder / f"{name}.py"
    if read_only is not None and not path.exists():
        _copy_entry(read_only, folder, name, source)
    try:
        _write_if_changed(path, source.encode())
    except OSError as err:
        if read_only is not None:  # the temporary folder itself failed
            raise
        with _lock:  # the folder became unwritable after the probe: fall back from now on
            _folders[folder] = (_fall_back(folder, err), folder)
        return _entry(name, source, target)
    return path


def _copy_entry(src: Path, dst: Path, name: str, source: str) -> None:
    """Copy a read-only cache's entry (source and Numba's files) if its source is intact."""
    path = src / f"{name}.py"
    with contextlib.suppress(OSError):
        if path.read_bytes() == source.encode():
            for numba_file in (src / "__pycache__").glob(f"{name}.*.nb[ic]"):
                shutil.copy2(numba_file, dst / "__pycache__" / numba_file.name)
            shutil.copy2(path, dst / path.name)


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        current: bytes | None = path.read_bytes()
    except FileNotFoundError:
        current = None
    if current == data:
        return
    if current is not None:  # the name holds the source's hash: any difference is damage
        warnings.warn(f"kernel cache: {path} did not match its key (corrupt or edited); "
                      "rewrote it", CacheWarning, stacklevel=_user_level())
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own per writer (threads share the pid), renamed atomically: readers in
    # other threads and processes see the old file or the new one, never half of one
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}."
                         f"{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _import(name: str, path: Path, source: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Numba finds a cached function's globals by module name
    try:
        # compiled from `source`, not from a .pyc that could itself be corrupt
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102
    except BaseException:
        del sys.modules[name]
        raise
    _guard_numba_caches(module)
    return module


# ---- Numba's files: recover from a corrupt entry ------------------------------------------


def _guard_numba_caches(module: ModuleType) -> None:
    """Make each cached function of `module` drop an entry it cannot load and compile again."""
    from numba.core.caching import Cache
    from numba.core.dispatcher import Dispatcher

    for value in vars(module).values():
        cache = getattr(value, "_cache", None) if isinstance(value, Dispatcher) else None
        if isinstance(cache, Cache) and value.py_func.__module__ == module.__name__:
            prefix = f"{module.__name__}.{value.py_func.__qualname__}-"
            # per instance: Numba has no hook for a failed load
            cache.load_overload = _recovering(  # type: ignore[method-assign]
                cache.load_overload, Path(cache.cache_path), prefix)


def _recovering(load: Callable[..., Any], folder: Path, prefix: str) -> Callable[..., Any]:
    def load_overload(sig: Any, target_context: Any) -> Any:
        try:
            return load(sig, target_context)
        # unpickling or rebuilding a damaged entry raises anything; all mean "compile again"
        except Exception as err:  # noqa: BLE001
            _drop_entry(folder, prefix, err)
            return None

    return load_overload


def _drop_entry(folder: Path, prefix: str, err: Exception) -> None:
    """Delete one function's Numba files after a failed load, warning with the culprit."""
    files = sorted(folder.glob(f"{prefix}*.nbi")) + sorted(folder.glob(f"{prefix}*.nbc"))
    culprit = next((f for f in files if not _readable(f)), None)
    what = (f"{culprit} is corrupt" if culprit is not None
            else f"the entry {', '.join(map(str, files))} could not be loaded")
    warnings.warn(f"kernel cache: {what} ({type(err).__name__}: {err}); dropped it, compiling "
                  "again", CacheWarning, stacklevel=_user_level())
    for f in files:
        with contextlib.suppress(OSError):
            f.unlink()


def _readable(path: Path) -> bool:
    """Whether a Numba file parses: an index is a version then (stamp, overloads); a data file
    one pickle, walked without being loaded (loading it would import the module)."""
    try:
        data = path.read_bytes()
        if path.suffix == ".nbi":
            stream = io.BytesIO(data)
            pickle.load(stream)
            pickle.loads(stream.read())
        else:
            ops = list(pickletools.genops(data))
            if ops[-1][2] != len(data) - 1:
                return False
    except Exception:  # noqa: BLE001 - anything a damaged pickle raises means "not readable"
        return False
    return True
