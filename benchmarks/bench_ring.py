"""Ring attention on loopback: per-rank memory, bytes sent per step, and overlap (issue 11).

    python benchmarks/bench_ring.py                     # N = 32768 over 4 ranks, causal
    python benchmarks/bench_ring.py --n 8192 --world 2 --spec examples/alibi.attn

Every measurement runs in fresh spawned processes (gloo on 127.0.0.1, float32, the numba `cpu`
target; kernels come from the on-disk cache after a warm-up on a short sequence):

- memory: the peak resident set during one forward + backward minus the resident set just
  before it, sampled every 2 ms by a thread (/proc/self/statm), for one process on the whole
  sequence and for each rank of the ring on its shard; the second of two identical calls, so
  what the first allocates for good (BLAS buffers, loaded kernels) is not counted, and the
  inputs (q, k, v, dout) exist before it;
- bytes sent per step: counted on the tensors each ring hop sends (forward and backward);
- overlap: the ring forward as shipped (the next shard's transfer posted before the step's
  kernels), the same forward with transfers replaced by local buffers (compute alone), and the
  P - 1 hops alone (communication alone); hidden = (compute + communication - ring) /
  communication, medians of --repeats runs.

Writes benchmarks/results/ring.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Self

import torch
import torch.distributed as dist
from machine import lscpu_model  # benchmarks/machine.py, beside this script

import attndsl.torch as at
from attndsl.torch import distributed as ring_mod
from attndsl.torch.distributed import shard

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The peak resident set above the one at entry, sampled by a thread."""

    def __enter__(self) -> Self:
        self.base = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def grown(self) -> int:
        return self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _inputs(args: argparse.Namespace, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (1, args.heads, n, args.d)
    x = {name: torch.randn(*shape, generator=g) for name in ("q", "k", "v", "dout")}
    return x


def _extra(args: argparse.Namespace) -> dict[str, Any]:
    return {"slope": torch.full((args.heads,), 0.1)} if "alibi" in args.spec else {}


def _single(args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(args.threads)
    x = _inputs(args, args.n)
    for _ in range(2):  # the first call allocates what stays (BLAS buffers, kernel loading)
        q, k, v = (x[n].detach().requires_grad_() for n in ("q", "k", "v"))
        with PeakRss() as mem:
            start = time.perf_counter()
            out = at.attention(args.spec, q, k, v, **_extra(args))
            (out * x["dout"]).sum().backward()
            seconds = time.perf_counter() - start
        del q, k, v, out
    results.put(("single", 0, {"grown": mem.grown, "seconds": seconds}))


def _ring_call(args: argparse.Namespace, local: dict[str, torch.Tensor], rank: int,
               world: int, backward: bool) -> None:
    """One ring call on this rank's shards (made before any measurement, like the whole
    inputs of the one-process run)."""
    q, k, v = (local[n].detach().requires_grad_(backward) for n in ("q", "k", "v"))
    out = at.distributed.ring_attention(args.spec, q, k, v, layout=args.layout, **_extra(args))
    if backward:
        (out * local["dout"]).sum().backward()


class _LocalTransfer:
    """A stand-in for one ring hop that moves nothing: buffers of the right shapes at once,
    holding this rank's own data where the shapes agree (so the kernels see data like the
    ring's, not zeros)."""

    def __init__(self, plan: Any, tensors: list[torch.Tensor], shapes: list[Any]) -> None:
        self.received = [t.clone() if tuple(t.shape) == tuple(s) else torch.zeros(s, dtype=t.dtype)
                         for t, s in zip(tensors, shapes)]

    def wait(self) -> list[torch.Tensor]:
        return self.received


def _counting(sent: list[int]) -> type:
    real = ring_mod._Transfer

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, plan: Any, tensors: list[torch.Tensor], shapes: list[Any]) -> None:
            sent.append(sum(t.numel() * t.element_size() for t in tensors))
            super().__init__(plan, tensors, shapes)

    return Counting


def _waiting(blocked: list[float]) -> type:
    real = ring_mod._Transfer

    class Waiting(real):  # type: ignore[misc, valid-type]
        def wait(self) -> list[torch.Tensor]:
            start = time.perf_counter()
            try:
                return super().wait()
            finally:
                blocked[-1] += time.perf_counter() - start

    return Waiting


def _timed(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _comm_alone(args: argparse.Namespace, local: dict[str, torch.Tensor], rank: int,
                world: int) -> None:
    """The forward's P - 1 hops of this rank's k and v shard, with no compute."""
    k, v = local["k"], local["v"]
    plan = ring_mod._Plan(None, {}, None, rank, world, [], 0, [], 0)  # only peers are read
    tensors = [k, v]
    for _ in range(world - 1):
        tensors = ring_mod._Transfer(plan, tensors, [t.shape for t in tensors]).wait()


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    x = _inputs(args, args.n)
    x = {n: shard(t, rank, world, args.layout) for n, t in x.items()}  # this rank's shards
    _ring_call(args, x, rank, world, backward=True)  # what stays allocated, allocated once
    dist.barrier()
    sent: list[int] = []
    ring_mod._Transfer = _counting(sent)
    with PeakRss() as mem:
        start = time.perf_counter()
        _ring_call(args, x, rank, world, backward=True)
        seconds = time.perf_counter() - start
    forward_hops = world - 1
    report = {"grown": mem.grown, "seconds": seconds, "forward_step_bytes": sent[0],
              "backward_step_bytes": sent[forward_hops:forward_hops + 2]}
    real = ring_mod._Transfer.__mro__[1]
    ring_mod._Transfer = real
    blocked: list[float] = []
    ring_mod._Transfer = _waiting(blocked)

    def ring_forward() -> None:
        blocked.append(0.0)
        _ring_call(args, x, rank, world, False)

    report["ring"] = _timed(ring_forward, args.repeats)
    report["blocked"] = statistics.median(blocked)
    ring_mod._Transfer = _LocalTransfer
    report["compute"] = _timed(lambda: _ring_call(args, x, rank, world, False), args.repeats)
    ring_mod._Transfer = real
    report["comm"] = _timed(lambda: _comm_alone(args, x, rank, world), args.repeats)
    results.put(("rank", rank, report))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(nprocs: int, args: argparse.Namespace) -> list[Any]:
    """One process on the whole sequence (nprocs = 0), or a ring of nprocs ranks."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    if nprocs == 0:
        procs = [ctx.Process(target=_single, args=(args, results))]
    else:
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, nprocs, port, args, results))
                 for r in range(nprocs)]
    for p in procs:
        p.start()
    got = [results.get(timeout=args.timeout) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return sorted(got, key=lambda g: g[1])


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="examples/causal.attn")
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag"))
    parser.add_argument("--threads", type=int, default=1, help="torch/numba threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ring.md"))
    args = parser.parse_args()
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    # the cpu target's pool keeps freed buffers warm for the next call, so the second call's
    # growth would leave out whatever the first left pooled: measure working memory without it
    os.environ.setdefault("ATTNDSL_POOL_MIB", "0")
    # glibc raises its mmap threshold to the largest block freed (up to 32 MiB) and then keeps
    # such blocks in its heap, so a second call could reuse what the first freed (and the
    # growth depend on the block sizes): a fixed threshold maps every large array afresh
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))

    single = _run(0, args)[0][2]
    ranks = [r[2] for r in _run(args.world, args)]
    tensor = args.heads * args.n * args.d * 4
    command = (f"`python benchmarks/bench_ring.py --n {args.n} --world {args.world} --spec "
               f"{args.spec} --layout {args.layout}`: B = 1, heads = kv_heads = {args.heads}, "
               f"d = dv = {args.d}, float32, numba `cpu` target, gloo on 127.0.0.1, "
               f"{args.threads} thread(s) per process.")
    machine = (f"Machine: {lscpu_model()}, {os.cpu_count()} logical CPUs (shared with other "
               f"jobs: load average {os.getloadavg()[0]:.1f} at the end), torch "
               f"{torch.__version__}.")
    memory = (f"One [1, {args.heads}, {args.n}, {args.d}] float32 tensor is {_mib(tensor)} MiB. "
              "Growth = peak resident set during the second of two identical forward + "
              "backward calls minus the resident set before it (inputs already allocated), "
              f"with the cpu target's buffer pool at ATTNDSL_POOL_MIB = "
              f"{os.environ['ATTNDSL_POOL_MIB']} (0: off, so pooled buffers count) and glibc's "
              f"MALLOC_MMAP_THRESHOLD_ = {os.environ['MALLOC_MMAP_THRESHOLD_']} (every larger "
              "array mapped afresh, none kept from the first call).")
    lines = ["# Ring attention on loopback (benchmarks/bench_ring.py)", "", command, machine, "",
             "## Memory (forward + backward)", "", memory, "",
             "| process | positions | growth (MiB) | wall (s) |", "| --- | --- | --- | --- |",
             f"| one process | {args.n} | {_mib(single['grown'])} | {single['seconds']:.2f} |"]
    sizes = [sum(s) for s in ring_mod.chunk_sizes(args.n, args.world, args.layout)]
    for r, rep in enumerate(ranks):
        lines.append(f"| rank {r} of {args.world} | {sizes[r]} | {_mib(rep['grown'])} | "
                     f"{rep['seconds']:.2f} |")
    mean = statistics.mean(rep["grown"] for rep in ranks)
    ratio = (f"Mean rank growth / one process: {mean / max(single['grown'], 1):.3f} "
             f"(1/P = {1 / args.world:.3f}).")
    forward = (f"- forward: {ranks[0]['forward_step_bytes']:,} bytes per hop (k and v of rank "
               f"0's {sizes[0]}-position shard)")
    backward = (f"- backward: {', '.join(f'{b:,}' for b in ranks[0]['backward_step_bytes'])} "
                "bytes per step (the next k/v shard, then the visited shard's dk/dv going on)")
    lines += ["", ratio, "", "## Bytes sent per step (rank 0)", "", forward, backward, "",
              "## Overlap (forward, medians)", "",
              ("| rank | ring (s) | compute alone (s) | communication alone (s) | hidden | "
              "blocked in wait (s) | hidden, by the wait |"),
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r, rep in enumerate(ranks):
        hidden = (rep["compute"] + rep["comm"] - rep["ring"]) / max(rep["comm"], 1e-9)
        by_wait = 1 - rep["blocked"] / max(rep["comm"], 1e-9)
        lines.append(f"| {r} | {rep['ring']:.3f} | {rep['compute']:.3f} | {rep['comm']:.3f} | "
                     f"{min(max(hidden, 0.0), 1.0):.0%} | {rep['blocked']:.3f} | "
                     f"{min(max(by_wait, 0.0), 1.0):.0%} |")
    note = ("hidden = (compute alone + communication alone - ring) / communication alone, "
            "clamped to [0, 1]: a difference of whole-forward times, so noise of a few percent "
            "of the compute swamps it when communication is small. Blocked in wait: the time "
            "the ring forward spent waiting for a posted hop to complete (transfer not yet "
            "done, or the neighbour not yet at that step); hidden, by the wait = 1 - blocked / "
            "communication alone, the share of the transfers' own time no rank waited for (a "
            "wait for a slower neighbour counts as exposed, so this errs low). With more "
            "processes than cores the ranks share CPUs, so loopback transfers compete with "
            "compute for them.")
    lines += ["", note]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
