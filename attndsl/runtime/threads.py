"""Running a generated cpu kernel's tasks on every thread.

The kernels are compiled `nogil`, without Numba's `parallel=True`: its parfors pass doubled the
compile time of every new spec (causal, float32 forward and backward: 21.6 s -> 9.9 s on a
2-core EPYC, benchmarks/results/compile.md), and a new spec compiles on its first call.
Instead each kernel takes the range of tasks to run first, `kernel(lo, hi, *args)` runs tasks
lo..hi-1 (one task: a batch, head and query tile, or the like), and :func:`run` hands
contiguous ranges to the threads as each finishes its last (dynamic: a causal mask makes the
late query tiles cost more than the early ones).

The ranges shrink as the tasks run out (guided scheduling): each is 1 / (GUIDE x threads) of
the tasks still unclaimed, at least one task. Few calls early, single tasks at the end, so the
threads finish together even when one starts late: a helper idle for a while wakes 1-3 ms
after its range is submitted on these VMs. Fixed ranges (8 for 64 tasks on 2 threads) left
the caller waiting ~2 ms for the helper's last range in a 70 ms forward (full softmax, N =
2048, tile 256: 64 tasks of ~1 ms); guided ranges ran that forward 3-6% faster on a 2-core
EPYC (same process, alternating, medians of 11-13 rounds).

Tasks write disjoint outputs, so the kernels take no locks (only claiming a range does). The
number of threads is Numba's (`numba.get_num_threads()`: NUMBA_NUM_THREADS, or
`numba.set_num_threads`), as before.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numba

GUIDE = 4  # each range: the unclaimed tasks / (GUIDE x threads); 64 tasks on 2 threads: 8, 7, ..

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    """The helper threads (the caller's own thread is the first worker), made on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
            size = max(1, most - 1)  # numba.set_num_threads cannot go above it
            _pool = ThreadPoolExecutor(size, thread_name_prefix="attndsl")
        return _pool


def _forget_workers() -> None:
    """In a forked child: the parent's helper threads do not exist there; make new ones."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)


def run(kernel: Callable[..., Any], tasks: int, *args: Any) -> None:
    """`kernel(lo, hi, *args)` over the ranges of tasks 0..tasks-1, on Numba's thread count."""
    threads = min(numba.get_num_threads(), tasks)
    if threads <= 1:
        if tasks > 0:
            kernel(0, tasks, *args)
        return
    claimed = 0  # tasks 0..claimed-1 belong to a range already
    lock = threading.Lock()  # each range is claimed once
    failed = threading.Event()  # an error (or Ctrl-C) in one range: start no more

    def claim() -> tuple[int, int] | None:
        nonlocal claimed
        with lock:
            lo = claimed
            if lo >= tasks or failed.is_set():
                return None
            claimed = lo + max(1, (tasks - lo) // (GUIDE * threads))
            return lo, claimed

    def work() -> None:
        try:
            while (task_range := claim()) is not None:
                kernel(*task_range, *args)
        except BaseException:
            failed.set()
            raise

    helpers: list[Future[None]] = [_workers().submit(work) for _ in range(threads - 1)]
    try:
        work()
    finally:
        for helper in helpers:  # every range has ended before the outputs are read
            # a helper that has not started yet would find every range claimed: it is not
            # waited for (a short launch would otherwise take as long as its wake-up)
            if not helper.cancel():
                helper.result()
