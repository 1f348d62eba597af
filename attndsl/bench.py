"""`attndsl bench`: the spec's kernels against the same attention in PyTorch, on this machine.

Contenders, each checked against attndsl's output before it is timed (max |error| in the table):
  attndsl      the spec's kernel on the chosen target (forward, or forward + backward)
  torch sdpa   torch.nn.functional.scaled_dot_product_attention, when the spec is plain softmax
               attention (q . k, scale 1 or 1/sqrt(d), no bias or softcap, no mask or `j <= i`)
  torch eager  the generated NumPy reference's forward run on torch tensors (runtime/torch_ops),
               gradients by torch.autograd: every spec, every pair materialized
Rounds are interleaved (one run of each contender per round) and the median is reported, so a
machine that slows down mid-run slows every contender alike. GFLOP/s counts dense attention:
2 n_q n_k (d + dv) per head forward, 3.5 times that forward + backward (FlashAttention's count),
masked pairs included, so a masked spec's figure is an equivalent rate.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import ir, viz
from .progress import progress, progress_done  # noqa: F401 - the cli's bench uses them
from .runtime.kernel import Validator

BACKWARD_FLOPS = 3.5  # forward + backward = 3.5 x forward (FlashAttention's convention)
EAGER_PAIRS = 2**28  # torch eager holds several [B, heads, n_q, n_k] arrays: 1 GiB each past this


@dataclass
class Setup:
    """The shapes of one benchmark: B, heads, kv_heads, d, dv and the float dtype."""

    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    d: int = 64
    dv: int = 64
    dtype: str = "float32"


def bench_heads(spec: ir.Spec, heads: int | None) -> tuple[int, int]:
    """(heads, kv_heads): the spec's where it fixes them, else `heads` (8) and as many kv heads."""
    if spec.heads is not None:
        return spec.heads, spec.kv_heads or spec.heads
    if spec.kv_heads is not None:
        want = heads or 4 * spec.kv_heads
        return want - want % spec.kv_heads or spec.kv_heads, spec.kv_heads
    return heads or 8, heads or 8


def machine() -> str:
    """The CPU model (lscpu), LLVM's name for its ISA and the cores: every table records them."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                  if line.startswith("Model name:")), "unknown CPU")
    try:
        import llvmlite.binding as llvm

        isa = llvm.get_host_cpu_name()
    except Exception:  # noqa: BLE001 (only a label)
        isa = "unknown ISA"
    return f"{model} ({isa}), {os.cpu_count()} cores"


@dataclass
class Case:
    """The arrays of one sequence length, as NumPy and as attndsl's validated call."""

    spec: ir.Spec
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    dout: np.ndarray
    extra: dict[str, np.ndarray]
    ordered: list[np.ndarray] = field(default_factory=list)  # q, k, v, params, indices

    @property
    def flops(self) -> float:
        B, heads, n_q, d = self.q.shape
        return 2.0 * B * heads * n_q * self.k.shape[2] * (d + self.v.shape[3])


def make_case(spec: ir.Spec, n: int, setup: Setup, indices: dict[str, str], seed: int = 0
              ) -> Case:
    dtype = np.dtype(setup.dtype)
    rng = np.random.default_rng(seed)
    shape = {"q": (setup.batch, setup.heads, n, setup.d),
             "k": (setup.batch, setup.kv_heads, n, setup.d),
             "v": (setup.batch, setup.kv_heads, n, setup.dv)}
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in shape.values())
    sizes = {"B": setup.batch, "heads": setup.heads, "kv_heads": setup.kv_heads, "n_q": n,
             "n_k": n, "n": n, "d": setup.d, "dv": setup.dv}
    extra = {name: np.asarray(a, dtype=dtype)
             for name, a in viz.demo_params(spec, sizes, seed + 1).items()}
    for x in spec.indices:
        shape_x = tuple(d if isinstance(d, int) else sizes.get(d, viz.FREE_SIZE) for d in x.dims)
        extra[x.name] = (viz.parse_index(indices[x.name], shape_x, x.name) if x.name in indices
                         else viz.demo_index(x, sizes))
    dout = rng.standard_normal((setup.batch, setup.heads, n, setup.dv)).astype(dtype)
    ordered = Validator(spec)(q, k, v, extra).arrays()
    return Case(spec, q, k, v, dout, extra, ordered)


# ---- contenders: each returns (a run to time, its outputs to check) -------------------------


Outputs = dict[str, np.ndarray]  # "out", and with backward "q", "k", "v" (the gradients)


@dataclass
class Contender:
    name: str
    run: Callable[[], Outputs]


def attndsl_contender(kernel: Any, case: Case, backward: bool) -> Contender:
    def run() -> Outputs:
        out, lse = kernel.forward(case.q, case.k, case.v, return_lse=True, **case.extra)
        if not backward:
            return {"out": out}
        grads = kernel.backward(case.q, case.k, case.v, case.dout, out=out, lse=lse,
                                **case.extra)
        return {"out": out, "q": grads["q"], "k": grads["k"], "v": grads["v"]}

    return Contender(f"attndsl {kernel.target}", run)


