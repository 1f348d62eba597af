"""Ring attention on real processes and real collectives (issue 11): gloo on loopback.

One group of processes per world size (2 and 4) runs every case below, both layouts, and sends
back its rows of out, lse and every gradient; the parent compares them with the single-process
`attndsl.torch.attention` on the whole sequence. N = 37 (and 141 for the sliding windows)
divides by neither world size: the default split (chunk_sizes) gives uneven shards.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import socket
import traceback
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import attndsl
import attndsl.torch as at
from attndsl.torch.distributed import shard

LAYOUTS = ("contiguous", "zigzag")
TIME_LIMIT = 400  # seconds for one group of processes to run every case


@dataclasses.dataclass(frozen=True)
class Case:
    """A spec, its sizes, and the extra arguments: replicated params (name -> shape),
    positional float inputs and integer indices (name -> (kind, sequence axis))."""

    name: str
    spec: str
    heads: int = 2
    kv_heads: int = 2
    n: int = 37
    target: str = "numpy"
    dtype: str = "float64"
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()
    inputs: tuple[tuple[str, str], ...] = ()  # name -> which builder
    positive_v: bool = False


NONE_SPEC = """attention plain_none {
    score q . k
    scale 0.1
    mask  j <= i + 3
    normalize none
}"""

EMPTY_ROWS = """attention empty_rows {
    param sink[heads]
    score q . k
    mask  j < i and i - j < 9
    normalize softmax(sink = sink[h])
}"""

LINEAR_RING = """attention linear_ring {{
    score (elu(q) + 1) . (elu(k) + 1)
    scale 1
    {mask}
    normalize sum
}}"""

PROJECTED = """attention linear_projection {
    param W[d, r]
    score softplus(q @ W) . softplus(k @ W)
    mask  j <= i
    normalize sum
}"""

FAR = """attention far {
    param table[heads, 20]
    score q . k
    bias  table[h, max(j - i, 0)]
}"""

# arrays whose sequence axis holds the whole sequence (ring_spec's whole axes)
PREVIOUS_DOC = """attention previous_doc {
    index doc[n]
    score q . k
    mask  doc[max(i - 1, 0)] == doc[j] and j <= i
}"""

POSITION_BIAS = """attention position_bias {
    param pb[n_k]
    score q . k
    bias  pb[j]
}"""

PAIR_BIAS = """attention pair_bias {
    input pb2[heads, n_q, n_k]
    score q . k
    bias  pb2[h, i, j]
}"""

SHIFTED_GATE = """attention shifted_gate {
    input g[n]
    score q . k
    bias  g[max(i - 1, 0)] - g[j]
    mask  j <= i
}"""

CASES = [
    Case("softmax", "examples/scaled_dot_product.attn"),
    Case("softmax_cpu", "examples/causal.attn", target="cpu"),
    Case("softmax_f32", "examples/causal.attn", dtype="float32"),
    Case("gqa", "examples/multi_head_gqa.attn", heads=8, kv_heads=2),
    Case("alibi", "examples/alibi.attn", heads=8, kv_heads=2, params=(("slope", (8,)),)),
    Case("softcap", "examples/softcap.attn"),
    Case("sliding_window_sink", "examples/sliding_window_sink.attn", n=141,
         params=(("sink", (2,)),)),
    Case("sink_cpu", "examples/sliding_window_sink.attn", n=141, target="cpu",
         params=(("sink", (2,)),)),
    Case("document", "examples/document.attn", inputs=(("doc", "doc"),)),
    Case("prefix_lm", "examples/prefix_lm.attn", inputs=(("prefix", "prefix"),)),
    Case("relative_bias", "examples/relative_bias.attn", params=(("table", (2, 257)),)),
    Case("sigmoid_n_k", "examples/sigmoid.attn"),
    Case("relu_n_k", "examples/relu.attn"),
    Case("none", NONE_SPEC),
    Case("linear", "examples/linear.attn"),
    Case("causal_linear", "examples/causal_linear.attn"),
    Case("causal_linear_cpu", "examples/causal_linear.attn", target="cpu"),
    Case("forgetting", "examples/forgetting.attn", inputs=(("c", "gate"),)),
    Case("latent_rope", "examples/latent_rope.attn", inputs=(("rq", "rope"), ("rk", "rope"))),
    Case("empty_rows_sink", EMPTY_ROWS, params=(("sink", (2,)),)),
    Case("empty_rows", "attention strict { score q . k\n mask j < i }"),
    Case("linear_f32", "examples/linear.attn", dtype="float32"),
    # `scale 1` keeps the linear path but not the scan's features: these run on the ring
    Case("linear_ring", LINEAR_RING.format(mask="")),
    Case("causal_linear_ring", LINEAR_RING.format(mask="mask j <= i")),
    Case("linear_projection", PROJECTED, params=(("W", (8, 6)),)),
    Case("bahdanau", "examples/bahdanau.attn",
         params=(("Wq", (8, 5)), ("Wk", (8, 5)), ("w", (5,)))),
    # key rows computed by their owner and sent (norm(k), relu(k @ F)), under GQA too
    Case("cosine_cpu", "examples/cosine.attn", target="cpu", params=(("tau", ()),)),
    Case("decomposable_gqa", "examples/decomposable.attn", heads=4, kv_heads=2,
         params=(("F", (8, 6)),)),
    # the remaining examples, so that every one runs on the ring
    Case("sliding_window", "examples/sliding_window.attn", n=141),
    Case("spatial_window", "examples/spatial_window.attn", n=141),
    Case("t5_bucket", "examples/t5_bucket.attn", params=(("table", (2, 32)),)),
    Case("luong_dot", "examples/luong_dot.attn"),
    Case("luong_general", "examples/luong_general.attn", params=(("Wa", (8, 8)),)),
    Case("channel_attention", "examples/channel_attention.attn"),
    Case("translation", "examples/translation.attn"),
    Case("previous_doc", PREVIOUS_DOC, inputs=(("doc", "doc"),)),  # an index, gathered
    Case("position_bias", POSITION_BIAS, params=(("pb", (37,)),)),  # a param, replicated
    Case("pair_bias", PAIR_BIAS, inputs=(("pb2", "pair"),)),  # query rows, whole keys
    Case("shifted_gate", SHIFTED_GATE, inputs=(("g", "gate1"),)),  # an input, gathered
]


def _spec(case: Case) -> Any:
    return attndsl.compile(case.spec, target="numpy") if case.target == "numpy" else case.spec


def _globals(case: Case, seed: int) -> dict[str, Any]:
    """The whole-sequence arguments of a case (the same in every process)."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    B, H, KV, N, d = 2, case.heads, case.kv_heads, case.n, 8

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    x = {"q": rand(B, H, N, d), "k": rand(B, KV, N, d), "v": rand(B, KV, N, d + 1),
         "dout": rand(B, H, N, d + 1), "dlse": rand(B, H, N)}
    for name, shape in case.params:
        x[name] = rand(*shape) * (0.3 if name == "slope" else 1.0)
        if name == "tau":  # cosine's temperature: away from its clamp at 0.01
            x[name] = x[name].abs() + 0.5
    for name, kind in case.inputs:
        if kind == "doc":  # packed documents: sorted ids, so boundaries fall mid-shard
            x[name] = torch.sort(torch.randint(0, 4, (B, N), generator=g), dim=1).values
        elif kind == "prefix":
            x[name] = torch.tensor([[7], [12]])
        elif kind == "gate":
            x[name] = rand(B, H, N).cumsum(-1) * 0.1
        elif kind == "rope":
            x[name] = rand(B, N, 4)
        elif kind == "pair":
            x[name] = rand(B, H, N, N)
        elif kind == "gate1":
            x[name] = rand(B, N).cumsum(-1) * 0.1
    return x


