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

The helpers are threads of our own that, after a launch, spin for SPIN_S without the GIL,
watching for the next launch, before they sleep. Waking a sleeping thread took 70-170 us on
these VMs (a pool's submit and result of a no-op: 167 us), and a launch paid it twice: once
for the helper to start and once for the caller, waiting for the helper's last range, to
wake. A decoding call (a few ms) paid it in full, and so did each of the launcher's passes
before a kernel. The caller waits for the helpers' last ranges the same way: spinning, then
sleeping.

Tasks write disjoint outputs, so the kernels take no locks (only claiming a range does). The
number of threads is Numba's (`numba.get_num_threads()`: NUMBA_NUM_THREADS, or
`numba.set_num_threads`), as before.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

GUIDE = 4  # each range: the unclaimed tasks / (GUIDE x threads); 64 tasks on 2 threads: 8, 7, ..
# How long a helper spins for the next launch, and the caller for the helpers' last ranges,
# before sleeping. Calls come back to back (the launcher's passes, then the kernel; a decoding
# loop's layers), so a short spin finds the next one; a longer one would keep a core busy for
# nothing after the last call. ATTNDSL_SPIN_US overrides it (0: sleep at once, as a pool does).
SPIN_S = float(os.environ.get("ATTNDSL_SPIN_US", "2000")) * 1e-6
_NAP_S = 1e-4  # past SPIN_S, the caller checks for its helpers' last ranges this often


_spin_module: Any = None
_rounds: int | None = None


def _loops() -> Any:
    """runtime/spin.py, imported at first use (see its docstring: not at this import)."""
    global _spin_module
    if _spin_module is None:
        from . import spin

        _spin_module = spin
    return _spin_module


def _spin_rounds() -> int:
    """The polls of `spin.spin` in SPIN_S, measured on this machine at first use."""
    global _rounds
    if _rounds is None:
        flag, trial = np.zeros(1, np.int64), 1 << 14
        _loops().spin(flag, 0, True, 1)  # compiled (or loaded) before it is timed
        start = time.perf_counter()
        _loops().spin(flag, 0, True, trial)
        per_s = trial / max(time.perf_counter() - start, 1e-9)
        _rounds = int(SPIN_S * per_s)
    return _rounds


# ---- the helper threads ----------------------------------------------------------------------


class _Helper:
    """A helper thread: runs the latest job handed to it, then spins for the next one."""

    def __init__(self, name: str) -> None:
        self.handed = np.zeros(1, np.int64)  # jobs handed over so far
        self.job: Callable[[], np.ndarray] | None = None
        self.wake = threading.Condition(threading.Lock())
        self.sleeping = False
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def hand(self, job: Callable[[], np.ndarray]) -> None:
        with self.wake:
            self.job = job
            self.handed[0] += 1
            if self.sleeping:
                self.wake.notify()

    def retract(self, job: Callable[[], np.ndarray]) -> None:
        """Drop `job` if it has not started (it holds the launch's arrays)."""
        with self.wake:
            if self.job is job:
                self.job = None

    def _loop(self) -> None:
        seen, left = 0, _NOTHING
        while True:
            if not _loops().leave_and_spin(left, self.handed, seen, _spin_rounds()):
                with self.wake:
                    self.sleeping = True
                    while self.handed[0] == seen:
                        self.wake.wait()
                    self.sleeping = False
            with self.wake:  # a job handed while the last ran: only the latest is run
                seen, job, self.job = int(self.handed[0]), self.job, None
            # the job's counter of busy helpers when it joined, to leave once the GIL is free;
            # nor does a job that ran hold its arrays while the helper waits
            left = job() if job is not None else _NOTHING
            del job


_NOTHING = np.zeros(0, np.int64)  # no launch to leave
_helpers: list[_Helper] = []
_helpers_lock = threading.Lock()


def _workers(count: int) -> list[_Helper]:
    """`count` helper threads (the caller's own thread is the first worker), made on first
    use; at most NUMBA_NUM_THREADS - 1, as numba.set_num_threads cannot go above it."""
    with _helpers_lock:
        while len(_helpers) < count:
            _helpers.append(_Helper(f"attndsl_{len(_helpers)}"))
        return _helpers[:count]


def _forget_workers() -> None:
    """In a forked child: the parent's helper threads do not exist there; make new ones."""
    global _helpers, _helpers_lock
    _helpers, _helpers_lock = [], threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)


def run(kernel: Callable[..., Any], tasks: int, *args: Any) -> None:
    """`kernel(lo, hi, *args)` over the ranges of tasks 0..tasks-1, on Numba's thread count."""
    threads = min(numba.get_num_threads(), tasks)
    if threads <= 1:
        if tasks > 0:
            kernel(0, tasks, *args)
        return
    claimed = 0  # tasks 0..claimed-1 belong to a range already
    lock = threading.Lock()  # each range is claimed once; helpers join under it
    busy = np.zeros(1, np.int64)  # helpers inside a range of this launch
    errors: list[BaseException] = []  # a helper's error, raised in the caller

    def claim() -> tuple[int, int] | None:
        nonlocal claimed
        with lock:
            lo = claimed
            if lo >= tasks or errors:
                return None
            claimed = lo + max(1, (tasks - lo) // (GUIDE * threads))
            return lo, claimed

    def work() -> None:
        while (task_range := claim()) is not None:
            kernel(*task_range, *args)

    def helper_work() -> np.ndarray:
        """A helper's part: the launch's `busy`, which it joined (it leaves by
        `spin.leave_and_spin`), or `_NOTHING` when every range was claimed before it started (it
        is not waited for)."""
        with lock:
            if claimed >= tasks or errors:
                return _NOTHING
            _loops().join(busy)
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - raised in the caller
            with lock:
                errors.append(error)
        return busy

    helpers = _workers(threads - 1)
    for helper in helpers:
        helper.hand(helper_work)
    try:
        work()
    except BaseException as error:
        with lock:
            errors.append(error)  # the helpers start no other range
        raise
    finally:  # every range has ended before the outputs are read
        for helper in helpers:
            helper.retract(helper_work)
        if not _loops().spin(busy, 0, False, _spin_rounds()):
            while not _loops().spin(busy, 0, False, 0):  # a long range: wait without
                time.sleep(_NAP_S)  # holding a core
    if errors:
        raise errors[0]
