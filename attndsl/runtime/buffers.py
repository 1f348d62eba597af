"""Warm memory for the cpu target's large arrays: results, gradients and scratch.

A freshly mapped page faults on its first touch. On the virtual machines measured that cost a
fifth of a call: a causal forward + backward at N = 2048 (float32, 8 heads) took 128-140 ms
with fresh arrays and 107-110 ms when glibc kept its freed memory
(benchmarks/results/torch_op.md), and whether a call paid depended on what its caller had
freed before: the same kernel ran 20% slower inside the PyTorch op in one run, equal in the
next.

`empty` and `zeros` hand out arrays of MIN_BYTES or more from anonymous memory maps. Once
nothing refers to such an array or to any view of it, its map goes back to an idle list and
the next request of the same size gets it again, pages already in place. At most
`ATTNDSL_POOL_MIB` MiB (default: a sixteenth of the machine's memory, at least 256) sit idle,
the least recently freed dropped first; `release()` drops them all. `ATTNDSL_POOL_MIB=0` turns
the pool off.

Why this is safe: the array handed out is a view of a one-dimensional array `flat` made by
`np.frombuffer` over the map. NumPy collapses a view's base to the first array that owns its
data or whose base is not an array, so every view of the result, however taken (slices,
transposes, `torch.from_numpy`), holds `flat`; `flat`'s finalizer, which returns the map, runs
only after the last of them is gone.
"""

from __future__ import annotations

import collections
import functools
import math
import mmap
import os
import threading
import weakref
from typing import Any

import numpy as np

MIN_BYTES = 1 << 20  # smaller arrays: NumPy's allocator (glibc keeps those warm itself)
MIN_DEFAULT_MIB = 256
MEMORY_SHARE = 16  # by default the pool keeps up to this fraction of the machine's memory idle


@functools.cache
def default_mib() -> float:
    """The pool's default size: a MEMORY_SHARE-th of physical memory, at least
    MIN_DEFAULT_MIB. At N = 65536 (8 heads, d = 64, float32) each array is 128 MiB and a
    causal linear forward + backward handles about a dozen: with 256 MiB they came fresh every
    call, and the first touches made it 1.3x slower (2.2 s against 1.7 s with 1.5 GiB)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX, or not known
        return MIN_DEFAULT_MIB
    return max(MIN_DEFAULT_MIB, total / MEMORY_SHARE / (1 << 20))

_lock = threading.RLock()  # RLock: a garbage collection inside a section may run a finalizer
_idle: collections.OrderedDict[int, tuple[int, mmap.mmap]] = collections.OrderedDict()
_idle_bytes = 0


def limit_bytes() -> int:
    """How many bytes of idle maps the pool keeps (ATTNDSL_POOL_MIB)."""
    text = os.environ.get("ATTNDSL_POOL_MIB")
    if text is None:
        return int(default_mib() * (1 << 20))
    try:
        mib = float(text)
    except ValueError:
        raise ValueError(f"ATTNDSL_POOL_MIB={text!r}: expected a number of MiB (0 turns the "
                         "pool off)") from None
    return max(0, int(mib * (1 << 20)))


def idle_bytes() -> int:
    """Bytes of idle maps the pool holds now."""
    return _idle_bytes


def release() -> None:
    """Drop every idle map (its memory goes back to the system once unmapped)."""
    global _idle_bytes
    with _lock:
        _idle.clear()
        _idle_bytes = 0


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Like `np.empty`: uninitialized."""
    return _array(shape, dtype, zero=False)


def zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Like `np.zeros`."""
    return _array(shape, dtype, zero=True)


def _array(shape: tuple[int, ...], dtype: Any, zero: bool) -> np.ndarray:
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < MIN_BYTES or limit_bytes() == 0:
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    block = _take(size)
    fresh = block is None
    if block is None:
        block = mmap.mmap(-1, size)  # anonymous, private: zero pages
    flat = np.frombuffer(block, dtype, count=count)
    finalizer = weakref.finalize(flat, _give_back, size, block)
    finalizer.atexit = False
    result = flat.reshape(shape)
    if zero and not fresh:
        result.fill(0)
    return result


def _take(size: int) -> mmap.mmap | None:
    global _idle_bytes
    with _lock:
        for key, (block_size, block) in _idle.items():
            if block_size == size:
                del _idle[key]
                _idle_bytes -= size
                return block
    return None


def _give_back(size: int, block: mmap.mmap) -> None:
    global _idle_bytes
    limit = _safe_limit()
    with _lock:
        if size > limit:
            return  # dropped: unmapped once the last reference (this frame's) goes
        _idle[id(block)] = (size, block)
        _idle_bytes += size
        while _idle_bytes > limit:  # the least recently freed first
            _, (old_size, _old) = _idle.popitem(last=False)
            _idle_bytes -= old_size


def _safe_limit() -> int:
    """limit_bytes(), or 0 when ATTNDSL_POOL_MIB is unreadable (a finalizer must not raise)."""
    try:
        return limit_bytes()
    except ValueError:
        return 0
