"""attndsl kernels as PyTorch operators: `torch.library.custom_op` forward and backward,
`register_fake` for both (shapes only: `torch.compile(fullgraph=True)` traces through),
`register_autograd` wiring them (docs/torch.md).

One pair of ops serves every spec: the spec travels as a handle, a string naming an entry of
this process's registry, which holds the spec and its kernels (compiled once per spec and
target; the CPU kernels once more per dtype, by Numba, whatever the sizes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import attndsl
from attndsl import ir
from attndsl.check import check
from attndsl.runtime.kernel import check_names

FLOATS = (torch.float32, torch.float64)  # what the kernels compute in
ARGS = ("str handle, Tensor q, Tensor k, Tensor v, Tensor[] params, Tensor[] indices, "
        "Tensor q_offset, Tensor k_offset")
FORWARD_SCHEMA = f"({ARGS}) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = (f"({ARGS}, Tensor out, Tensor lse, Tensor dout, Tensor? dlse) "
                   "-> (Tensor, Tensor, Tensor, Tensor[])")


# ---- the registry: handle -> spec and its kernels ---------------------------------------------


@dataclasses.dataclass
class Entry:
    """A registered spec: its argument names in the op's order, and its kernels by target."""

    spec: ir.Spec
    cpu_target: str  # "cpu", or the target of a Kernel given instead of a spec ("numpy")
    kernels: dict[str, attndsl.Kernel] = dataclasses.field(default_factory=dict)

    @property
    def params(self) -> tuple[str, ...]:
        """Every param and input, in the spec's order (the op's `params` list)."""
        return tuple(p.name for p in self.spec.params)

    @property
    def indices(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.spec.indices)

    @property
    def softmax(self) -> bool:
        return self.spec.normalize.kind is ir.NormKind.SOFTMAX

    def kernel(self, device: torch.device) -> attndsl.Kernel:
        target = "cuda" if device.type == "cuda" else self.cpu_target
        if device.type not in ("cpu", "cuda"):
            raise TypeError(f"q: attndsl runs on CPU and CUDA tensors, got a tensor on {device}")
        if target not in self.kernels:
            self.kernels[target] = attndsl.compile(self.spec, target=target)
        return self.kernels[target]


ENTRIES: dict[str, Entry] = {}
_HANDLES: dict[Any, str] = {}  # a spec's text or path (or id of a spec or kernel) -> handle
_KEEP: list[Any] = []  # the spec and kernel objects keyed by id above, kept alive


def _checked(spec: Any) -> tuple[ir.Spec, attndsl.Kernel | None]:
    """A checked spec from a spec, a compiled Kernel (whose target then serves CPU tensors),
    spec text, or a path to a .attn file."""
    if isinstance(spec, attndsl.Kernel):
        return spec.spec, spec
    if isinstance(spec, ir.Spec):
        return (spec if spec.checked else check(spec)), None
    if isinstance(spec, Path) or (isinstance(spec, str) and "{" not in spec):
        return attndsl.load(spec), None
    if isinstance(spec, str):
        return attndsl.parse(spec), None
    raise TypeError(f"spec: expected an attndsl spec, a compiled Kernel, spec text or a path, "
                    f"got {type(spec).__name__}")


@torch.compiler.assume_constant_result
def spec_handle(spec: Any) -> str:
    """The handle of a spec (registered on first sight): a constant while tracing. A path is
    read once per process."""
    key = (type(spec).__name__, id(spec)) if not isinstance(spec, (str, Path)) else \
        (type(spec).__name__, str(spec))
    if key in _HANDLES:
        return _HANDLES[key]
    checked, kernel = _checked(spec)
    cpu_target = "cpu" if kernel is None or kernel.target == "cuda" else kernel.target
    digest = hashlib.sha256(repr(checked).encode()).hexdigest()[:16]
    handle = f"{checked.name}-{digest}-{cpu_target}"
    if handle not in ENTRIES:
        ENTRIES[handle] = Entry(checked, cpu_target)
    if kernel is not None:  # a compiled kernel serves its own target
        ENTRIES[handle].kernels.setdefault(kernel.target, kernel)
    if not isinstance(spec, (str, Path)):
        _KEEP.append(spec)  # so that its id is never reused by another object
    _HANDLES[key] = handle
    return handle


@torch.compiler.assume_constant_result
def spec_names(handle: str) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(params and inputs, indices, softmax?) of a registered spec: constants while tracing."""
    entry = ENTRIES[handle]
    return entry.params, entry.indices, entry.softmax


# ---- tensors <-> arrays, without copies ---------------------------------------------------------


def as_array(t: torch.Tensor) -> Any:
    """The kernel's view of a tensor: a NumPy array sharing its memory (CPU), or the CUDA tensor
    itself (`__cuda_array_interface__`); a non-contiguous tensor is made contiguous once."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t if t.is_cuda else t.numpy()


