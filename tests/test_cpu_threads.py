"""Python threads calling one cpu kernel at once (a data loader, a server): Numba's default
workqueue threading layer aborts the process on concurrent parallel regions, so every
parallel launch of the launcher holds one lock (runtime/cpu_kernel._PARALLEL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, threading
    import numpy as np
    import attndsl
    kern = attndsl.compile("attention t {\\n score q . k\\n mask j <= i\\n}", "cpu")
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 2, 70, 8)) for _ in range(4))
    want = kern.backward(q, k, v, dout)
    same = []
    def work():
        for _ in range(25):
            got = kern.backward(q, k, v, dout)
            same.append(all(np.array_equal(got[n], want[n]) for n in want))
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"calls": len(same), "same": all(same)}))
""")


def test_four_threads_share_one_cpu_kernel_under_workqueue(tmp_path: Path) -> None:
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"calls": 100, "same": True}


LAYER = textwrap.dedent("""
    import numba, numpy as np
    import attndsl
    numba.get_num_threads()  # starts Numba's threads: the layer is fixed from here on
    kern = attndsl.compile("attention t {\\n score q . k\\n}", "cpu")
    q = np.ones((1, 2, 5, 4))
    kern(q, q, q)
    print(numba.threading_layer())
""")


def test_the_cpu_target_runs_on_workqueue_unless_the_user_chose_a_layer(tmp_path: Path) -> None:
    """Numba's omp layer costs ~16 ms per launch on a loaded machine: attndsl asks for
    workqueue at import (numba imported first, and its threads started before any kernel,
    as benchmarks/bench_torch_op.py does), and keeps a layer the user set."""
    base = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    layers = {}
    for chosen in (None, "omp"):
        env = base if chosen is None else {**base, "NUMBA_THREADING_LAYER": chosen}
        done = subprocess.run([sys.executable, "-c", LAYER], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600, check=False)
        layers[chosen] = (done.returncode, done.stdout.strip().splitlines()[-1:])
        if chosen == "omp" and done.returncode != 0:
            pytest.skip(f"no omp layer here: {done.stderr[-300:]}")
    assert layers[None] == (0, ["workqueue"]), layers
    assert layers["omp"] == (0, ["omp"]), layers
