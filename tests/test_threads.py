"""runtime/threads: every task of a launch runs exactly once, on Numba's thread count."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time

import numba
import numpy as np
import pytest
from numba import njit

from attndsl.runtime import threads


@pytest.mark.parametrize("tasks", [0, 1, 2, 3, 7, 8, 9, 64, 1001])
def test_every_task_runs_once(tasks: int) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def kernel(lo: int, hi: int, scale: int) -> None:
        assert 0 <= lo < hi <= tasks
        with lock:
            seen.extend(scale * t for t in range(lo, hi))

    threads.run(kernel, tasks, 3)
    assert sorted(seen) == [3 * t for t in range(tasks)]


def test_ranges_spread_over_the_threads() -> None:
    if numba.get_num_threads() < 2:
        pytest.skip("one thread")
    names: set[str] = set()
    barrier = threading.Barrier(2, timeout=10)  # both threads hold a range at the same time

    def kernel(lo: int, hi: int) -> None:
        names.add(threading.current_thread().name)
        barrier.wait()  # a thread holding one range cannot take the other

    threads.run(kernel, 2)
    assert len(names) == 2 and threading.current_thread().name in names


def test_ranges_shrink_to_single_tasks_as_the_tasks_run_out() -> None:
    if numba.get_num_threads() < 2:
        pytest.skip("one thread")
    ranges: list[tuple[int, int]] = []
    lock = threading.Lock()

    def kernel(lo: int, hi: int) -> None:
        with lock:
            ranges.append((lo, hi))

    threads.run(kernel, 64)
    ranges.sort()
    sizes = [hi - lo for lo, hi in ranges]
    assert [lo for lo, _ in ranges] == [0, *itertools.accumulate(sizes[:-1])]
    assert sum(sizes) == 64 and sizes == sorted(sizes, reverse=True)
    threads_now = min(numba.get_num_threads(), 64)
    assert sizes[0] == 64 // (threads.GUIDE * threads_now) and sizes[-4:] == [1] * 4


def test_a_helper_that_never_started_is_not_waited_for() -> None:
    """Every helper busy elsewhere (as if waking late): the caller runs every range itself
    and returns, without waiting for a helper to start only to find nothing left."""
    if numba.get_num_threads() < 2:
        pytest.skip("one thread")
    helpers = threads._workers(numba.get_num_threads() - 1)
    release, started = threading.Event(), threading.Barrier(len(helpers) + 1, timeout=10)

    def block() -> np.ndarray:
        started.wait()
        release.wait(10)
        return threads._NOTHING

    for helper in helpers:
        helper.hand(block)
    started.wait()  # every helper is inside `block`
    names: set[str] = set()
    try:
        start = time.perf_counter()
        threads.run(lambda lo, hi: names.add(threading.current_thread().name), 4)
        elapsed = time.perf_counter() - start
    finally:
        release.set()
    assert names == {threading.current_thread().name} and elapsed < 5
    threads.run(lambda lo, hi: names.add(threading.current_thread().name), 64)
    assert len(names) >= 1  # the helpers came back (the launch after ends, as every launch)


def test_tasks_run_once_when_the_helpers_sleep_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """ATTNDSL_SPIN_US=0: no spinning; a helper asleep is woken for each launch, and the
    caller, its ranges done, checks for the helpers' last ranges between naps."""
    monkeypatch.setattr(threads, "_rounds", 0)
    for tasks in (1, 2, 9, 64):
        seen: list[int] = []
        lock = threading.Lock()

        def kernel(lo: int, hi: int) -> None:
            time.sleep(0.001)  # long enough for a sleeping helper to join some launches
            with lock:
                seen.extend(range(lo, hi))

        threads.run(kernel, tasks)
        assert sorted(seen) == list(range(tasks))


def test_a_launch_does_not_keep_its_arrays_alive() -> None:
    """The helpers drop a launch's job (and the arrays it holds) once it ends, run or not."""
    import gc
    import weakref

    if numba.get_num_threads() < 2:
        pytest.skip("one thread")
    big = np.ones(1000)
    gone = weakref.ref(big)
    barrier = threading.Barrier(2, timeout=10)  # a helper runs one of the two ranges
    threads.run(lambda lo, hi, a: barrier.wait(), 2, big)
    del big
    time.sleep(0.05)  # a helper that joined has left (it drops the job as it returns)
    gc.collect()
    assert gone() is None


