"""The cpu kernels' query x key tile, chosen for the machine they run on.

The best tile depends on the machine (its caches, its vector width, how fast its BLAS runs a
small GEMM) and on the spec (a causal mask wastes more of a tall tile): 64 x 128 was best on
the AVX-512 Xeon the kernels were first tuned on, while on an AVX2 EPYC 128 x 128 ran the full
softmax forward at N = 2048 about 1.3x faster (issue 12). So the tile is not a constant of the
generated code: the kernels read it from `sz[9], sz[10]`, and this module picks it per call.
Only the tile buffers' row stride stays a constant (numba_cpu.BK_MAX, so the key tile is at
most that): with a stride read at run time LLVM cannot prove the buffer indices non-negative,
keeps Numba's wraparound selects in the inner loops and does not vectorize them (the
backward ran 1.5x slower).

- `ATTNDSL_CPU_TILES` unset or `auto`: a call with at least TUNE_PAIRS (query, key) pairs per
  head uses the tile a short measurement chose; smaller calls use DEFAULT. The measurement runs
  once per (machine, kernel source, dtype, heads, kv_heads, d, dv, threads, candidates, length)
  on arrays made for it (`attndsl.demo.demo_inputs`, the call's heads), forward and backward
  apart, with the keys packed where every candidate fits panels (`ranking_layout`), else
  transposed: each candidate runs once, then TRIALS timed rounds at TUNE_N rows; the FINALISTS
  fastest run FINAL_TRIALS more rounds at the call's length class (TUNE_N_LONG rows for calls
  of at least TUNE_N_LONG**2 pairs per head, else TUNE_N again), which picks among them,
  each ranked by the median over the rounds of its time over the round's fastest (RANKING:
  a slow spell of the machine hits a round, not a candidate). The choice is kept in this
  process and in `<kernel cache>/tiles.json`, so a later process on the same machine measures
  nothing.
- `off`: DEFAULT everywhere. `BQxBK` (`128x128`): that tile for both kernels; `BQxBK,BQxBK`:
  the forward's, then the backward's.

The key operands' layout is chosen the same way, after the tile: the launcher transposes each
GEMM's key operand ([B, H, n_k, F] -> [B, H, F, n_k], an NN product with the short k = F: 1.3x
faster than NT on an AVX-512 Xeon), or the GEMMs read it as stored (NT: as fast on an AVX2
EPYC, where the copy cost 0.5 ms of a 9.5 ms sliding window forward at N = 2048), or the
launcher packs it, and v (dO and q too for the backward), in panels of PANEL columns for
micro_gemm, attndsl's own register-blocked GEMM (1.04-1.29x faster than stored on an AVX2
EPYC, forward and backward, benchmarks/results/ab_keys.md; packed needs key tiles that are
multiples of PANEL).
With `ATTNDSL_CPU_KEYS` unset or `auto`, calls of at least TUNE_PAIRS pairs per head use the
layout that ran fastest with the chosen tile (each runs FINAL_TRIALS rounds at the call's
length class, kept in tiles.json beside the tile); smaller calls, and `transposed`, transpose;
`stored` reads the keys as stored, `packed` packs them.

Results depend on the tile only through rounding (the order of the sums); every call with the
same key uses the same tile, in this process and the next, so they are reproducible run after
run on one machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from ..codegen import numba_cpu
from ..ir import NormKind
from .cpu_intrinsics import PANEL

if TYPE_CHECKING:
    from .cpu_kernel import CpuKernel
    from .kernel import Call

DEFAULT = (numba_cpu.BQ, numba_cpu.BK)
# 256 x 256 ran the full and causal softmax at N = 2048 and 4096 10-17% faster than 128 x 128
# on an AVX2 EPYC (bigger GEMMs: OpenBLAS's small ones lose to their call overhead); a wider
# key tile than 256 (BK_MAX = 512) gained at most 5% there and lost as much on causal
CANDIDATES = ((64, 128), (128, 128), (64, 256), (128, 64), (32, 256), (128, 256), (256, 128),
              (256, 256))
TUNE_PAIRS = 1024 * 1024  # n_q * n_k from which a call is worth a measured tile
TUNE_N = 1024  # the measurement's sequence length
# ... of its final rounds for calls of at least TUNE_N_LONG**2 pairs: the best tile changes with
# the length. On an AVX2 EPYC the causal forward's three best tiles ran within 3% of each other
# at N = 1024 (the measurement's noise picked 128 x 128), while at 2048 256 x 256 ran 6-11%
# ahead of them. Not on fewer heads: there the causal backward ranked its tiles otherwise
# (128 x 128 3% behind the best on 2 heads, 29% on 8: the operands no longer fit the cache).
TUNE_N_LONG = 2048
TRIALS = 3  # timed rounds over every candidate, after one untimed run of each
FINALISTS = 4  # the fastest after those rounds, timed FINAL_TRIALS more rounds at the call's
FINAL_TRIALS = 5  # length class (after an untimed run there); the fastest of them is chosen
# "Fastest": the smallest median over the rounds of a trial's time over the round's fastest
# time. These machines change speed by 10-30% from one second to the next; each round runs
# every trial back to back, so a slow spell mostly hits a round, not a trial. Ranked by
# their fastest single run of 3 (as before), the full softmax backward at N >= 2048 kept
# 64 x 128 on an AVX2 EPYC, which ran 4-11% slower there than 128 x 256 and 256 x 256 (same
# process, alternating, medians of 5-9 rounds).
RANKING = "paired medians"  # in the key of a stored choice: choices ranked otherwise are
# measured again
KINDS = ("forward", "backward")
VARIABLE = "ATTNDSL_CPU_TILES"
KEYS_VARIABLE = "ATTNDSL_CPU_KEYS"
LAYOUTS = ("transposed", "stored", "packed")  # the key operands' layouts (tiles.json spells
TRANSPOSED, STORED, PACKED = range(3)  # them so); the kernels read the index (sz[12])
Trial = tuple[tuple[int, int], int]  # a tile, and the key layout
assert numba_cpu.STRIP % PANEL == 0  # a key tile fitted to a band starts on a panel (packed)

_lock = threading.RLock()  # the backward's measurement may choose the forward's tile
_chosen: dict[str, tuple[int, int]] = {}
_layouts: dict[str, int] = {}  # tune_key + " | keys": the key layout
_machine: str | None = None


def choose(kernel: CpuKernel, call: Call, kind: str) -> tuple[int, int]:
    """The tile of the `kind` ("forward" or "backward") kernel for this call."""
    fixed = configured()
    if fixed is not None:
        return fixed[KINDS.index(kind)]
    s = call.sizes
    if kernel.plan.linear_path or s["n_q"] * s["n_k"] < TUNE_PAIRS:
        return DEFAULT
    key = tune_key(kernel, call, kind)
    with _lock:  # one measurement per key, even with threads calling at once
        if key not in _chosen:
            _chosen[key] = _stored(key) or _measured(kernel, call, kind, key)
        return _chosen[key]


def _measured(kernel: CpuKernel, call: Call, kind: str, key: str) -> tuple[int, int]:
    """The measured tile, stored; DEFAULT for this process, with a warning, if the measurement
    failed (it runs on demo arrays, not the caller's: the call itself must not fail for it)."""
    try:
        tile = measure(kernel, call, kind)
    except Exception as err:  # noqa: BLE001 -- an optimization must not break the call
        warnings.warn(f"attndsl could not measure the cpu tile of '{kernel.spec.name}' "
                      f"({type(err).__name__}: {err}); it runs {DEFAULT[0]}x{DEFAULT[1]} in "
                      f"this process (set {VARIABLE} to choose one)", stacklevel=5)
        return DEFAULT
    return _store(key, tile)


def choose_keys(kernel: CpuKernel, call: Call, kind: str) -> int:
    """The layout of the `kind` kernel's GEMM key operands for this call (an index into
    LAYOUTS): transposed by the launcher, read as stored, or packed by it in panels."""
    fixed = configured_keys()
    if fixed is not None:
        return fixed
    s = call.sizes
    if kernel.plan.linear_path or s["n_q"] * s["n_k"] < TUNE_PAIRS:
        return TRANSPOSED
    tile = choose(kernel, call, kind)
    key = tune_key(kernel, call, kind) + " | keys"
    with _lock:
        if key not in _layouts:
            layout = _read().get(key)
            if layout in LAYOUTS and (layout != "packed" or panels_fit()):
                _layouts[key] = LAYOUTS.index(layout)
            else:
                _layouts[key] = _measured_keys(kernel, call, kind, tile, key)
        return _layouts[key]


def _measured_keys(kernel: CpuKernel, call: Call, kind: str, tile: tuple[int, int],
                   key: str) -> int:
    """The layout that ran fastest with `tile`, stored; transposed for this process, with a
    warning, if the measurement failed."""
    try:
        layout = measure_keys(kernel, call, kind, tile)
    except Exception as err:  # noqa: BLE001 -- an optimization must not break the call
        warnings.warn(f"attndsl could not measure the cpu key layout of '{kernel.spec.name}' "
                      f"({type(err).__name__}: {err}); it transposes the keys in this process "
                      f"(set {KEYS_VARIABLE} to choose)", stacklevel=5)
        return TRANSPOSED
    _store(key, LAYOUTS[layout])
    return layout


def measure_keys(kernel: CpuKernel, call: Call, kind: str, tile: tuple[int, int]) -> int:
    """The fastest key layout with `tile`: each runs FINAL_TRIALS rounds at
    `final_length(call)` after an untimed run (packed only where the tiles fit panels)."""
    layouts = range(len(LAYOUTS)) if panels_fit() else (TRANSPOSED, STORED)
    trials = tuple((tile, layout) for layout in layouts)
    rounds = _rounds(_runner(kernel, call, kind, final_length(call)), trials, FINAL_TRIALS,
                     warm=True)
    return _ranked(trials, rounds)[0][1]


def panels_fit() -> bool:
    """Whether every key tile starts on a panel of packed keys: whether every tile the kernels
    may run (ATTNDSL_CPU_TILES's, else the candidates and DEFAULT) has a BK that is a multiple
    of PANEL. Both kinds' tiles count: a backward may run the forward again, in the
    backward's key layout with the forward's tile."""
    fixed = configured()
    return all(bk % PANEL == 0 for _, bk in (fixed if fixed is not None
                                            else (*CANDIDATES, DEFAULT)))


def configured_keys() -> int | None:
    """The layout ATTNDSL_CPU_KEYS fixes (an index into LAYOUTS), or None for `auto` (the
    measurement chooses)."""
    text = os.environ.get(KEYS_VARIABLE, "auto").strip().lower()
    if text in ("", "auto"):
        return None
    if text not in LAYOUTS:
        raise ValueError(f"{KEYS_VARIABLE}={os.environ[KEYS_VARIABLE]!r}: expected 'auto', "
                         "'transposed', 'stored' or 'packed'")
    if text == "packed" and not panels_fit():
        raise ValueError(f"{KEYS_VARIABLE}=packed reads the keys {PANEL} at a time: it needs "
                         f"key tiles (BK) that are multiples of {PANEL}, not "
                         f"{VARIABLE}={os.environ.get(VARIABLE, 'auto')!r}")
    return LAYOUTS.index(text)


def configured() -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The (forward, backward) tiles ATTNDSL_CPU_TILES fixes, or None for `auto`."""
    text = os.environ.get(VARIABLE, "auto").strip().lower()
    if text in ("", "auto"):
        return None
    if text == "off":
        return DEFAULT, DEFAULT
    parts = [p.strip() for p in text.split(",")]
    try:
        tiles = [tuple(int(n) for n in p.split("x")) for p in parts]
        if len(tiles) not in (1, 2) or any(len(t) != 2 or min(t) < 1 for t in tiles):
            raise ValueError
    except ValueError:
        raise ValueError(f"{VARIABLE}={os.environ[VARIABLE]!r}: expected 'auto', 'off', "
                         "BQxBK (e.g. 128x128) or a forward and a backward tile "
                         "(64x128,128x128)") from None
    if any(t[1] > numba_cpu.BK_MAX for t in tiles):
        raise ValueError(f"{VARIABLE}={os.environ[VARIABLE]!r}: a key tile (BK) is at most "
                         f"{numba_cpu.BK_MAX}, the row stride of the kernels' tile buffers")
    forward, backward = tiles[0], tiles[-1]
    return (forward[0], forward[1]), (backward[0], backward[1])


def machine() -> str:
    """The CPU model and LLVM's name for its ISA: a tile measured on one is not another's."""
    global _machine
    if _machine is None:
        import llvmlite.binding as llvm

        model = "unknown CPU"
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                model = next((line.split(":", 1)[1].strip() for line in f
                              if line.startswith("model name")), model)
        except OSError:
            pass
        _machine = f"{model} ({llvm.get_host_cpu_name()})"
    return _machine


@functools.lru_cache(maxsize=256)
def _digest(source: str) -> str:
    """A kernel source's sha256, once per source (str caches its own hash for the lookup)."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def tune_key(kernel: CpuKernel, call: Call, kind: str) -> str:
    s = call.sizes
    source = _digest(kernel.source)
    return (f"{machine()} | {kernel.spec.name} {source} | {call.dtype.name} {kind} | "
            f"heads {s['heads']}/{s['kv_heads']} d {s['d']} dv {s['dv']} | "
            f"threads {numba.get_num_threads()} | of {_measured_as()} | "
            f"n {final_length(call)}")


def _measured_as() -> str:
    """The candidates, the layout they are ranked in and how (RANKING): a choice stored from
    other ones (or ranked otherwise) is measured again."""
    ranked = "" if ranking_layout() == TRANSPOSED else f" ranked {LAYOUTS[ranking_layout()]}"
    return _digest(repr(CANDIDATES) + ranked + f" by {RANKING}")[:8]


def final_length(call: Call) -> int:
    """The length of the measurement's final rounds: TUNE_N_LONG for a call with that many
    pairs per head, else TUNE_N."""
    s = call.sizes
    return TUNE_N_LONG if s["n_q"] * s["n_k"] >= TUNE_N_LONG * TUNE_N_LONG else TUNE_N


def ranking_layout() -> int:
    """The key layout the tiles are measured in: packed where every tile fits panels (the
    layout that ran fastest on the machines measured, and the only one whose partly masked
    tiles skip their masked products, micro_gemm_band: ranked in another, a big tile's masked
    share is weighed as if computed), else transposed."""
    return PACKED if panels_fit() else TRANSPOSED


def measure(kernel: CpuKernel, call: Call, kind: str) -> tuple[int, int]:
    """The fastest candidate on problems shaped like `call`: all of them at TUNE_N, then the
    FINALISTS at `final_length(call)`, with the keys in `ranking_layout()`."""
    trials = tuple((tile, ranking_layout()) for tile in CANDIDATES)
    run = _runner(kernel, call, kind, TUNE_N)
    rounds = _rounds(run, trials, TRIALS, warm=True)
    finalists = _ranked(trials, rounds)[:FINALISTS]
    n = final_length(call)
    if n != TUNE_N:  # another problem: the first rounds' times do not count
        run = _runner(kernel, call, kind, n)
        rounds = []
    rounds += _rounds(run, finalists, FINAL_TRIALS, warm=n != TUNE_N)
    return _ranked(finalists, rounds)[0][0]


def _rounds(run: Callable[[tuple[int, int], int], None], trials: tuple[Trial, ...],
            count: int, warm: bool) -> list[dict[Trial, float]]:
    """`count` timed rounds of every trial, after an untimed run of each if `warm` (compiled,
    memory touched): each round's seconds per trial."""
    for trial in trials if warm else ():
        run(*trial)
    rounds = []
    for _ in range(count):  # round by round, so a slow spell of the machine hits them all
        seconds = {}
        for trial in trials:
            start = time.perf_counter()
            run(*trial)
            seconds[trial] = time.perf_counter() - start
        rounds.append(seconds)
    return rounds


def _ranked(trials: tuple[Trial, ...], rounds: list[dict[Trial, float]]) -> tuple[Trial, ...]:
    """`trials`, fastest first: by the median over the rounds that ran them all of each one's
    time over the round's fastest (see RANKING)."""
    full = [r for r in rounds if all(t in r for t in trials)]

    def score(trial: Trial) -> float:
        return statistics.median(r[trial] / max(min(r[t] for t in trials), 1e-12)
                                 for r in full)

    return tuple(sorted(trials, key=score))


def _runner(kernel: CpuKernel, call: Call, kind: str, n: int
            ) -> Callable[[tuple[int, int], int], None]:
    """Runs the `kind` kernel with a given tile and key layout on an n x n
    problem with `call`'s heads and widths (demo arrays: the caller's are not touched)."""
    from ..demo import demo_inputs

    s = call.sizes
    case = demo_inputs(kernel.spec, n, n, s["d"], s["dv"], heads=(s["heads"], s["kv_heads"]))
    q, k, v = (a.astype(call.dtype) for a in (case.q, case.k, case.v))
    extra = {name: a.astype(call.dtype) if a.dtype.kind == "f" else a
             for name, a in case.extra.items()}
    trial = kernel.validate(q, k, v, extra, 0, 0)
    dout = np.ones((1, s["heads"], n, s["dv"]), call.dtype)
    if kind == "forward":
        def run(tile: tuple[int, int], keys: int) -> None:
            kernel._run_forward(trial, tile=tile, keys=keys)
    else:
        out, lse, _ = kernel._run_forward(trial, tile=DEFAULT, keys=TRANSPOSED)
        softmax = kernel.spec.normalize.kind is NormKind.SOFTMAX

        def run(tile: tuple[int, int], keys: int) -> None:
            kernel._backward_impl(trial, dout, out, lse if softmax else None, None,
                                  tile=tile, keys=keys)
    return run


def _path() -> Path:
    from .cache import cache_dir

    return cache_dir() / "tiles.json"


def _read() -> dict[str, Any]:
    try:
        data = json.loads(_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stored(key: str) -> tuple[int, int] | None:
    tile = _read().get(key)
    if (isinstance(tile, list) and len(tile) == 2 and all(isinstance(n, int) and n > 0
                                                          for n in tile)):
        return tile[0], tile[1]
    return None


def _store(key: str, tile: Any) -> Any:
    """Adds the choice (a tile, or a layout's name) to tiles.json (a temp file renamed over
    it: readers never see half a file; two processes measuring at once both store a valid
    choice)."""
    path = _path()
    data = _read()
    data[key] = list(tile) if isinstance(tile, tuple) else tile
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".tiles-{uuid.uuid4().hex}.json")
        temp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temp, path)
    except OSError as err:
        warnings.warn(f"the measured cpu choice could not be kept in {path} ({err.strerror}); "
                      "it is measured again in the next process", stacklevel=4)
    return tile


def forget() -> None:
    """Drop this process's choices (tests; tiles.json is left as it is)."""
    with _lock:
        _chosen.clear()
        _layouts.clear()