def as_tensor(a: Any, device: torch.device, taken: list[Any]) -> torch.Tensor:
    """A kernel result as a tensor sharing its memory, on `device`. `taken` holds the arrays
    of the call's inputs and earlier results: a result that overlaps one is copied (an op's
    outputs may not alias its inputs or each other)."""
    if hasattr(a, "__cuda_array_interface__"):  # a device array of the cuda target
        return torch.as_tensor(a, device="cuda").to(device)
    a = np.asarray(a)
    if (not a.flags.writeable or not a.flags.c_contiguous
            or any(np.may_share_memory(a, b) for b in taken)):
        a = a.copy()
    taken.append(a)
    return torch.from_numpy(a).to(device)  # .to: no copy on the CPU


@contextlib.contextmanager
def _ordered(q: torch.Tensor) -> Iterator[None]:
    """The cuda target's copies and launches go on PyTorch's current stream of q's device, so
    the op is ordered with the work around it like any PyTorch op (no device synchronization)."""
    if not q.is_cuda:
        yield
        return
    from numba import cuda

    from attndsl.runtime.cuda_kernel import launch_stream

    current = torch.cuda.current_stream(q.device)
    with cuda.gpus[q.device.index or 0], launch_stream(cuda.external_stream(current.cuda_stream)):
        yield


def _arguments(entry: Entry, params: list[torch.Tensor], indices: list[torch.Tensor],
               q_offset: torch.Tensor, k_offset: torch.Tensor) -> dict[str, Any]:
    if len(params) != len(entry.params) or len(indices) != len(entry.indices):
        raise TypeError(f"{entry.spec.name}: the op takes {len(entry.params)} params "
                        f"({', '.join(entry.params) or 'none'}) and {len(entry.indices)} index "
                        f"arrays ({', '.join(entry.indices) or 'none'}), got {len(params)} and "
                        f"{len(indices)}")
    arrays = dict(zip(entry.params, map(as_array, params)))
    arrays.update(zip(entry.indices, map(as_array, indices)))
    # offsets are read on the host (as index arrays are), whatever q's device
    arrays.update(q_offset=q_offset.detach().cpu().numpy(),
                  k_offset=k_offset.detach().cpu().numpy())
    return arrays


# ---- the ops -----------------------------------------------------------------------------------


@torch.library.custom_op("attndsl::attention", mutates_args=(), schema=FORWARD_SCHEMA)
def attention_op(handle: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 params: list[torch.Tensor], indices: list[torch.Tensor],
                 q_offset: torch.Tensor, k_offset: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, heads, n_q, dv] and lse [B, heads, n_q] (softmax; else an empty tensor)."""
    entry = ENTRIES[handle]
    arrays = [as_array(q), as_array(k), as_array(v)]
    with _ordered(q):
        out, lse = entry.kernel(q.device).forward(arrays[0], arrays[1], arrays[2],
                                                  return_lse=True,
                                                  **_arguments(entry, params, indices,
                                                               q_offset, k_offset))
    taken = arrays if not q.is_cuda else []
    out_t = as_tensor(out, q.device, taken)
    lse_t = as_tensor(lse, q.device, taken) if lse is not None else q.new_empty((0,))
    return out_t, lse_t


@attention_op.register_fake
def _attention_fake(handle: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    params: list[torch.Tensor], indices: list[torch.Tensor],
                    q_offset: torch.Tensor, k_offset: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    B, heads, n_q, _ = q.shape
    lse_shape = (B, heads, n_q) if ENTRIES[handle].softmax else (0,)
    return q.new_empty((B, heads, n_q, v.shape[3])), q.new_empty(lse_shape)


@torch.library.custom_op("attndsl::attention_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def attention_backward_op(handle: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          params: list[torch.Tensor], indices: list[torch.Tensor],
                          q_offset: torch.Tensor, k_offset: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Gradients of sum(out * dout) + sum(lse * dlse): q, k, v, and every param and input."""
    entry = ENTRIES[handle]
    arrays = [as_array(q), as_array(k), as_array(v)]
    softmax = entry.softmax
    with _ordered(q):
        grads = entry.kernel(q.device).backward(
            arrays[0], arrays[1], arrays[2], as_array(dout), out=as_array(out),
            lse=as_array(lse) if softmax else None,
            dlse=as_array(dlse) if softmax and dlse is not None else None,
            **_arguments(entry, params, indices, q_offset, k_offset))
    taken = arrays if not q.is_cuda else []
    dq, dk, dv = (as_tensor(grads[n], q.device, taken) for n in ("q", "k", "v"))
    return dq, dk, dv, [as_tensor(grads[n], p.device, taken) for n, p in
                        zip(entry.params, params)]


