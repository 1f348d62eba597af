"""attndsl's generated CUDA kernels against torch SDPA and flex_attention, on a GPU.

    python benchmarks/bench_cuda.py [--n 1024 4096] [--out benchmarks/results/cuda.md]

Forward and forward+backward, float32, B=1, heads=8, d=dv=64, CUDA events, medians of
--repeat runs after --warmup; inputs are torch CUDA tensors passed to attndsl through
__cuda_array_interface__ (device in -> device out, no copies for specs that read only q and k).
Skips cleanly (exit 0, a message) when there is no GPU, no numba-cuda or no torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPECS = ("scaled_dot_product", "causal", "alibi", "sliding_window", "softcap", "bahdanau")


def _skip(reason: str) -> None:
    print(f"bench_cuda: skipped: {reason}")
    sys.exit(0)


def _environment() -> tuple[Any, Any]:
    try:
        import torch
    except ImportError:
        _skip("torch is not installed")
    from attndsl.codegen import cuda_toolchain as tc

    if tc.simulator_enabled():
        _skip("NUMBA_ENABLE_CUDASIM=1: timings under the simulator mean nothing")
    if not tc.numba_cuda_installed():
        _skip(tc.INSTALL_HINT)
    if not torch.cuda.is_available():
        _skip("no CUDA GPU available")
    cuda = tc.require_cuda()
    if not cuda.is_available():
        _skip("numba-cuda sees no GPU")
    return torch, cuda


def _time(torch: Any, fn: Callable[[], Any], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _torch_impls(torch: Any, name: str, n: int, H: int) -> dict[str, Callable[..., Any]]:
    """torch SDPA / flex_attention equivalents of a spec, where one exists."""
    import math

    import torch.nn.functional as F

    impls: dict[str, Callable[..., Any]] = {}
    if name in ("scaled_dot_product", "causal"):
        causal = name == "causal"
        impls["torch sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return impls
    flex = torch.compile(flex_attention)
    mask_mod = None
    score_mod = None
    if name == "causal":
        def mask_mod(b, h, i, j):
            return j <= i
    elif name == "sliding_window":
        def mask_mod(b, h, i, j):
            return (j <= i) & (i - j < 128)
    elif name == "alibi":
        slope = torch.linspace(0.5, 0.01, H, device="cuda")

        def score_mod(s, b, h, i, j):
            return s + slope[h] * (j - i)

        def mask_mod(b, h, i, j):
            return j <= i
    elif name == "softcap":
        def score_mod(s, b, h, i, j):
            return 50 * torch.tanh(s / 50)
    elif name != "scaled_dot_product":
        return impls
    block = create_block_mask(mask_mod, 1, 1, n, n) if mask_mod is not None else None
    impls["flex_attention"] = lambda q, k, v: flex(q, k, v, score_mod=score_mod,
                                                   block_mask=block, scale=1 / math.sqrt(64))
    return impls


def run(ns: list[int], warmup: int, repeat: int) -> list[str]:
    torch, _ = _environment()
    import attndsl
    from attndsl.runtime.cuda_kernel import compile_kernel

    B, H, D = 1, 8, 64
    lines = ["| spec | n | impl | fwd ms | fwd+bwd ms |", "| --- | --- | --- | --- | --- |"]
    for name in SPECS:
        spec = attndsl.load(ROOT / "examples" / f"{name}.attn")
        kernel = compile_kernel(spec)
        kv = spec.kv_heads or H
        for n in ns:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, H, n, D, device="cuda", generator=gen)
            k = torch.randn(B, kv, n, D, device="cuda", generator=gen)
            v = torch.randn(B, kv, n, D, device="cuda", generator=gen)
            dout = torch.randn(B, H, n, D, device="cuda", generator=gen)
            extra: dict[str, Any] = {}
            for p in spec.params:
                dims = [{"heads": H, "d": D, "r": D}.get(x, x) for x in p.dims]
                extra[p.name] = (0.1 * torch.randn(*dims)).numpy() if dims else 1.0

            def fwd() -> Any:
                return kernel.forward(q, k, v, return_lse=True, **extra)

            def fwd_bwd() -> Any:
                out, lse = fwd()
                return kernel.backward(q, k, v, dout, out=out, lse=lse, **extra)

            t_f = _time(torch, fwd, warmup, repeat)
            t_fb = _time(torch, fwd_bwd, warmup, repeat)
            lines.append(f"| {name} | {n} | attndsl | {t_f:.3f} | {t_fb:.3f} |")
            for label, impl in _torch_impls(torch, name, n, H).items():
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
                if kv != H:
                    kg_, vg_ = (x.repeat_interleave(H // kv, dim=1) for x in (kg, vg))
                else:
                    kg_, vg_ = kg, vg

                def t_fwd() -> Any:
                    with torch.no_grad():
                        return impl(qg, kg_, vg_)

                def t_fwd_bwd() -> Any:
                    out = impl(qg, kg_, vg_)
                    return torch.autograd.grad(out, (qg, kg, vg), dout)

                lines.append(f"| {name} | {n} | {label} | {_time(torch, t_fwd, warmup, repeat):.3f}"
                             f" | {_time(torch, t_fwd_bwd, warmup, repeat):.3f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = ap.parse_args()
    lines = run(args.n, args.warmup, args.repeat)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# attndsl CUDA kernels vs torch (B=1, heads=8, d=64, float32)\n\n"
                            + text)


if __name__ == "__main__":
    main()