POSITIONAL = {"q": 2, "k": 2, "v": 2, "dout": 2, "dlse": 2, "doc": 1, "c": 2, "rq": 1, "rk": 1,
              "pb2": 2, "g": 1}  # pb2: the query axis (its key axis is whole on every rank)
FLOATS = ("q", "k", "v", "slope", "sink", "table", "Wq", "Wk", "w", "c", "rq", "rk", "W", "tau",
          "F", "Wa", "pb", "pb2", "g")


def _extras(case: Case, x: dict[str, Any]) -> dict[str, Any]:
    return {n: x[n] for n, _ in case.params} | {n: x[n] for n, _ in case.inputs}


def _loss(out: torch.Tensor, lse: Any, x: dict[str, Any]) -> torch.Tensor:
    loss = (out * x["dout"]).sum()
    return loss + (lse * x["dlse"]).sum() if lse is not None else loss


def _run_case(case: Case, seed: int, layout: str, rank: int, world: int,
              device: str = "cpu") -> dict[str, Any]:
    x = _globals(case, seed)
    local = {n: (shard(t, rank, world, layout, POSITIONAL[n]) if n in POSITIONAL else t)
             .to(device) for n, t in x.items()}
    leaves = {n: t.clone().requires_grad_() for n, t in local.items() if n in FLOATS}
    args = {**local, **leaves}
    spec = _spec(case) if device == "cpu" else case.spec  # on CUDA tensors: the cuda target
    out, lse = at.distributed.ring_attention(spec, args["q"], args["k"], args["v"],
                                             layout=layout, return_lse=True,
                                             **_extras(case, args))
    _loss(out, lse, local).backward()
    result = {"out": out.detach().cpu().numpy(),
              "lse": None if lse is None else lse.detach().cpu().numpy()}
    result |= {f"d{n}": t.grad.cpu().numpy() for n, t in leaves.items()}
    return result


