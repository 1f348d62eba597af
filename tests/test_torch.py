"""attndsl.torch (issue 10, section 1): the custom ops, autograd, fake tensors, the module.

Every example in examples/ goes through `torch.library.opcheck` (both ops) and
`torch.autograd.gradcheck` in float64 (odd small shapes, GQA where the spec allows, params,
inputs and lse included), and every example with a mask again with rows that see no key;
determinism, dtypes, zero-copy and `torch.compile(fullgraph=True)` are checked on a few. CPU
tensors run the `cpu` target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import attndsl
import attndsl.torch as at
from attndsl.check import uses_n
from attndsl.torch import ops

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.attn"))
SPECS = {p.stem: attndsl.load(p) for p in EXAMPLE_FILES}

# rows 0-2 see no key: lse = -inf, out = 0
EMPTY_ROWS = """attention empty_rows {
    score q . k
    scale 1 / sqrt(d)
    mask  j < i - 2
}"""


def make_inputs(spec: attndsl.ir.Spec, dtype: Any = torch.float64, n_q: int = 7, n_k: int = 5,
                d: int = 3, dv: int = 2, B: int = 2, seed: int = 0) -> dict[str, Any]:
    """q, k, v, params and inputs (requiring grad) and index arrays; GQA (2 query heads per key
    head) unless the spec fixes its heads; n_q = n_k where the spec needs it."""
    gen = torch.Generator().manual_seed(seed)
    H = spec.heads or 4
    KV = spec.kv_heads or spec.heads or 2
    n_k = n_q if uses_n(spec) else n_k
    sizes = {"heads": H, "kv_heads": KV, "d": d, "dv": dv, "n": n_q, "n_q": n_q, "n_k": n_k,
             "r": 3, "B": B}

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=dtype)

    a: dict[str, Any] = {"q": randn(B, H, n_q, d), "k": randn(B, KV, n_k, d),
                         "v": randn(B, KV, n_k, dv), "extra": {}}
    for p in spec.params:
        shape = [sizes[x] if isinstance(x, str) else x for x in p.dims]
        value = 0.5 * randn(*shape) if shape else 0.5 + randn().abs()  # tau > 0
        a["extra"][p.name] = value
    for x in spec.indices:
        shape = [B] + [sizes[s] if isinstance(s, str) else s for s in x.dims]
        a["extra"][x.name] = torch.sort(torch.randint(0, 3, shape, generator=gen), dim=-1)[0]
    for name in ("q", "k", "v", *(p.name for p in spec.params)):
        tensor = a[name] if name in a else a["extra"][name]
        tensor.requires_grad_(True)
    return a


def differentiable(a: dict[str, Any]) -> list[torch.Tensor]:
    extra = [t for t in a["extra"].values() if t.is_floating_point()]
    return [a["q"], a["k"], a["v"], *extra]


def as_function(spec: Any, a: dict[str, Any]):  # type: ignore[no-untyped-def]
    """f(q, k, v, *params) -> out, lse (lse with rows of -inf set to 0: a constant there)."""
    names = [n for n, t in a["extra"].items() if t.is_floating_point()]
    indices = {n: t for n, t in a["extra"].items() if not t.is_floating_point()}

    def f(q, k, v, *params):  # type: ignore[no-untyped-def]
        out, lse = at.attention(spec, q, k, v, return_lse=True, **dict(zip(names, params)),
                                **indices)
        if lse is None:
            return out
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    return f


# ---- opcheck and gradcheck on every example -------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_opcheck(name: str) -> None:
    spec = SPECS[name]
    a = make_inputs(spec)
    handle = ops.spec_handle(spec)
    params = [t for t in a["extra"].values() if t.is_floating_point()]
    indices = [t for t in a["extra"].values() if not t.is_floating_point()]
    offsets = torch.tensor([3, 0]), torch.tensor([3, 0])  # equal: specs using n need that
    args = (handle, a["q"], a["k"], a["v"], params, indices, *offsets)
    torch.library.opcheck(torch.ops.attndsl.attention.default, args)
    with torch.no_grad():
        out, lse = torch.ops.attndsl.attention(*args)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if lse.numel() else None
    torch.library.opcheck(torch.ops.attndsl.attention_backward.default,
                          (*args, out, lse, dout, dlse),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradcheck(name: str) -> None:
    """float64, fast mode (random projections of the Jacobians): out and lse, every float
    argument; the full Jacobian is compared in test_gradcheck_full."""
    spec = SPECS[name]
    a = make_inputs(spec, n_q=7, n_k=6)
    assert torch.autograd.gradcheck(as_function(spec, a), differentiable(a), fast_mode=True)


def test_gradcheck_full() -> None:
    spec = SPECS["sliding_window_sink"]
    a = make_inputs(spec, n_q=4, n_k=4, d=2, dv=2, B=1)
    assert torch.autograd.gradcheck(as_function(spec, a), differentiable(a))


@pytest.mark.parametrize(("spec", "n_q", "n_k"), [(EMPTY_ROWS, 7, 7),
                                                  (SPECS["sliding_window_sink"], 133, 3)],
                         ids=["empty_rows", "sink_empty_rows"])
def test_gradcheck_with_rows_that_see_no_key(spec: Any, n_q: int, n_k: int) -> None:
    checked = spec if isinstance(spec, attndsl.ir.Spec) else attndsl.parse(spec)
    a = make_inputs(checked, n_q=n_q, n_k=n_k, d=3, dv=2)
    out, lse = at.attention(checked, a["q"], a["k"], a["v"], return_lse=True, **a["extra"])
    empty = lse[:, :, :3] if n_q == 7 else lse[:, :, -3:]  # rows 130-132 (window 128)
    if n_q == 7:
        assert torch.isneginf(empty).all() and (out[:, :, :3] == 0).all()
    else:
        torch.testing.assert_close(empty, a["extra"]["sink"][None, :, None].expand_as(empty)
                                   .detach())
    assert torch.autograd.gradcheck(as_function(checked, a), differentiable(a), fast_mode=True)


MASKED = sorted(name for name, spec in SPECS.items() if spec.mask is not None)
# (k_offset, how many first rows then see no key): keys placed after the first query rows;
# the 2-D window (16 pixels a row) sees keys two image rows down (columns 3-8) only from
# columns 1 and up
EMPTYING = {"spatial_window": (35, 1)}


@pytest.mark.parametrize("name", MASKED)
def test_gradcheck_on_every_masked_example_with_rows_that_see_no_key(name: str) -> None:
    """Every example with a mask, with the keys shifted so that the first query rows see no
    key (out = 0 there; lse = -inf, or the sink), GQA, float64: gradcheck through out and lse.
    A spec whose positions must coincide (it reads n, or runs causal prefix sums) always lets
    a row see its own key: there, that property is what is checked."""
    spec = SPECS[name]
    a = make_inputs(spec, n_q=7, n_k=6)
    linear = attndsl.plan.make_plan(spec).linear
    if uses_n(spec) or (linear is not None and linear.causal):
        out, lse = at.attention(spec, a["q"], a["k"], a["v"], return_lse=True, q_offset=3,
                                k_offset=3, **a["extra"])
        with pytest.raises(ValueError, match="offset"):
            at.attention(spec, a["q"], a["k"], a["v"], q_offset=0, k_offset=3, **a["extra"])
        assert lse is None or torch.isfinite(lse).all()
        return
    shift, rows = EMPTYING.get(name, (3, 3))
    out, lse = at.attention(spec, a["q"], a["k"], a["v"], return_lse=True, k_offset=shift,
                            **a["extra"])
    assert (out[:, :, :rows] == 0).all() and (out[:, :, rows:].abs().sum(-1) > 0).all()
    if "sink" not in a["extra"]:
        assert torch.isneginf(lse[:, :, :rows]).all() and torch.isfinite(lse[:, :, rows:]).all()
    names = [n for n, t in a["extra"].items() if t.is_floating_point()]
    indices = {n: t for n, t in a["extra"].items() if not t.is_floating_point()}

    def shifted(q, k, v, *params):  # type: ignore[no-untyped-def]
        out, lse = at.attention(spec, q, k, v, return_lse=True, k_offset=shift,
                                **dict(zip(names, params)), **indices)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(shifted, differentiable(a), fast_mode=True)


# ---- what the op promises -------------------------------------------------------------------


def test_matches_the_kernel_and_gradients_reach_params_and_inputs() -> None:
    spec = SPECS["forgetting"]  # input c[heads, n]: gets a gradient
    a = make_inputs(spec, dtype=torch.float64)
    out, lse = at.attention(spec, a["q"], a["k"], a["v"], return_lse=True, **a["extra"])
    kernel = attndsl.compile(spec, target="cpu")
    arrays = {n: t.detach().numpy() for n, t in a["extra"].items()}
    want, want_lse = kernel.forward(*(a[n].detach().numpy() for n in "qkv"), return_lse=True,
                                    **arrays)
    np.testing.assert_array_equal(out.detach().numpy(), want)
    np.testing.assert_array_equal(lse.detach().numpy(), want_lse)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.autograd.backward([out, lse], [dout, dlse])
    grads = kernel.backward(*(a[n].detach().numpy() for n in "qkv"), dout.numpy(),
                            dlse=dlse.numpy(), **arrays)
    for name in ("q", "k", "v"):
        np.testing.assert_array_equal(a[name].grad.numpy(), grads[name])
    np.testing.assert_array_equal(a["extra"]["c"].grad.numpy(), grads["c"])


@pytest.mark.parametrize("q_offset", [5, [9, 2], torch.tensor([9, 2])], ids=["int", "list",
                                                                             "tensor"])
def test_offsets_match_the_kernel_and_pass_gradcheck(q_offset: Any) -> None:
    """A block of query rows at global positions (a KV cache): alibi's bias and causal mask
    read i = q_offset + row."""
    spec = SPECS["alibi"]
    a = make_inputs(spec, n_q=3, n_k=11)
    out = at.attention(spec, a["q"], a["k"], a["v"], q_offset=q_offset, **a["extra"])
    kernel = attndsl.compile(spec, target="cpu")
    offset = np.asarray(q_offset)
    want = kernel.forward(*(a[n].detach().numpy() for n in "qkv"), q_offset=offset,
                          slope=a["extra"]["slope"].detach().numpy())
    np.testing.assert_array_equal(out.detach().numpy(), want)
    assert not torch.equal(out, at.attention(spec, a["q"], a["k"], a["v"], **a["extra"]))

    def shifted(q, k, v, slope):  # type: ignore[no-untyped-def]
        return at.attention(spec, q, k, v, return_lse=True, q_offset=q_offset, slope=slope)

    assert torch.autograd.gradcheck(shifted, differentiable(a), fast_mode=True)


def test_gradients_are_bitwise_deterministic() -> None:
    spec = SPECS["relative_bias"]  # a learned table: its gradient is a scatter over pairs
    a = make_inputs(spec, dtype=torch.float32, n_q=157, B=2, d=16, dv=16)
    runs = []
    for _ in range(3):
        for t in differentiable(a):
            t.grad = None
        out = at.attention(spec, a["q"], a["k"], a["v"], **a["extra"])
        out.backward(torch.ones_like(out))
        runs.append([t.grad.clone() for t in differentiable(a)])
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            assert torch.equal(first, again)


def test_no_copies_for_contiguous_float_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SPECS["causal"]
    a = make_inputs(spec, dtype=torch.float32)
    seen: dict[str, Any] = {}
    kernel = ops.ENTRIES[ops.spec_handle(spec)].kernel(torch.device("cpu"))
    forward = kernel.forward

    def spy(q, k, v, **kw):  # type: ignore[no-untyped-def]
        seen["q"] = q
        seen["out"], seen["lse"] = forward(q, k, v, **kw)
        return seen["out"], seen["lse"]

    monkeypatch.setattr(kernel, "forward", spy)
    out, lse = at.attention(spec, a["q"], a["k"], a["v"], return_lse=True)
    assert seen["q"].ctypes.data == a["q"].data_ptr()  # q reached the kernel in place
    assert out.data_ptr() == seen["out"].ctypes.data  # out is the kernel's array
    assert lse.data_ptr() == seen["lse"].ctypes.data
    strided = a["q"].detach().transpose(2, 3).contiguous().transpose(2, 3)  # not C-order
    torch.testing.assert_close(at.attention(spec, strided, a["k"], a["v"]), out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype: torch.dtype) -> None:
    spec = SPECS["alibi"]
    a = make_inputs(spec, dtype=torch.float32)
    half = {n: a[n].detach().to(dtype).requires_grad_(True) for n in "qkv"}
    out, lse = at.attention(spec, *half.values(), return_lse=True, **a["extra"])
    assert out.dtype == dtype and lse.dtype == torch.float32
    want = at.attention(spec, *(half[n].detach().float() for n in "qkv"), **a["extra"])
    torch.testing.assert_close(out, want.to(dtype))
    out.float().sum().backward()
    assert all(half[n].grad.dtype == dtype for n in "qkv")
    assert a["extra"]["slope"].grad.dtype == torch.float32


def test_lse_is_none_for_other_normalizers_and_scalars_may_be_numbers() -> None:
    a = make_inputs(SPECS["sigmoid"])
    out, lse = at.attention(SPECS["sigmoid"], a["q"], a["k"], a["v"], return_lse=True)
    assert lse is None and out.shape == (2, 4, 7, 2)
    b = make_inputs(SPECS["cosine"])
    got = at.attention(EXAMPLES / "cosine.attn", b["q"], b["k"], b["v"], tau=0.75)
    want = at.attention(SPECS["cosine"], b["q"], b["k"], b["v"],
                        tau=torch.tensor(0.75, dtype=torch.float64))
    torch.testing.assert_close(got, want)


def test_call_errors() -> None:
    spec = SPECS["alibi"]
    a = make_inputs(spec)
    q, k, v = a["q"], a["k"], a["v"]
    with pytest.raises(TypeError, match="missing argument slope"):
        at.attention(spec, q, k, v)
    with pytest.raises(TypeError, match="unexpected argument slop; the spec declares slope"):
        at.attention(spec, q, k, v, slope=a["extra"]["slope"], slop=1)
    with pytest.raises(TypeError, match="share one float dtype"):
        at.attention(spec, q.float(), k, v, **a["extra"])
    with pytest.raises(ValueError, match="q_offset: positions start at 0"):
        at.attention(spec, q, k, v, q_offset=-3, **a["extra"])
    with pytest.raises(ValueError, match=r"k: expected shape"):
        at.attention(spec, q, k[:, :, :, :2], v, **a["extra"])
    # values torch cannot convert, and a q with 3 dimensions, which the fake op would unpack
    # (under torch.compile) before the kernel could name it; with fullgraph=True dynamo wraps
    # the ValueError in its Unsupported error, which quotes it
    with pytest.raises(TypeError, match="slope: expected a float tensor, array or number, "
                                        "got NoneType"):
        at.attention(spec, q, k, v, slope=None)
    with pytest.raises(TypeError, match="doc: expected an integer tensor or array, got str"):
        at.attention(SPECS["document"], q, k, v, doc="0,0,1")
    wrong = r"q: expected 4 dimensions \[B, heads, n_q, d\], got shape \[8, 7, 3\]"
    with pytest.raises(ValueError, match=wrong):
        at.attention(spec, q[0], k, v, **a["extra"])
    with pytest.raises(Exception, match=wrong):
        torch.compile(at.attention, fullgraph=True)(spec, q[0], k, v, **a["extra"])


def test_a_compiled_kernel_may_stand_for_its_spec() -> None:
    numpy_kernel = attndsl.compile(EXAMPLES / "causal.attn", target="numpy")
    a = make_inputs(numpy_kernel.spec)
    out = at.attention(numpy_kernel, a["q"], a["k"], a["v"])
    torch.testing.assert_close(out, at.attention(SPECS["causal"], a["q"], a["k"], a["v"]))
    handle = ops.spec_handle(numpy_kernel)
    assert ops.ENTRIES[handle].kernels == {"numpy": numpy_kernel}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_cuda_tensors_run_the_cuda_target_and_agree_with_cpu() -> None:
    spec = SPECS["sliding_window_sink"]
    a = make_inputs(spec, dtype=torch.float64)
    cuda = {n: t.detach().cuda().requires_grad_(True) for n, t in
            (("q", a["q"]), ("k", a["k"]), ("v", a["v"]), ("sink", a["extra"]["sink"]))}
    out, lse = at.attention(spec, a["q"], a["k"], a["v"], return_lse=True, **a["extra"])
    got, got_lse = at.attention(spec, cuda["q"], cuda["k"], cuda["v"], return_lse=True,
                                sink=cuda["sink"])
    assert got.is_cuda and got_lse.is_cuda
    torch.testing.assert_close(got.cpu(), out)
    torch.testing.assert_close(got_lse.cpu(), lse)
    (out.sum() + lse.sum()).backward()
    (got.sum() + got_lse.sum()).backward()
    for name, t in cuda.items():
        want = a[name].grad if name in a else a["extra"][name].grad
        torch.testing.assert_close(t.grad.cpu(), want, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_cuda_op_runs_on_the_current_stream_without_synchronizing() -> None:
    """On a side stream, the op is ordered after the work queued before it on that stream
    (q is written there just before the call) and its results are ready for the next op."""
    spec = SPECS["causal"]
    a = make_inputs(spec, dtype=torch.float32)
    want = at.attention(spec, a["q"] * 2, a["k"], a["v"])
    side = torch.cuda.Stream()
    q, k, v = (a[n].detach().cuda() for n in ("q", "k", "v"))
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keeps the side stream busy: a race would show
        q2 = q * 2
        got = at.attention(spec, q2, k, v)
        result = (got * 1).cpu()  # queued on the side stream too
    torch.testing.assert_close(result, want, rtol=1e-5, atol=1e-5)


# ---- the module --------------------------------------------------------------------------


def test_module_owns_params_with_the_documented_defaults() -> None:
    torch.manual_seed(0)
    alibi = at.Attention(EXAMPLES / "alibi.attn")
    assert [n for n, _ in alibi.named_parameters()] == ["slope"]
    assert torch.equal(alibi.slope.detach(), torch.zeros(8))
    cosine = at.Attention(EXAMPLES / "cosine.attn")
    assert cosine.tau.shape == () and cosine.tau.item() == 1.0
    bahdanau = at.Attention(EXAMPLES / "bahdanau.attn", d=5, r=7)
    assert bahdanau.Wq.shape == (5, 7) and bahdanau.w.shape == (7,)
    assert 0.2 < bahdanau.Wq.std().item() < 0.7  # 1 / sqrt(5)
    given = at.Attention(EXAMPLES / "bahdanau.attn", Wq=torch.ones(5, 4), d=5)
    assert given.Wk.shape == (5, 4) and torch.equal(given.Wq.detach(), torch.ones(5, 4))
    with pytest.raises(TypeError, match=r"Wa\[d, d\]: its shape needs d; pass d=\.\.\. or an "
                                        r"initial value Wa=\.\.\."):
        at.Attention(EXAMPLES / "luong_general.attn")
    with pytest.raises(ValueError, match="heads: the spec has heads 8, got 4"):
        at.Attention(EXAMPLES / "alibi.attn", heads=4)
    with pytest.raises(TypeError, match="unexpected argument c; inputs and index arrays are "
                                        "passed to forward"):
        at.Attention(EXAMPLES / "forgetting.attn", c=torch.zeros(1, 1, 1))


def test_module_builds_every_example_from_sizes_alone() -> None:
    """The documented rule (shape from dims: the spec's heads, literals, keyword sizes) covers
    every example; forward then runs with inputs and index arrays only."""
    for name, spec in SPECS.items():
        a = make_inputs(spec)  # float64, as the gradchecks (their kernels); params float32
        uses_r = any("r" in p.dims for p in spec.params if not p.batched)
        sizes = {"d": 3} | ({"r": 3} if uses_r else {}) | ({} if spec.heads else {"heads": 4})
        layer = at.Attention(spec, **sizes)
        extra = {n: t for n, t in a["extra"].items() if n not in layer.names}
        out = layer(a["q"], a["k"], a["v"], **extra)
        out.sum().backward()
        for p in layer.parameters():
            assert p.grad is not None and p.grad.shape == p.shape, name


def test_module_trains_its_params_and_takes_inputs_at_call_time() -> None:
    layer = at.Attention(EXAMPLES / "sliding_window_sink.attn", sink=torch.full((4,), 0.5))
    a = make_inputs(layer.spec, dtype=torch.float32)
    out = layer(a["q"], a["k"], a["v"])
    out.square().sum().backward()
    assert layer.sink.grad is not None and layer.sink.grad.abs().sum() > 0
    forgetting = at.Attention(EXAMPLES / "forgetting.attn")
    b = make_inputs(forgetting.spec, dtype=torch.float32)
    out = forgetting(b["q"], b["k"], b["v"], c=b["extra"]["c"])
    out.sum().backward()
    assert b["extra"]["c"].grad.shape == b["extra"]["c"].shape
    with pytest.raises(TypeError, match="sink: owned by the module"):
        layer(a["q"], a["k"], a["v"], sink=torch.zeros(4))


# ---- torch.compile ----------------------------------------------------------------------------


SOFTCAP = EXAMPLES / "softcap.attn"  # built outside the compiled code: dynamo does not trace Path


class TwoSpecs(torch.nn.Module):
    """A projection, an ALiBi layer and a softcap spec: one graph, no break."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(5, 5)
        self.alibi = at.Attention(EXAMPLES / "alibi.attn", slope=torch.linspace(0.1, 0.8, 8))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.proj(x)
        return self.alibi(q, k, v) * at.attention(SOFTCAP, q, k, v)


def test_torch_compile_fullgraph_matches_eager_without_recompiling(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = TwoSpecs()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    calls: list[Any] = []
    compile_spec = attndsl.compile

    def counted(*args: Any, **kwargs: Any) -> attndsl.Kernel:
        calls.append(args)
        return compile_spec(*args, **kwargs)

    monkeypatch.setattr(attndsl, "compile", counted)
    signatures, compiled_after = [], []
    try:
        for n in (13, 29, 22):
            x, k, v = torch.randn(1, 8, n, 5), torch.randn(1, 2, n, 5), torch.randn(1, 2, n, 3)
            results = [outputs_and_grads(f, model, x, k, v) for f in (compiled, model)]
            for got, want in zip(*results):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            # traced once with dynamic sizes: another n must not recompile anything
            torch.compiler.set_stance("fail_on_recompile")
            compiled_after.append(len(calls))
            signatures.append(numba_signatures())
    finally:
        torch.compiler.set_stance("default")
    assert signatures[0] == signatures[1] == signatures[2]  # no Numba compilation either
    assert compiled_after[0] <= 2 and compiled_after[0] == compiled_after[2]  # once per spec


def outputs_and_grads(f: Any, model: TwoSpecs, x: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> list[torch.Tensor]:
    """out of f (the model, compiled or not), and the gradients of sum(out^2) for the slopes
    and the projection."""
    params = [model.alibi.slope, model.proj.weight]
    for p in params:
        p.grad = None
    out = f(x, k, v)
    out.square().sum().backward()
    return [out.detach()] + [p.grad.clone() for p in params]


def numba_signatures() -> list[int]:
    """How many signatures Numba compiled for the alibi and softcap CPU kernels."""
    kernels = [e.kernels["cpu"] for e in ops.ENTRIES.values()
               if e.spec.name in ("alibi", "softcap") and "cpu" in e.kernels]
    return [len(m._attn_fwd.signatures) + len(m._attn_bwd.signatures)
            for kern in kernels for m in kern.modules.values()]
