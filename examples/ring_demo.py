"""Ring attention across processes: each rank holds a shard of one long sequence.

    torchrun --nproc-per-node 2 examples/ring_demo.py                    # gloo on CPU
    torchrun --nproc-per-node 2 examples/ring_demo.py --spec examples/document.attn
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 \
             --nproc-per-node 1 examples/ring_demo.py                    # two machines

Every rank builds the same whole sequence from one seed (a real model would hold only its own
shard), takes its zigzag shard, runs `ring_attention` forward and backward, and compares its
rows of out and the gradients with one process computing the whole sequence. docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

import attndsl.torch as at
from attndsl.torch.distributed import shard

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(HERE / "alibi.attn"))
    parser.add_argument("--length", type=int, default=1001, help="sequence length (any: uneven is fine)")
    parser.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and os.environ.get("LOCAL_RANK") is not None
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun's env:// variables
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same whole sequence on every rank
    B, H, KV, N, d = 1, 8, 2, args.length, 64
    q, k, v = (torch.randn(B, h, N, d, dtype=torch.float64, device=device)
               for h in (H, KV, KV))
    extra = {}
    if "alibi" in args.spec:
        extra["slope"] = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float64, device=device)
    if "document" in args.spec:
        extra["doc"] = torch.sort(torch.randint(0, 5, (B, N), device=device)).values
    dout = torch.randn(B, H, N, d, dtype=torch.float64, device=device)

    local = {name: shard(t, rank, world, args.layout, dim=2).requires_grad_()
             for name, t in (("q", q), ("k", k), ("v", v))}
    local_extra = {name: shard(t, rank, world, args.layout, dim=1) if name == "doc" else t
                   for name, t in extra.items()}
    out = at.distributed.ring_attention(args.spec, local["q"], local["k"], local["v"],
                                        layout=args.layout, **local_extra)
    (out * shard(dout, rank, world, args.layout, dim=2)).sum().backward()

    whole = {name: t.clone().requires_grad_() for name, t in (("q", q), ("k", k), ("v", v))}
    ref = at.attention(args.spec, whole["q"], whole["k"], whole["v"], **extra)
    (ref * dout).sum().backward()
    errors = [float((out.detach() - shard(ref.detach(), rank, world, args.layout, dim=2)).abs().max())]
    errors += [float((local[n].grad - shard(whole[n].grad, rank, world, args.layout, dim=2))
                     .abs().max()) for n in ("q", "k", "v")]
    print(f"rank {rank}/{world}: {out.shape[2]} of {N} rows, max |error| vs one process: "
          f"out {errors[0]:.1e}, dq {errors[1]:.1e}, dk {errors[2]:.1e}, dv {errors[3]:.1e}",
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