def _errors(rank: int, world: int) -> dict[str, str]:
    """Bad shapes on one rank, or a kernel that raises on some ranks' steps: every rank
    raises; a rank that never calls: a group timeout."""
    said = {}
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    k = q if rank == 0 else torch.randn(1, 2, 5, 7, dtype=torch.float64)
    try:
        at.distributed.ring_attention("examples/causal.attn", q, k, q)
    except ValueError as e:
        said["bad_shape"] = str(e)
    n = 5 if rank == 0 else 9  # a contiguous split, not zigzag's: every rank refuses it
    x = torch.randn(1, 2, n, 8, dtype=torch.float64)
    try:
        at.distributed.ring_attention("examples/causal.attn", x, x, x, layout="zigzag")
    except ValueError as e:
        said["zigzag_split"] = str(e)
    far = attndsl.compile(FAR, target="numpy")  # table[h, 36] on the ranks with far keys only
    x = shard(torch.randn(1, 2, 37, 8, dtype=torch.float64), rank, world)
    try:
        at.distributed.ring_attention(far, x, x, x, table=torch.zeros(2, 20, dtype=x.dtype))
    except ValueError as e:
        said["kernel"] = str(e)
    x = shard(torch.randn(1, 2, 37, 8, dtype=torch.float64), rank, world)
    doc = torch.zeros(1, x.shape[2], dtype=torch.int64 if rank == 0 else torch.float64)
    try:  # a float index on the ranks after 0 only
        at.distributed.ring_attention("examples/document.attn", x, x, x, doc=doc)
    except ValueError as e:
        said["float_index"] = str(e)
    try:  # a whole-sequence param of the wrong length on rank 0 only
        at.distributed.ring_attention(attndsl.compile(POSITION_BIAS, target="numpy"), x, x, x,
                                      pb=torch.zeros(37 if rank else 36, dtype=x.dtype))
    except ValueError as e:
        said["whole_length"] = str(e)
    from attndsl.torch import ops

    real = ops.apply  # the linear scan's kernel, failing on rank 1 only
    if rank == 1:
        ops.apply = _failing_kernel
    x = shard(torch.randn(1, 2, 37, 8, dtype=torch.float64), rank, world)
    try:
        at.distributed.ring_attention("examples/causal_linear.attn", x, x, x)
    except ValueError as e:
        said["scan"] = str(e)
    finally:
        ops.apply = real
    short = dist.new_group(timeout=datetime.timedelta(seconds=5))
    if rank == 0:
        try:
            at.distributed.ring_attention("examples/causal.attn", q, q, q, group=short)
        except RuntimeError as e:
            said["timeout"] = f"{type(e).__name__}: {e}"
    dist.barrier()
    return said


