"""The cost of going through attndsl.torch: the torch op vs the Kernel called on NumPy arrays.

    python benchmarks/bench_torch_op.py [--spec examples/causal.attn] [--n 256,2048] [--reps 21]

Both sides run the same compiled `cpu` kernel (float32, B=1, H=8, D=64): "direct" calls
`Kernel.forward(return_lse=True)` and `Kernel.backward(out=, lse=)` on NumPy arrays; "torch"
calls `attndsl.torch.attention(..., return_lse=True)` on tensors that require grad and
`torch.autograd.backward(out, dout)` (autograd adds a zero dlse, which the op passes on).
Interleaved repetitions, medians. It also shows that no array is copied: the kernel receives
q's own memory, and out, lse and the gradients are the kernel's own arrays. Writes
benchmarks/results/torch_op.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numba
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attndsl
import attndsl.torch as at
from attndsl.torch import ops
from benchmarks.machine import lscpu_model

B, H, D = 1, 8, 64


def inputs(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in
            (("q", (B, H, n, D)), ("k", (B, H, n, D)), ("v", (B, H, n, D)),
             ("dout", (B, H, n, D)))}


class Direct:
    """The Kernel on NumPy views of the same tensors."""

    def __init__(self, kernel: attndsl.Kernel, t: dict[str, torch.Tensor]) -> None:
        self.kernel = kernel
        self.a = {n: x.numpy() for n, x in t.items()}

    def forward(self) -> Any:
        a = self.a
        return self.kernel.forward(a["q"], a["k"], a["v"], return_lse=True)

    def forward_backward(self) -> Any:
        a = self.a
        out, lse = self.forward()
        return self.kernel.backward(a["q"], a["k"], a["v"], a["dout"], out=out, lse=lse)


class Torch:
    """attndsl.torch.attention with autograd."""

    def __init__(self, spec: Path, t: dict[str, torch.Tensor]) -> None:
        self.spec = spec
        self.t = {n: x.clone().requires_grad_(n != "dout") for n, x in t.items()}

    def forward(self) -> Any:
        t = self.t
        with torch.no_grad():
            return at.attention(self.spec, t["q"], t["k"], t["v"], return_lse=True)

    def forward_backward(self) -> Any:
        t = self.t
        for name in "qkv":
            t[name].grad = None
        out, _ = at.attention(self.spec, t["q"], t["k"], t["v"], return_lse=True)
        torch.autograd.backward([out], [t["dout"]])
        return t["q"].grad


class KernelClock:
    """Seconds spent inside a Kernel's forward and backward, per call of a timed function: the
    rest of a call's time is what surrounds the kernels (for the op: its own code)."""

    def __init__(self, *kernels: attndsl.Kernel) -> None:
        self.spent = 0.0
        self.kernels = kernels
        for kernel in kernels:
            for name in ("forward", "backward"):
                setattr(kernel, name, self._clocked(getattr(kernel, name)))

    def close(self) -> None:
        """The kernels' own methods again."""
        for kernel in self.kernels:
            for name in ("forward", "backward"):
                vars(kernel).pop(name, None)

    def _clocked(self, method: Any) -> Any:
        def clocked(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kw)
            finally:
                self.spent += time.perf_counter() - start
        return clocked

    def timed(self, f: Any) -> tuple[float, float]:
        """(seconds of the whole call, seconds outside the kernels)."""
        self.spent = 0.0
        start = time.perf_counter()
        f()
        whole = time.perf_counter() - start
        return whole, whole - self.spent


def measure(spec: Path, n: int, reps: int) -> dict[str, tuple[float, ...]]:
    """{mode: (median direct s, median torch s, median of the paired differences s, median
    seconds outside the kernels: direct, torch)}."""
    t = inputs(n)
    kernel = attndsl.compile(spec, target="cpu")
    direct, wrapped = Direct(kernel, t), Torch(spec, t)
    for f in (direct.forward_backward, wrapped.forward_backward):  # compile, warm caches
        f()
        f()
    op_kernel = ops.ENTRIES[ops.spec_handle(spec)].kernel(torch.device("cpu"))
    clock = KernelClock(*{id(k): k for k in (kernel, op_kernel)}.values())
    try:
        return _pairs(clock, direct, wrapped, reps)
    finally:
        clock.close()


def _pairs(clock: KernelClock, direct: Direct, wrapped: Torch, reps: int
           ) -> dict[str, tuple[float, ...]]:
    result = {}
    for mode, pair in (("fwd", (direct.forward, wrapped.forward)),
                       ("fwd+bwd", (direct.forward_backward, wrapped.forward_backward))):
        times: list[tuple[tuple[float, float], tuple[float, float]]] = []
        for rep in range(reps):
            # interleaved pairs, each side first in turn: a drift in machine load, or the heap
            # state one side leaves the other, hits both sides alike
            if rep % 2:
                w = clock.timed(pair[1])
                d = clock.timed(pair[0])
            else:
                d = clock.timed(pair[0])
                w = clock.timed(pair[1])
            times.append((d, w))
        result[mode] = (statistics.median(d[0] for d, _ in times),
                        statistics.median(w[0] for _, w in times),
                        statistics.median(w[0] - d[0] for d, w in times),
                        statistics.median(d[1] for d, _ in times),
                        statistics.median(w[1] for _, w in times))
    return result


