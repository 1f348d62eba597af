"""The on-disk kernel cache, runtime/cache.py (issue 8, items 7-9): writers racing in threads and
processes, corrupt entries (Numba's .nbi / .nbc, the generated .py), cache folders that cannot be
created or written.

A Numba kernel is loaded from disk only by a process that has not imported it yet, so the tests
of Numba's files run a small worker in a fresh process (WORKER, with a timeout), on a copy of one
cache populated once per module (a tiny GQA spec, forward and backward: ~10 s cold). Tests that
only need the generated .py use the numpy target in this process, on a spec made new per run (a
random scale) so that nothing is already imported.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import attndsl
from attndsl.runtime import cache
from attndsl.runtime.cache import CacheWarning

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TINY = "attention cache_tiny {\n    score q . k\n    scale 1 / sqrt(d)\n}"
TIMEOUT = 600  # a cold compile takes ~10 s alone; the machine may be shared

# Compiles `spec` for cpu in `threads` threads at once, prints the results, the warnings and
# Numba's cache statistics as JSON. With `read_only`, Python's calls that would write under that
# path fail as on a read-only mount (EROFS), since root writes through permission bits.
WORKER = textwrap.dedent("""
    import json, sys, threading, warnings
    import numpy as np
    cfg = json.loads(sys.argv[1])
    warnings.simplefilter("always")
    import attndsl
    from attndsl.runtime import cache
    if cfg["read_only"]:  # Python's file calls see a read-only mount there
        import builtins, errno, io, os
        def refuse(*paths):
            for path in paths:
                if not isinstance(path, int) and os.path.abspath(os.fsdecode(path)).startswith(cfg["read_only"]):
                    raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        def guard(call, writes):
            def guarded(*args, **kwargs):
                if writes(*args, **kwargs):
                    refuse(*args[:2 if call.__name__ in ("replace", "rename") else 1])
                return call(*args, **kwargs)
            return guarded
        for name in ("mkdir", "replace", "rename", "unlink", "remove", "rmdir", "utime"):
            setattr(os, name, guard(getattr(os, name), lambda *a, **k: True))
        WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        os.open = guard(os.open, lambda path, flags, *a, **k: flags & WRITE)
        opens = lambda path, mode="r", *a, **k: any(c in mode for c in "wax+")
        builtins.open = io.open = guard(io.open, opens)
    q, k, v, dout = (np.array(a) for a in cfg["inputs"])
    barrier = threading.Barrier(cfg["threads"])
    results = [None] * cfg["threads"]
    def work(t):
        barrier.wait()
        kern = attndsl.compile(cfg["spec"], "cpu")
        out = kern.forward(q, k, v)
        grads = kern.backward(q, k, v, dout) if cfg["backward"] else {}
        results[t] = {"out": out.tolist(), **{n: g.tolist() for n, g in grads.items()}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=work, args=(t,)) for t in range(cfg["threads"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    module = attndsl.compile(cfg["spec"], "cpu").module(np.float64)
    stats = {f: [sum(getattr(module, f).stats.cache_hits.values()),
                 sum(getattr(module, f).stats.cache_misses.values())]
             for f in ("_attn_fwd", "_attn_bwd")}
    print(json.dumps({"results": results, "stats": stats, "file": module.__file__,
                      "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
""")


def _inputs() -> tuple[np.ndarray, ...]:
    """Odd sizes, GQA: 2 query heads share 1 key head."""
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 2, 5, 3))
    k, v = rng.standard_normal((1, 1, 7, 3)), rng.standard_normal((1, 1, 7, 3))
    return q, k, v, rng.standard_normal((1, 2, 5, 3))


def _worker(cache_dir: Path, spec: str = TINY, threads: int = 1, backward: bool = True,
            read_only: Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.Popen[str]:
    cfg = {"spec": spec, "threads": threads, "backward": backward,
           "read_only": str(read_only) if read_only else None,
           "inputs": [a.tolist() for a in _inputs()]}
    full_env = {**os.environ, **(env or {}), "ATTNDSL_CACHE": str(cache_dir),
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _run(cache_dir: Path, **kwargs: Any) -> dict[str, Any]:
    return _result(_worker(cache_dir, **kwargs))


def _assert_matches_reference(result: dict[str, Any], spec: str = TINY,
                              backward: bool = True) -> None:
    ref = attndsl.compile(spec, "numpy")
    q, k, v, dout = _inputs()
    want = {"out": ref.forward(q, k, v)}
    if backward:
        want.update(ref.backward(q, k, v, dout))
    for got in result["results"]:
        assert set(got) == set(want)
        for name, value in want.items():
            err = np.max(np.abs(np.array(got[name]) - value))
            assert err <= 1e-10 * max(1.0, np.max(np.abs(value))), (name, err)


def _cache_warnings(result: dict[str, Any]) -> list[str]:
    return [m for c, m in result["warnings"] if c == "CacheWarning"]


def _unique_spec() -> tuple[str, float]:
    """A numpy spec no process has compiled before, and its scale."""
    scale = 0.25 + int(uuid.uuid4().hex[:8], 16) / 2 ** 34
    return f"attention cache_new {{\n    score q . k\n    scale {scale!r}\n}}", scale


def _softmax_attention(scale: float) -> np.ndarray:
    q, k, v, _ = _inputs()
    s = scale * np.einsum("bhid,bjd->bhij", q, k[:, 0])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhij,bjd->bhid", p / p.sum(-1, keepdims=True), v[:, 0])


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding TINY's cpu kernels (forward and backward), compiled in a fresh process."""
    path = tmp_path_factory.mktemp("populated")
    result = _run(path)
    assert not result["warnings"], result["warnings"]
    assert all(misses == 1 for _, misses in result["stats"].values()), result["stats"]
    _assert_matches_reference(result)
    return path


def _copy(populated: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the populated cache, and its folder of Numba files."""
    copy = tmp_path / "cache"
    shutil.copytree(populated, copy)
    return copy, copy / "cpu" / "__pycache__"


def _one(folder: Path, pattern: str) -> Path:
    (found,) = folder.glob(pattern)
    return found


# ---- item 7: concurrent writers -----------------------------------------------------------


def test_item7_threads_write_one_entry_at_once(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """4 threads load each of 20 new modules at once. Before: the shared temp name `.<pid>.tmp`
    made ~70% of the loads raise FileNotFoundError. Large sources keep the writes overlapping."""
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path))
    errors: list[BaseException] = []
    for round_ in range(20):
        source = f"X = {uuid.uuid4().hex!r}\n" + "#" * 2_000_000 + "\n"
        barrier = threading.Barrier(4)

        def load(source: str = source, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            return str(cache.load_module(source, "numpy", "race").X)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load) for _ in range(4)]
        errors += [f.exception() for f in futures if f.exception() is not None]
        assert errors or len({f.result() for f in futures}) == 1
    assert not errors, errors[:3]
    assert len(list((tmp_path / "numpy").glob("*.py"))) == 20
    assert not list((tmp_path / "numpy").glob(".*.tmp")), "temp files left behind"


def test_item7_threads_compile_one_new_spec(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """4 threads attndsl.compile the same new spec at once: all succeed, with equal results."""
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path))
    spec, scale = _unique_spec()
    q, k, v, _ = _inputs()
    barrier = threading.Barrier(4)

    def run() -> np.ndarray:
        barrier.wait()
        return attndsl.compile(spec, "numpy").forward(q, k, v)

    with ThreadPoolExecutor(4) as pool:
        outs = [f.result() for f in [pool.submit(run) for _ in range(4)]]
    for out in outs:
        np.testing.assert_array_equal(out, outs[0])
    np.testing.assert_allclose(outs[0], _softmax_attention(scale), rtol=1e-12, atol=1e-12)
    assert len(list((tmp_path / "numpy").glob("*.py"))) == 1


def test_item7_two_processes_with_two_threads_compile_one_new_cpu_kernel(tmp_path: Path) -> None:
    """Two processes started together, each with two threads, compile the same new cpu kernel
    into one empty cache: all four agree with the NumPy reference, and each process compiled or
    loaded each Numba function once (the threads share one module)."""
    spec = _unique_spec()[0].replace("cache_new", "cache_new_cpu")
    procs = [_worker(tmp_path, spec=spec, threads=2, backward=False) for _ in range(2)]
    results = [_result(p) for p in procs]
    for result in results:
        assert not result["warnings"], result["warnings"]
        _assert_matches_reference(result, spec, backward=False)
        hits, misses = result["stats"]["_attn_fwd"]
        assert hits + misses == 1, result["stats"]
    assert results[0]["results"][0] == results[1]["results"][0]


# ---- item 8: corrupt entries --------------------------------------------------------------


def test_item8_corrupt_numba_index_and_data_are_dropped_and_rebuilt(populated: Path,
                                                                    tmp_path: Path) -> None:
    """A truncated .nbi (forward) and a .nbc with a garbled head (backward): before, every call
    raised UnpicklingError until the cache was deleted by hand. Now one warning names each file,
    both kernels compile again, the results are right, and the next process loads them."""
    copy, numba_dir = _copy(populated, tmp_path)
    index = _one(numba_dir, "*._attn_fwd-*.nbi")
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    data = _one(numba_dir, "*._attn_bwd-*.nbc")
    data.write_bytes(b"\x80\x05garbage!" + data.read_bytes()[10:])
    result = _run(copy)
    _assert_matches_reference(result)
    messages = _cache_warnings(result)
    assert len(messages) == 2, messages
    assert any(f"{index} is corrupt" in m for m in messages), messages
    assert any(f"{data} is corrupt" in m for m in messages), messages
    assert result["stats"] == {"_attn_fwd": [0, 1], "_attn_bwd": [0, 1]}
    again = _run(copy)
    assert not again["warnings"] and again["stats"] == {"_attn_fwd": [1, 0], "_attn_bwd": [1, 0]}


def test_item8_numba_entry_that_fails_to_rebuild_is_dropped(populated: Path,
                                                            tmp_path: Path) -> None:
    """A .nbc that is a valid pickle of the wrong thing (its loading fails past unpickling):
    one warning naming the entry, the backward kernel compiled again, right results."""
    copy, numba_dir = _copy(populated, tmp_path)
    data = _one(numba_dir, "*._attn_bwd-*.nbc")
    data.write_bytes(pickle.dumps(("not", "a", "kernel")))
    result = _run(copy)
    _assert_matches_reference(result)
    messages = _cache_warnings(result)
    assert len(messages) == 1 and str(data) in messages[0], messages
    assert "could not be loaded" in messages[0]
    assert result["stats"] == {"_attn_fwd": [1, 0], "_attn_bwd": [0, 1]}


def test_item8_corrupt_generated_source_is_rewritten(populated: Path, tmp_path: Path) -> None:
    """A truncated cpu .py and a numpy .py of garbage bytes (not even UTF-8): each is detected
    (its content no longer matches the hash in its name), named in a warning and rewritten, and
    the kernels still load from Numba's cache (the restored file has the stamp they were saved
    with)."""
    copy, _ = _copy(populated, tmp_path)
    cpu_py = _one(copy / "cpu", "*.py")
    numpy_py = _one(copy / "numpy", "*.py")
    good = {p: p.read_bytes() for p in (cpu_py, numpy_py)}
    cpu_py.write_bytes(good[cpu_py][: len(good[cpu_py]) // 3])
    numpy_py.write_bytes(b"\xff\xfe\x00garbage")
    result = _run(copy)
    _assert_matches_reference(result)
    messages = _cache_warnings(result)
    assert len(messages) == 2, messages
    for path in (cpu_py, numpy_py):
        assert any(f"{path} did not match its key" in m for m in messages), messages
        assert path.read_bytes() == good[path]
    assert result["stats"] == {"_attn_fwd": [1, 0], "_attn_bwd": [1, 0]}


# ---- item 9: folders that cannot be written -----------------------------------------------


def _modes_bind(tmp_path: Path) -> bool:
    """Whether permission bits stop this process writing (not as root, which overrides them)."""
    folder = tmp_path / "modes"
    folder.mkdir(mode=0o555)
    try:
        (folder / "file").touch()
    except PermissionError:
        return True
    finally:
        folder.chmod(0o755)
    return False


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def test_item9_read_only_populated_cache_is_read_not_written(populated: Path,
                                                             tmp_path: Path) -> None:
    """A populated cache that cannot be written: before, every process compiled again and wrote
    Numba's files into ~/.cache/numba. Now one warning names ATTNDSL_CACHE, the kernels load from
    its entries without compiling, and nothing is written into it or into the user's cache.
    As root, permission bits do not stop writes, so the worker then makes Python's file calls
    refuse writes under the cache as a read-only mount would (EROFS): Numba's own calls included,
    which is what sent its files to ~/.cache/numba. Where permission bits bind (not root), the
    folders are made read-only (chmod a-w) instead."""
    copy, _ = _copy(populated, tmp_path)
    before = _snapshot(copy)
    user_cache = tmp_path / "xdg"
    simulate = not _modes_bind(tmp_path)
    modes = {}
    if not simulate:
        for p in [copy, *copy.rglob("*")]:
            modes[p] = p.stat().st_mode
            p.chmod(modes[p] & 0o555)
    try:
        result = _run(copy, read_only=copy if simulate else None,
                      env={"XDG_CACHE_HOME": str(user_cache)})
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    _assert_matches_reference(result)
    messages = _cache_warnings(result)
    assert len(messages) == 1, messages
    reason = "Read-only file system" if simulate else "Permission denied"
    assert f"ATTNDSL_CACHE={copy} cannot be written ({reason}" in messages[0]
    assert result["stats"] == {"_attn_fwd": [1, 0], "_attn_bwd": [1, 0]}
    assert not Path(result["file"]).is_relative_to(copy)
    assert _snapshot(copy) == before
    assert not (user_cache / "numba").exists()


def test_item9_uncreatable_cache_path_falls_back_with_one_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ATTNDSL_CACHE under a regular file: before, a raw NotADirectoryError. Now one warning
    naming ATTNDSL_CACHE and the reason for two new specs, and both compute right."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ATTNDSL_CACHE", str(blocker / "cache"))
    q, k, v, _ = _inputs()
    specs = (_unique_spec(), _unique_spec())
    with pytest.warns(CacheWarning) as record:
        outs = [attndsl.compile(spec, "numpy").forward(q, k, v) for spec, _ in specs]
    for out, (_, scale) in zip(outs, specs):
        np.testing.assert_allclose(out, _softmax_attention(scale), rtol=1e-12, atol=1e-12)
    messages = [str(w.message) for w in record if w.category is CacheWarning]
    assert len(messages) == 1, messages
    assert f"ATTNDSL_CACHE={blocker / 'cache'} cannot be written (Not a directory" in messages[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_item9_unwritable_cache_folder_falls_back(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder without write permission (the read-only test above covers root's case)."""
    if not _modes_bind(tmp_path):
        pytest.skip("this process (root) writes through permission bits; the read-only cache "
                    "test simulates a read-only mount instead")
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o555)
    monkeypatch.setenv("ATTNDSL_CACHE", str(folder))
    spec, scale = _unique_spec()
    q, k, v, _ = _inputs()
    with pytest.warns(CacheWarning, match=r"ATTNDSL_CACHE=.* cannot be written \(Permission"):
        out = attndsl.compile(spec, "numpy").forward(q, k, v)
    np.testing.assert_allclose(out, _softmax_attention(scale), rtol=1e-12, atol=1e-12)
    assert not list(folder.iterdir())
    folder.chmod(0o755)


def test_item9_no_fallback_either_is_a_clear_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """When no temporary folder can be made either: an error naming ATTNDSL_CACHE, both reasons
    and the fix, not a raw OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ATTNDSL_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(cache, "_fallback", None)

    def no_temp(*args: Any, **kwargs: Any) -> str:
        raise OSError(28, "No space left on device", "/tmp")

    monkeypatch.setattr(cache.tempfile, "mkdtemp", no_temp)
    with pytest.raises(RuntimeError, match=r"ATTNDSL_CACHE=.*cannot be written \(Not a directory"
                       r".*nor can a temporary folder .*No space left.*set ATTNDSL_CACHE"):
        attndsl.compile(_unique_spec()[0], "numpy")