def _failing_kernel(*args: Any, **kwargs: Any) -> Any:
    raise ValueError("a kernel failed on this rank")


def _worker(rank: int, world: int, port: int, results: Any) -> None:
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for seed, case in enumerate(CASES):
            for layout in LAYOUTS:
                try:
                    results.put((rank, case.name, layout, _run_case(case, seed, layout, rank,
                                                                    world)))
                except Exception:
                    results.put((rank, case.name, layout, traceback.format_exc()))
                    raise
        again = _run_case(CASES[1], 1, "zigzag", rank, world)  # numba cpu target, twice
        first = _run_case(CASES[1], 1, "zigzag", rank, world)
        results.put((rank, "repeat", "", all(np.array_equal(first[n], again[n]) for n in first)))
        results.put((rank, "module", "zigzag", _module_case(rank, world)))
        results.put((rank, "split", "", _custom_split(rank, world)))
        results.put((rank, "errors", "", _errors(rank, world)))
    finally:
        dist.destroy_process_group()
        results.put((rank, "done", "", None))


def _module_case(rank: int, world: int) -> dict[str, Any]:
    """RingAttention (the module form) owns slope; its gradient is all-reduced."""
    torch.manual_seed(0)
    case = CASES[4]
    x = _globals(case, 4)
    layer = at.distributed.RingAttention(_spec(case), layout="zigzag", slope=x["slope"])
    local = {n: shard(x[n], rank, world, "zigzag", 2) for n in ("q", "k", "v", "dout")}
    out = layer(local["q"], local["k"], local["v"])
    (out * local["dout"]).sum().backward()
    return {"out": out.detach().numpy(), "dslope": layer.slope.grad.numpy()}


SPLITS = {2: [30, 7], 4: [3, 20, 1, 13]}  # contiguous lengths of N = 37 chosen by the user


def _custom_split(rank: int, world: int) -> dict[str, Any]:
    """The contiguous layout with any lengths: gathered at the call, offsets follow."""
    case = CASES[4]
    x = _globals(case, 4)
    start = sum(SPLITS[world][:rank])
    local = {n: x[n].narrow(2, start, SPLITS[world][rank]) for n in ("q", "k", "v", "dout")}
    k = local["k"].clone().requires_grad_()
    out = at.distributed.ring_attention(_spec(case), local["q"], k, local["v"], slope=x["slope"])
    (out * local["dout"]).sum().backward()
    return {"out": out.detach().numpy(), "dk": k.grad.numpy(), "start": start}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NCCL_CASES = ("softmax", "gqa", "alibi", "sliding_window_sink", "document", "causal_linear",
              "bahdanau", "cosine_cpu")