def copies(spec: Path, n: int = 256) -> list[str]:
    """Pointer checks: what the kernel reads and returns is the tensors' memory."""
    t = Torch(spec, inputs(n)).t
    kernel = ops.ENTRIES[ops.spec_handle(spec)].kernel(torch.device("cpu"))
    seen: dict[str, Any] = {}
    forward, backward = kernel.forward, kernel.backward

    def spy_forward(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        seen["q in"] = q
        seen["out"], seen["lse"] = forward(q, k, v, **kw)
        return seen["out"], seen["lse"]

    def spy_backward(*args: Any, **kw: Any) -> Any:
        seen["grads"] = backward(*args, **kw)
        return seen["grads"]

    kernel.forward, kernel.backward = spy_forward, spy_backward  # type: ignore[method-assign]
    try:
        out, lse = at.attention(spec, t["q"], t["k"], t["v"], return_lse=True)
        torch.autograd.backward([out], [t["dout"]])
    finally:
        del kernel.forward, kernel.backward
    g = seen["grads"]
    checks = [
        ("q.numpy() is q's memory", t["q"].detach().numpy().ctypes.data == t["q"].data_ptr()),
        ("the kernel read q in place", seen["q in"].ctypes.data == t["q"].data_ptr()),
        ("out is the kernel's out array", out.data_ptr() == seen["out"].ctypes.data),
        ("lse is the kernel's lse array", lse.data_ptr() == seen["lse"].ctypes.data),
        *((f"{x}.grad is the kernel's gradient array", t[x].grad.data_ptr() == g[x].ctypes.data)
          for x in "qkv"),
    ]
    return [f"- {what}: {'yes' if ok else 'NO'}" for what, ok in checks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "causal.attn"))
    parser.add_argument("--n", default="256,2048")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "torch_op.md"))
    args = parser.parse_args(argv)
    spec = Path(args.spec)
    torch.set_num_threads(numba.get_num_threads())
    load = os.getloadavg()
    rows = []
    sizes = [(int(x), args.reps) for x in args.n.split(",")]
    for n, reps in [(16, 10 * args.reps), *sizes]:  # N=16: the fixed cost per call
        m = measure(spec, n, reps)
        for mode, (d, w, diff, d_out, w_out) in m.items():
            own = w_out - d_out
            rows.append(f"| {n} | {mode} | {reps} | {d * 1e3:.3f} | {w * 1e3:.3f} | "
                        f"{diff * 1e3:+.3f} | {100 * diff / d:+.1f}% | {own * 1e3:+.3f} | "
                        f"{100 * own / d:+.1f}% |")
            print(rows[-1], flush=True)
    checks = copies(spec)
    end = os.getloadavg()
    rel = spec.resolve().relative_to(ROOT) if spec.resolve().is_relative_to(ROOT) else spec
    machine = (f"Generated by `benchmarks/bench_torch_op.py` on {datetime.now():%Y-%m-%d %H:%M}. "
               f"Machine: {os.cpu_count()} cores ({lscpu_model()}); torch {torch.__version__}, "
               f"numba {numba.__version__}, numba threads {numba.get_num_threads()}, torch "
               f"threads {torch.get_num_threads()}. Load average at start {load[0]:.2f}, at end "
               f"{end[0]:.2f}.")
    method = (f"Spec `{rel}`, float32, B={B}, H={H}, D={D}; medians of interleaved (direct, "
              "torch) pairs of calls after two warm-up calls; the overhead is the median of the "
              "pairs' differences (N=16 shows the fixed cost per call); each pair runs its sides in "
              "turn first. **op's own**: the median time outside the kernel calls, torch's "
              "minus direct's (the kernels' calls are clocked inside both): what the op's code "
              "adds, without the kernels' own run-to-run spread. **direct**: "
              "`Kernel.forward(return_lse=True)` (+ `Kernel.backward(out=, lse=)`) on NumPy "
              "arrays. **torch**: `attndsl.torch.attention(return_lse=True)` under `no_grad` "
              "(fwd), or on tensors requiring grad followed by `torch.autograd.backward(out, "
              "dout)` (fwd+bwd; autograd passes a zero dlse, which the op hands on). Both run the "
              "same compiled `cpu` kernel.")
    text = "\n".join([
        "# attndsl.torch op overhead", "", machine, "", method, "",
        ("| N | mode | pairs | direct ms | torch ms | overhead ms | overhead | op's own ms | "
         "op's own |"),
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "No copies (pointer checks, N=256, float32 contiguous tensors):",
        "",
        *checks,
        "",
    ])
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