@attention_backward_op.register_fake
def _attention_backward_fake(handle: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             params: list[torch.Tensor], indices: list[torch.Tensor],
                             q_offset: torch.Tensor, k_offset: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                        list[torch.Tensor]]:
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            [torch.empty_like(p) for p in params])


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    handle, q, k, v, params, indices, q_offset, k_offset = inputs
    out, lse = output
    ctx.handle, ctx.n_params = handle, len(params)
    # an output the loss does not use (lse, mostly) gets None, not a tensor of zeros: no
    # torch op between the kernels wakes torch's thread pool, whose spinning threads then
    # compete with the kernels' for the cores (6.6% at N = 2048 on 2 cores)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, q_offset, k_offset, out, lse, *params, *indices)


def _backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[Any, ...]:
    q, k, v, q_offset, k_offset, out, lse, *rest = ctx.saved_tensors
    params, indices = rest[:ctx.n_params], rest[ctx.n_params:]
    if dout is None:
        dout = torch.zeros_like(out)
    if not ENTRIES[ctx.handle].softmax:
        dlse = None  # lse is an empty placeholder: nothing flows through it
    dq, dk, dv, dparams = attention_backward_op(ctx.handle, q, k, v, params, indices,
                                                q_offset, k_offset, out, lse, dout, dlse)
    # index arrays and offsets: never a gradient
    return None, dq, dk, dv, list(dparams), [None] * len(indices), None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the functional API ------------------------------------------------------------------------


def attention(spec: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              return_lse: bool = False, q_offset: Any = 0, k_offset: Any = 0,
              **params_and_indices: Any) -> Any:
    """Differentiable attention of `spec` (an attndsl spec, a compiled Kernel, spec text or a
    path) on torch tensors shaped as LANGUAGE.md section 1: out, or (out, lse) with
    `return_lse=True` (lse is None for normalizers other than softmax).

    Gradients flow into q, k, v, every param and `input` tensor that requires grad, and from
    lse (softmax family). float32 and float64 tensors go to the kernels without copies;
    float16 and bfloat16 are computed in float32 and out returns in the input dtype (lse stays
    float32). CPU tensors run the `cpu` target (or the given Kernel's), CUDA tensors `cuda`.
    `q_offset` and `k_offset` (ints, or int tensors [B]) make i and j global positions, as in
    `Kernel.forward`; a tensor offset changes without retracing under torch.compile.
    """
    return apply(spec_handle(spec), q, k, v, return_lse=return_lse, q_offset=q_offset,
                 k_offset=k_offset, **params_and_indices)


def apply(handle: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
          return_lse: bool = False, q_offset: Any = 0, k_offset: Any = 0,
          **params_and_indices: Any) -> Any:
    """`attention` for a registered spec's handle (what a module calls on every forward)."""
    names, index_names, softmax = spec_names(handle)
    check_names(names + index_names, params_and_indices)
    for name, t, dims in (("q", q, "B, heads, n_q, d"), ("k", k, "B, kv_heads, n_k, d"),
                          ("v", v, "B, kv_heads, n_k, dv")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a float tensor, got {t.dtype}")
        if t.dim() != 4:  # here, not only in the kernel: the fake op unpacks q's shape
            raise ValueError(f"{name}: expected 4 dimensions [{dims}], got shape "
                             f"{list(t.shape)}")  # list(): dynamo traces no str(int)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one float dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    compute = q.dtype if q.dtype in FLOATS else torch.float32
    params = [_param(n, params_and_indices[n], compute, q.device) for n in names]
    indices = [_index(n, params_and_indices[n]) for n in index_names]
    # made contiguous here, once: the op saves these for the backward
    q_, k_, v_ = (t.to(compute).contiguous() for t in (q, k, v))
    offsets = [_offset(x) for x in (q_offset, k_offset)]
    out, lse = attention_op(handle, q_, k_, v_, params, indices, *offsets)
    out = out.to(q.dtype)
    return (out, lse if softmax else None) if return_lse else out


def _param(name: str, value: Any, compute: torch.dtype, device: torch.device) -> torch.Tensor:
    """A param or input as the op takes it: a float tensor (a number becomes a 0-d tensor;
    float16/bfloat16 and integers are computed in `compute`, gradients cast back by autograd)."""
    if not isinstance(value, torch.Tensor):
        try:
            return torch.as_tensor(value, dtype=compute, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name}: expected a float tensor, array or number, got "
                            f"{type(value).__name__}") from None
    if value.is_complex():
        raise TypeError(f"{name}: expected a float tensor, got {value.dtype}")
    return value if value.dtype in FLOATS else value.to(compute)


def _index(name: str, value: Any) -> torch.Tensor:
    """An index array as the op takes it (the kernel checks its dtype and shape)."""
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected an integer tensor or array, got "
                        f"{type(value).__name__}") from None


def _offset(value: Any) -> torch.Tensor:
    """q_offset or k_offset as the op takes it: an integer tensor ([] or [B]), on the CPU."""
    if isinstance(value, torch.Tensor):
        return value if not value.is_cuda else value.cpu()
    return torch.as_tensor(value)