def _nccl_worker(rank: int, world: int, port: int, results: Any) -> None:
    """CUDA tensors on the NCCL backend, one GPU per rank: the cases above on the cuda target."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for case in (c for c in CASES if c.name in NCCL_CASES):
            for layout in LAYOUTS:
                try:
                    results.put((rank, case.name, layout, _run_case(
                        case, CASES.index(case), layout, rank, world, device=f"cuda:{rank}")))
                except Exception:
                    results.put((rank, case.name, layout, traceback.format_exc()))
                    raise
    finally:
        dist.destroy_process_group()
        results.put((rank, "done", "", None))


def _spawn(world: int, worker: Any = None) -> dict[tuple[int, str, str], Any]:
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker or _worker, args=(r, world, port, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[tuple[int, str, str], Any] = {}
    done = 0
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIME_LIMIT)
    try:
        while done < world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise TimeoutError(f"{world} ranks did not finish within {TIME_LIMIT} s")
            try:
                rank, name, layout, value = results.get(timeout=min(left, 30))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a rank died: exit codes "
                                       f"{[p.exitcode for p in procs]}") from None
                continue
            done += name == "done"
            got[rank, name, layout] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return got


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"P{w}")
def ring(request: Any) -> tuple[int, dict[tuple[int, str, str], Any]]:
    return request.param, _spawn(request.param)


_REFERENCES: dict[tuple[str, str], dict[str, Any]] = {}


def _reference(case: Case, seed: int) -> dict[str, Any]:
    """The single-process result on the whole sequence (computed once per case)."""
    key = (case.name, case.spec)
    if key not in _REFERENCES:
        x = _globals(case, seed)
        leaves = {n: t.clone().requires_grad_() for n, t in x.items() if n in FLOATS}
        args = {**x, **leaves}
        out, lse = at.attention(_spec(case), args["q"], args["k"], args["v"], return_lse=True,
                                **_extras(case, args))
        _loss(out, lse, x).backward()
        ref = {"out": out.detach(), "lse": None if lse is None else lse.detach()}
        ref |= {f"d{n}": t.grad for n, t in leaves.items()}
        _REFERENCES[key] = ref
    return _REFERENCES[key]


def _close(name: str, got: np.ndarray, want: torch.Tensor, dtype: str) -> None:
    want_a = want.numpy()
    assert got.shape == want_a.shape, (name, got.shape, want_a.shape)
    finite = np.isfinite(want_a)
    assert np.array_equal(finite, np.isfinite(got)), f"{name}: non-finite entries differ"
    if not finite.any():
        return
    scale = max(float(np.abs(want_a[finite]).max()), 1e-30)
    err = float(np.abs(got[finite] - want_a[finite]).max()) / scale
    tol = 1e-10 if dtype == "float64" else 1e-5
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    assert np.array_equal(got[~finite], want_a[~finite]), f"{name}: -inf rows differ"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ring_matches_one_process(ring: Any, case: Case, layout: str) -> None:
    world, got = ring
    seed = CASES.index(case)
    ref = _reference(case, seed)
    for rank in range(world):
        _check_rank(case, ref, got.get((rank, case.name, layout)), rank, world, layout)


def _check_rank(case: Case, ref: dict[str, Any], result: Any, rank: int, world: int,
                layout: str) -> None:
    """One rank's out, lse and gradients against its rows of the one-process result."""
    assert result is not None, f"rank {rank} sent nothing"
    assert not isinstance(result, str), f"rank {rank} raised:\n{result}"
    for name, value in result.items():
        want = ref[name]
        if value is None:
            assert want is None, name
            continue
        axis = POSITIONAL.get(name.removeprefix("d"))
        if name in ("out", "lse") or axis is not None:
            axis = 2 if name in ("out", "lse") else axis
            want = shard(want, rank, world, layout, axis)
        _close(f"{case.name} {layout} rank {rank} {name}", value, want, case.dtype)


def test_ring_module_form(ring: Any) -> None:
    """RingAttention: out and the all-reduced slope gradient on every rank."""
    world, got = ring
    x = _globals(CASES[4], 4)
    slope = x["slope"].clone().requires_grad_()
    out = at.attention(_spec(CASES[4]), x["q"], x["k"], x["v"], slope=slope)
    (out * x["dout"]).sum().backward()
    for rank in range(world):
        result = got[rank, "module", "zigzag"]
        _close("out", result["out"], shard(out.detach(), rank, world, "zigzag", 2), "float64")
        _close("dslope", result["dslope"], slope.grad, "float64")


def test_ring_any_contiguous_split(ring: Any) -> None:
    """Uneven shards of the user's choosing (30 + 7, 3 + 20 + 1 + 13 positions)."""
    world, got = ring
    x = _globals(CASES[4], 4)
    k = x["k"].clone().requires_grad_()
    out = at.attention(_spec(CASES[4]), x["q"], k, x["v"], slope=x["slope"])
    (out * x["dout"]).sum().backward()
    for rank in range(world):
        result = got[rank, "split", ""]
        rows = slice(result["start"], result["start"] + SPLITS[world][rank])
        _close("out", result["out"], out.detach()[:, :, rows], "float64")
        _close("dk", result["dk"], k.grad[:, :, rows], "float64")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or not dist.is_nccl_available(), reason="NCCL needs two CUDA devices")