def sdpa_scale(spec: ir.Spec) -> tuple[float | None, bool] | None:
    """(scale, is_causal) when SDPA computes the spec (scale None: 1/sqrt(d)); else None."""
    norm = spec.normalize
    if norm.kind is not ir.NormKind.SOFTMAX or norm.sink is not None:
        return None
    if spec.bias is not None or spec.softcap is not None or spec.params or spec.indices:
        return None
    if ir.to_text(spec.score) not in ("q . k", "dot(q, k)"):
        return None
    scale = None if spec.scale is None else ir.to_text(spec.scale)
    if scale not in (None, "1 / sqrt(d)", "rsqrt(d)"):
        return None
    mask = None if spec.mask is None else ir.to_text(spec.mask)
    if mask not in (None, "j <= i", "i >= j"):
        return None
    return (1.0 if scale is None else None), mask is not None


def _torch_tensors(case: Case, backward: bool) -> tuple[list[Any], list[Any]]:
    """q, k, v, params, indices as torch tensors (floats requiring grad under backward)."""
    import torch

    tensors = []
    for a in case.ordered:
        a = np.ascontiguousarray(a)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())  # a broadcast index array
        if t.is_floating_point() and backward:
            t.requires_grad_(True)
        tensors.append(t)
    return tensors, tensors[:3]


def _torch_outputs(out: Any, qkv: list[Any], dout: Any, backward: bool) -> Outputs:
    if not backward:
        return {"out": out.detach().numpy()}
    for t in qkv:
        t.grad = None
    out.backward(dout)
    return {"out": out.detach().numpy(),
            **{name: t.grad.numpy() for name, t in zip("qkv", qkv, strict=True)}}


def sdpa_contender(case: Case, backward: bool) -> Contender | None:
    how = sdpa_scale(case.spec)
    if how is None:
        return None
    import torch
    import torch.nn.functional as F

    scale, causal = how
    (q, k, v, *_), qkv = _torch_tensors(case, backward)
    dout = torch.from_numpy(case.dout)
    gqa = q.shape[1] != k.shape[1]

    def run() -> Outputs:
        with torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                 enable_gqa=gqa)
        return _torch_outputs(out, qkv, dout, backward)

    return Contender("torch sdpa", run)


def eager_contender(case: Case, backward: bool) -> Contender:
    import torch

    from .runtime.torch_ops import TorchOps

    module, _ = viz._reference(case.spec)
    tensors, qkv = _torch_tensors(case, backward)
    ops = TorchOps(tensors[0].dtype)
    dout = torch.from_numpy(case.dout)

    def run() -> Outputs:
        with torch.set_grad_enabled(backward):
            out, _ = module.forward(ops, *tensors)
        return _torch_outputs(out, qkv, dout, backward)

    return Contender("torch eager", run)


def flex_source(spec: ir.Spec) -> str | None:
    """`score_mod` and `mask_mod` for torch's flex_attention, printed by the NumPy reference's
    emitter from the spec's own logit and mask (score is q . k, unscaled); None unless the spec
    is softmax (no sink) over one q . k GEMM plus terms in positions, params and indices."""
    from .codegen import numpy_ref

    _, emitter = viz._reference(spec)
    plan = emitter.plan
    deriv = plan.deriv
    if deriv.norm is not ir.NormKind.SOFTMAX or deriv.sink is not None or plan.loops:
        return None
    if len(plan.gemms) != 1 or not all(p.is_raw_query or p.is_raw_key for p in plan.inputs):
        return None
    printer = numpy_ref.Emitter(plan)
    body = [f"    {line}" for line in viz.lookup_lines(spec)]
    gemm = numpy_ref.variable(plan.gemms[0])
    lines = ["def score_mod(score, b, h, i, j):", f"    {gemm} = score", *body,
             f"    return {printer.expr(deriv.logit)}"]
    if deriv.mask is not None:
        lines += ["", "def mask_mod(b, h, i, j):", *body, f"    return {printer.expr(deriv.mask)}"]
    return "\n".join(lines) + "\n"