def test_four_threads_on_two_cores_run_every_task_once() -> None:
    """Three helpers joining and leaving launches at once (their busy count is atomic), more
    threads than cores; in a subprocess (NUMBA_NUM_THREADS is read once), bounded in time."""
    import subprocess
    import sys

    code = (
        "import threading, numpy as np\n"
        "from attndsl.runtime import threads\n"
        "lock = threading.Lock()\n"
        "for launch in range(300):\n"
        "    seen = []\n"
        "    def kernel(lo, hi):\n"
        "        with lock: seen.extend(range(lo, hi))\n"
        "    tasks = 1 + launch % 37\n"
        "    threads.run(kernel, tasks)\n"
        "    assert sorted(seen) == list(range(tasks)), (launch, seen)\n"
        "print('ok', len(threads._helpers))\n"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "3"]


def test_an_error_in_a_range_reaches_the_caller_and_stops_the_rest() -> None:
    done: list[int] = []

    def kernel(lo: int, hi: int) -> None:
        if lo == 0:
            raise ValueError("range 0")
        time.sleep(0.05)  # the first range's error comes while the other thread is here
        done.append(lo)

    with pytest.raises(ValueError, match="range 0"):
        threads.run(kernel, 64)  # range 0 is tasks 0..7 on 2 threads
    assert len(done) <= 1  # each thread ends its current range, then starts no other
    threads.run(lambda lo, hi: done.append(-1), 1)  # the pool still works afterwards
    assert done[-1] == -1


@njit(nogil=True, cache=False)
def _squares(lo, hi, x, out):  # pragma: no cover - compiled
    for task in range(lo, hi):
        acc = 0.0
        for c in range(x.shape[1]):
            acc += x[task, c] * x[task, c]
        out[task] = acc


def test_a_nogil_kernel_on_every_thread_gives_the_serial_result() -> None:
    x = np.random.default_rng(0).standard_normal((517, 33))
    out = np.full(517, np.nan)
    threads.run(_squares, 517, x, out)
    np.testing.assert_allclose(out, (x * x).sum(axis=1), rtol=1e-14)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_runs_tasks_on_its_own_threads() -> None:
    threads.run(lambda lo, hi: None, 8)  # the parent's helper threads exist now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:  # a child whose copy of the pool has no live threads
        got = pool.apply_async(_in_child).get(timeout=60)
    assert got == list(range(50))


def _in_child() -> list[int]:
    seen: list[int] = []
    lock = threading.Lock()

    def kernel(lo: int, hi: int) -> None:
        with lock:
            seen.extend(range(lo, hi))

    threads.run(kernel, 50)
    return sorted(seen)


# ---- NumPy's element-wise functions on the threads (numpy_ops.on_threads) --------------------


def test_numpy_ops_on_threads_give_the_same_bits_and_keep_the_callers_errstate() -> None:
    import warnings

    from attndsl.runtime import numpy_ops as ops

    x = (np.random.default_rng(0).standard_normal((3, 8, 40001, 7)) * 3).astype(np.float32)
    x.flat[::997], x.flat[5], x.flat[6] = np.nan, np.inf, -np.inf
    assert x.size >= ops.PARALLEL_ELEMENTS and x.size % ops.PIECE  # a ragged last piece
    for name in ("elu", "elu_grad", "sigmoid", "softplus", "gelu", "gelu_grad"):
        f = getattr(ops, name)
        for value in (x, x[:, :, ::2], x.astype(np.float64)):  # non-contiguous, float64
            with np.errstate(all="ignore"):  # NaN and inf in, as the kernels' prologue has
                got, want = f(value), f.__wrapped__(value)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want, equal_nan=True), name
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a helper thread warning here would raise
        ops.gelu(x)


def test_on_threads_runs_pieces_on_every_thread() -> None:
    from attndsl.runtime.numpy_ops import PIECE, on_threads

    seen: set[int] = set()

    def slow_double(a: np.ndarray) -> np.ndarray:
        seen.add(threading.get_ident())
        time.sleep(0.002)
        return a * 2

    x = np.arange(64 * PIECE, dtype=np.float64)
    np.testing.assert_array_equal(on_threads(slow_double)(x), x * 2)
    assert len(seen) == min(2, numba.get_num_threads())