def test_ring_on_cuda_tensors_with_nccl() -> None:
    """The same results with CUDA tensors on NCCL (2 ranks, one GPU each), against one CPU
    process (float64 <= 1e-10, float32 <= 1e-5 relative)."""
    got = _spawn(2, _nccl_worker)
    cases = [c for c in CASES if c.name in NCCL_CASES]
    assert len(cases) == len(NCCL_CASES)
    for case in cases:
        ref = _reference(case, CASES.index(case))
        for layout in LAYOUTS:
            for rank in range(2):
                _check_rank(case, ref, got.get((rank, case.name, layout)), rank, 2, layout)


def test_ring_deterministic(ring: Any) -> None:
    """The same call twice gives bit-identical out, lse and gradients on every rank."""
    world, got = ring
    assert all(got[rank, "repeat", ""] for rank in range(world))


def test_ring_bad_rank_raises_everywhere(ring: Any) -> None:
    world, got = ring
    for rank in range(world):
        said = got[rank, "errors", ""]
        assert "bad_shape" in said, f"rank {rank} did not raise"
        assert "rank 1" in said["bad_shape"] and "k: expected shape" in said["bad_shape"]
        assert "needs the split of chunk_sizes" in said["zigzag_split"]
        assert "a step failed" in said["kernel"] and "out of range" in said["kernel"]
        assert "rank 1: TypeError: doc: expected an integer array" in said["float_index"]
        assert "rank 0: ValueError: pb: its axis 0 holds the whole sequence on every rank " \
            "(37 positions), got shape (36,)" in said["whole_length"]
        assert "the linear scan's kernel failed on 1 of" in said["scan"], f"rank {rank}"
        assert "rank 1: ValueError: a kernel failed on this rank" in said["scan"]
    assert "timeout" in got[0, "errors", ""]


# ---- no processes: the shard programs, the split and the pairs each step runs ------------------


def test_ring_spec_programs() -> None:
    from attndsl.torch.ring_spec import ring_spec

    sigmoid = ring_spec(attndsl.load("examples/sigmoid.attn"))
    assert sigmoid.size_index == "ring_n" and "ring_n" in attndsl.ir.to_text(
        sigmoid.step.normalize.expr)
    document = ring_spec(attndsl.load("examples/document.attn"))
    assert document.key_copies == {"doc": "doc_k"}
    assert "doc_k[j]" in attndsl.ir.to_text(document.step.mask).replace("[b, ", "[")
    linear = ring_spec(attndsl.load("examples/causal_linear.attn"))
    assert linear.merge == "ratio" and linear.step.normalize.kind.value == "none"
    assert linear.causal_linear and linear.unmasked.mask is None
    sink = ring_spec(attndsl.load("examples/sliding_window_sink.attn"))
    assert sink.own.normalize.sink is not None and sink.step.normalize.sink is None


def test_ring_spec_refuses_what_a_shard_cannot_read() -> None:
    from attndsl.torch.ring_spec import ring_spec

    first = ring_spec(attndsl.parse("attention first_doc {\n index doc[n]\n score q . k\n"
                                    " mask doc[0] == doc[j]\n}"))
    assert first.roles == {"doc": ("whole",)} and first.key_copies == {}  # gathered: served
    assert "index doc[ring_len]" in _program_text(first.step)
    transposed = attndsl.parse("attention transposed {\n input x[n_q, n_k]\n score q . k\n"
                               " bias x[j, i]\n}")
    with pytest.raises(ValueError, match=r"x has two sequence axes.*at i exactly"):
        ring_spec(transposed)
    cube = attndsl.parse("attention cube {\n index t[n, n, n]\n score q . k\n"
                         " mask t[i, j, 0] > 0\n}")
    with pytest.raises(ValueError, match="3 sequence axes"):
        ring_spec(cube)


def _program_text(spec: Any) -> str:
    return attndsl.ir.to_text(spec.mask) + "".join(
        f"\nindex {x.name}[{', '.join(map(str, x.dims))}]" for x in spec.indices)


def test_every_example_runs_on_the_ring() -> None:
    """The matrix above holds a case for every bundled example (a new example needs one)."""
    import glob

    covered = {c.spec for c in CASES}
    assert sorted(set(glob.glob("examples/*.attn")) - covered) == []


