"""The CUDA simulator's suite (tests/cuda_sim), run as a pytest process of its own, started in
the background as soon as a session has collected the test that checks it.

NUMBA_ENABLE_CUDASIM is read once, when Numba is imported, so the simulator tests cannot share
a process with the CPU kernels on the real Numba. They take about 8 minutes on 2 cores; run
inside the checking test they came last under `-n 2 --dist loadfile` (pytest-xdist hands out
the files with the most tests first), alone on one core. Started at collection instead, they
run beside the other tests. Under xdist every worker collects the whole suite: the first to
create the run's folder (named by the run's id, which all workers share) starts the process;
the checking test, on whichever worker, waits for its exit code there.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT = 1800  # seconds the suite may take
_SESSION_ID = uuid.uuid4().hex  # a run without xdist: this process alone


def available() -> bool:
    """Whether numba-cuda (and so its simulator) is installed."""
    return importlib.util.find_spec("numba_cuda") is not None


def _folder() -> Path:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", _SESSION_ID)
    return Path(tempfile.gettempdir()) / f"attndsl-cuda-sim-{run}"


def start() -> None:
    """Start the suite once per test run (a no-op on every later call, in any worker)."""
    folder = _folder()
    try:
        folder.mkdir()
    except FileExistsError:
        return
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_TESTRUNUID", None)
    pytest = shlex.join([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "tests/cuda_sim"])
    # the exit code is written last, through a temporary name: its presence means done
    script = (f"timeout {TIME_LIMIT} {pytest} > {shlex.quote(str(folder / 'output'))} 2>&1; "
              f"echo $? > {shlex.quote(str(folder / 'rc.tmp'))}; "
              f"mv {shlex.quote(str(folder / 'rc.tmp'))} {shlex.quote(str(folder / 'rc'))}")
    subprocess.Popen(["sh", "-c", script], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def result() -> tuple[int, str]:
    """(exit code, output) of this run's suite, waiting for it (started if it was not)."""
    start()
    folder = _folder()
    deadline = time.monotonic() + TIME_LIMIT + 60
    while not (folder / "rc").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the simulator suite did not finish within {TIME_LIMIT} s "
                               f"(output so far: {folder / 'output'})")
        time.sleep(1)
    return int((folder / "rc").read_text()), (folder / "output").read_text()