def flex_mods(case: Case) -> tuple[Any, Any] | None:
    """(score_mod, block_mask) of the spec for flex_attention at the case's shapes; None when
    flex_source cannot express the spec."""
    source = flex_source(case.spec)
    if source is None:
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    from .runtime.torch_ops import FlexOps

    (q, k, v, *extra), _ = _torch_tensors(case, backward=False)
    B, heads, n_q, d = q.shape
    kv_heads, n_k, dv = k.shape[1], k.shape[2], v.shape[3]
    names = [*(f"{p.name}__" for p in case.spec.params), *(f"{x.name}__" for x in
                                                           case.spec.indices)]
    scope: dict[str, Any] = {"xp": FlexOps(q.dtype), "B": B, "heads": heads,
                             "kv_heads": kv_heads, "n_q": n_q, "n_k": n_k, "d": d, "dv": dv,
                             "q_off": 0, "k_off": 0,  # flex's i, j are the rows themselves
                             **dict(zip(names, extra, strict=True))}
    exec(compile(source, f"<flex {case.spec.name}>", "exec"), scope)  # noqa: S102 (printed)
    block_mask = (create_block_mask(scope["mask_mod"], B, heads, n_q, n_k, device="cpu")
                  if "mask_mod" in scope else None)
    return scope["score_mod"], block_mask


def flex_contender(case: Case) -> Contender | None:
    """torch.compile(flex_attention) with the spec's score_mod and block mask (forward only:
    flex_attention has no CPU backward)."""
    mods = flex_mods(case)
    if mods is None:
        return None
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    score_mod, block_mask = mods
    q, k, v = (torch.from_numpy(a) for a in (case.q, case.k, case.v))
    attend: Any = None

    def run() -> Outputs:
        with torch.no_grad():
            out = attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0,
                         enable_gqa=q.shape[1] != k.shape[1])
        return {"out": out.numpy()}

    try:  # compiled now: a machine where inductor cannot build gets a note, not a crash
        attend = torch.compile(flex_attention)
        run()
    except Exception as exc:  # noqa: BLE001 (torch.compile's failures share no base class)
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise FlexUnavailable(f"torch.compile(flex_attention) failed: {type(exc).__name__}: "
                              f"{first}") from None
    return Contender("torch flex", run)


class FlexUnavailable(RuntimeError):
    """torch.compile could not build flex_attention for this case (no C++ compiler, ...)."""


# ---- timing -----------------------------------------------------------------------------------


@dataclass
class Row:
    n: int
    name: str
    seconds: float
    flops: float
    error: float | None  # max |difference| from attndsl over out (and the gradients)


def max_error(reference: Outputs, other: Outputs) -> float:
    return max(float(np.max(np.abs(other[name].astype(np.float64) - reference[name])))
               for name in reference)


def time_case(n: int, contenders: list[Contender], repeats: int, flops: float) -> list[Row]:
    """Check every contender against the first, then time them interleaved; medians."""
    progress(f"n = {n}: first runs (compiles, checks)")
    reference = contenders[0].run()
    errors: list[float | None] = [None]
    for c in contenders[1:]:
        errors.append(max_error(reference, c.run()))
    times: list[list[float]] = [[] for _ in contenders]
    for r in range(repeats):
        progress(f"n = {n}: round {r + 1}/{repeats}")
        for c, spent in zip(contenders, times, strict=True):
            start = time.perf_counter()
            c.run()
            spent.append(time.perf_counter() - start)
    return [Row(n, c.name, statistics.median(t), flops, e)
            for c, t, e in zip(contenders, times, errors, strict=True)]


def table(rows: list[Row]) -> str:
    """n, contender, median ms, GFLOP/s, time / attndsl's, max |error|."""
    header = (f"{'n':>6}  {'contender':<14} {'median ms':>10} {'GFLOP/s':>8} "
              f"{'x attndsl':>9}  max |err| vs attndsl")
    lines = [header]
    base = {row.n: row.seconds for row in rows if row.error is None}
    for row in rows:
        error = "(reference)" if row.error is None else f"{row.error:.2e}"
        lines.append(f"{row.n:>6}  {row.name:<14} {row.seconds * 1e3:>10.2f} "
                     f"{row.flops / row.seconds / 1e9:>8.1f} {row.seconds / base[row.n]:>9.2f}  "
                     f"{error}")
    return "\n".join(lines)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def eager_fits(case: Case) -> bool:
    B, heads, n_q, _ = case.q.shape
    return B * heads * n_q * case.k.shape[2] <= EAGER_PAIRS


def contenders(spec: ir.Spec, kernel: Any, case: Case, backward: bool, use_torch: bool,
               flex: bool = True, notes: list[str] | None = None) -> list[Contender]:
    """attndsl's kernel and the torch contenders that apply (docs/language.md, `bench`);
    `notes` gets a line for a contender that applies but could not be built."""
    found = [attndsl_contender(kernel, case, backward)]
    if use_torch:
        sdpa = sdpa_contender(case, backward)
        found += [sdpa] if sdpa is not None else []
        if eager_fits(case):
            found.append(eager_contender(case, backward))
        try:
            compiled = flex_contender(case) if flex and not backward else None
        except FlexUnavailable as exc:
            compiled = None
            if notes is not None:
                notes.append(f"(no flex row at n = {case.q.shape[2]}: {exc})")
        found += [compiled] if compiled is not None else []
    return found