def test_ring_split_and_shard() -> None:
    from attndsl.torch.distributed import chunk_bounds, chunk_sizes

    assert chunk_sizes(37, 4) == [[10], [9], [9], [9]]
    assert chunk_sizes(37, 2, "zigzag") == [[10, 9], [9, 9]]
    bounds = chunk_bounds(37, 2, "zigzag")
    assert bounds == [[(0, 10), (28, 37)], [(10, 19), (19, 28)]]
    x = torch.arange(37).view(1, 1, 37, 1)
    pieces = [shard(x, r, 2, "zigzag") for r in range(2)]
    assert sorted(torch.cat(pieces, 2).flatten().tolist()) == list(range(37))
    with pytest.raises(ValueError, match="cannot give each"):
        chunk_sizes(5, 4, "zigzag")


def test_ring_skips_pairs_the_mask_hides() -> None:
    """Causal, contiguous: rank 0 runs no pair of the later shards; zigzag: every rank runs
    the same number of pairs (balanced)."""
    from attndsl.torch.distributed import _pairs, _Plan, chunk_bounds
    from attndsl.torch.ring_spec import ring_spec

    ring = ring_spec(attndsl.load("examples/causal.attn"))
    world = 4
    for layout in ("contiguous", "zigzag"):
        chunks = chunk_bounds(1000, world, layout)
        counts = []
        for rank in range(world):
            plan = _Plan(ring, {}, None, rank, world, chunks, 1000, [], 8)
            counts.append(sum(len(_pairs(plan, owner)) for owner in range(world)))
            if layout == "contiguous":
                assert all(not _pairs(plan, owner) for owner in range(rank + 1, world))
        assert counts == ([1, 2, 3, 4] if layout == "contiguous" else [2 * world + 1] * world)


def test_ring_skips_shards_whose_documents_or_windows_cannot_meet() -> None:
    """Masks beyond i/j comparisons: packed documents skip a key shard whose ids cannot meet
    the query shard's (bounded by each side's least and greatest id), and a 2-D window
    skips image rows more than 2 apart; a shard that may meet is never skipped."""
    from attndsl.torch.distributed import _Arg, _Keys, _pairs, _Plan, chunk_bounds
    from attndsl.torch.ring_spec import ring_spec

    world, n = 4, 640
    chunks = chunk_bounds(n, world)
    doc = torch.arange(n).div(n // world + 5, rounding_mode="floor")[None]  # 4 documents
    ring = ring_spec(attndsl.load("examples/document.attn"))

    def shard_of(rank: int) -> torch.Tensor:
        (a, b), = chunks[rank]
        return doc[:, a:b]

    for rank in range(world):
        plan = _Plan(ring, {}, None, rank, world, chunks, n,
                     [_Arg("doc", shard_of(rank), "both", 1, False)], 8)
        ran = [owner for owner in range(world) if _pairs(plan, owner, _Keys(
            owner, [shard_of(owner)], ["doc_k"], [1]))]
        # causal and by document: keys of this shard, and of the one before when a document
        # spans the boundary (the ids run over 165 positions, a shard holds 160)
        meets = [o for o in range(rank + 1)
                 if set(shard_of(o).tolist()[0]) & set(shard_of(rank).tolist()[0])]
        assert ran == meets, (rank, ran)
        assert ran == ([0] if rank == 0 else [rank - 1, rank])
        assert [o for o in range(world) if _pairs(plan, o)] == list(range(rank + 1))  # ids
        # unknown: only the causal part decides

    window = ring_spec(attndsl.load("examples/spatial_window.attn"))  # 16 pixels a row
    for rank in range(world):  # 160 positions: 10 image rows per shard
        plan = _Plan(window, {}, None, rank, world, chunks, n, [], 8)
        ran = [o for o in range(world) if _pairs(plan, o)]
        assert ran == [o for o in range(world) if abs(o - rank) <= 1], (rank, ran)


def test_ring_needs_a_process_group() -> None:
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        at.distributed.ring_attention("examples/causal.attn", q, q, q)
    with pytest.raises(ValueError, match="layout"):
        at.distributed.ring_attention("examples/causal.attn", q, q, q, layout="striped")
