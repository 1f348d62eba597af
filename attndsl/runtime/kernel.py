"""Kernel: validates arrays (LANGUAGE.md 6), brings them to one canonical form, launches.

Every target shares this validation, so a wrong array gets the same clear error everywhere
and never reaches a kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import ir
from ..check import uses_n

FLOATS = (np.float32, np.float64)


@dataclass
class Call:
    """Validated, canonical arguments of one call."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    params: dict[str, np.ndarray]
    indices: dict[str, np.ndarray]
    sizes: dict[str, int]
    dtype: np.dtype
    param_dtypes: dict[str, np.dtype] = field(default_factory=dict)
    # position i = q_offset[b] + query row, j = k_offset[b] + key column (int64 [B])
    q_offset: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    k_offset: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    @property
    def offsets(self) -> dict[str, np.ndarray]:
        return {"q_offset": self.q_offset, "k_offset": self.k_offset}

    @property
    def shifted(self) -> bool:
        return bool(self.q_offset.any() or self.k_offset.any())

    @property
    def shape_out(self) -> tuple[int, ...]:
        s = self.sizes
        return (s["B"], s["heads"], s["n_q"], s["dv"])

    def arrays(self) -> list[np.ndarray]:
        return [self.q, self.k, self.v, *self.params.values(), *self.indices.values()]


def _offset(name: str, value: Any, B: int) -> np.ndarray:
    """q_offset or k_offset as int64 [B]: an integer, or integers of shape [B]."""
    if type(value) is int and 0 <= value < 2**63:  # the usual call, in 1 us instead of 14
        return np.full(B, value, np.int64)
    a = np.asarray(value)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer or an integer array of shape [{B}], got "
                        f"{a.dtype}")
    if a.shape not in ((), (B,)):
        raise ValueError(f"{name}: expected an integer or shape [{B}] (one per batch), got shape "
                         f"{_shape(a.shape)}")
    if (a < 0).any():
        raise ValueError(f"{name}: positions start at 0, got an offset of {int(a.min())}")
    # a writeable copy: a read-only view would compile a second Numba signature
    return np.array(np.broadcast_to(a.astype(np.int64), (B,)))


def check_names(declared: Sequence[str], given: Mapping[str, Any]) -> None:
    """Every declared param and index given by keyword, and nothing else (a TypeError)."""
    unexpected = sorted(set(given) - set(declared))
    if unexpected:
        raise TypeError(f"unexpected argument{'s' if len(unexpected) > 1 else ''} "
                        f"{', '.join(unexpected)}; the spec declares "
                        f"{', '.join(declared) or 'no params or indices'}")
    missing = [n for n in declared if n not in given]
    if missing:
        raise TypeError(f"missing argument{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} (declared in the spec)")


def check_linear_offsets(linear: bool, causal: bool, call: Call) -> None:
    """The linear path's causal prefix sums pair row r with keys 0..r: shifted positions keep
    that only when q_offset == k_offset (a query block against a longer key range does not)."""
    if linear and causal and not np.array_equal(call.q_offset, call.k_offset):
        raise ValueError("causal linear attention (the prefix-sum path) needs q_offset == "
                         "k_offset; got q_offset "
                         f"{call.q_offset.tolist()} and k_offset {call.k_offset.tolist()}")


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _as_array(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "__cuda_array_interface__") and not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: a device array was given to a CPU target; pass a NumPy array")
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{name}: expected an array, got {type(value).__name__}") from exc


class Validator:
    """Checks q, k, v, params and indices against one spec."""

    def __init__(self, spec: ir.Spec) -> None:
        self.spec = spec
        self.uses_n = uses_n(spec)

    def __call__(self, q: Any, k: Any, v: Any, extra: Mapping[str, Any], q_offset: Any = 0,
                 k_offset: Any = 0) -> Call:
        q, k, v = (_as_array(n, a) for n, a in (("q", q), ("k", k), ("v", v)))
        for name, a in (("q", q), ("k", k), ("v", v)):
            if a.dtype.type not in FLOATS:
                raise TypeError(f"{name}: expected float32 or float64, got {a.dtype}")
            if a.ndim != 4:
                what = {"q": "[B, heads, n_q, d]", "k": "[B, kv_heads, n_k, d]",
                        "v": "[B, kv_heads, n_k, dv]"}[name]
                raise ValueError(f"{name}: expected 4 dimensions {what}, got shape "
                                 f"{_shape(a.shape)}")
        if not q.dtype == k.dtype == v.dtype:
            raise TypeError(f"q, k and v must share one float dtype, got {q.dtype}, {k.dtype}, "
                            f"{v.dtype}")
        B, heads, n_q, d = q.shape
        kv_heads, n_k = k.shape[1], k.shape[2]
        dv = v.shape[3]
        need_k = (B, kv_heads, n_k, d)
        if k.shape[0] != B or k.shape[3] != d:
            raise ValueError(f"k: expected shape {_shape(need_k)} (B and d of q), got "
                             f"{_shape(k.shape)}")
        if v.shape[:3] != (B, kv_heads, n_k):
            raise ValueError(f"v: expected shape {_shape((B, kv_heads, n_k, dv))} (B, kv_heads "
                             f"and n_k of k), got {_shape(v.shape)}")
        # zero-size inputs are rejected (not an empty result): before kv_heads divides heads
        for name, a in (("q", q), ("k", k), ("v", v)):
            if 0 in a.shape:
                raise ValueError(f"{name}: every size must be at least 1, got shape "
                                 f"{_shape(a.shape)} (empty input: q {_shape(q.shape)}, "
                                 f"k {_shape(k.shape)}, v {_shape(v.shape)})")
        self._check_heads(q, k, heads, kv_heads)
        if self.uses_n and n_q != n_k:
            raise ValueError(f"the spec uses 'n', which needs n_q == n_k; got q with n_q = {n_q} "
                             f"and k with n_k = {n_k}")
        offsets = {name: _offset(name, value, B) for name, value in
                   (("q_offset", q_offset), ("k_offset", k_offset))}
        if self.uses_n and not np.array_equal(offsets["q_offset"], offsets["k_offset"]):
            raise ValueError("the spec uses 'n' (one sequence: queries and keys at the same "
                             "positions), which needs q_offset == k_offset; for a query block "
                             "against a longer key range declare per-side arrays [n_q] and [n_k]")
        sizes = {"B": B, "heads": heads, "kv_heads": kv_heads, "n_q": n_q, "n_k": n_k, "d": d,
                 "dv": dv, "n": n_q}
        params, dtypes, indices = self._extras(extra, sizes, q.dtype)
        _check_softcap(self.spec, params, sizes)
        return Call(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v),
                    params, indices, sizes, q.dtype, dtypes, **offsets)

    def _check_heads(self, q: np.ndarray, k: np.ndarray, heads: int, kv_heads: int) -> None:
        spec = self.spec
        if spec.heads is not None and heads != spec.heads:
            raise ValueError(f"q: the spec has heads {spec.heads}, got q with shape "
                             f"{_shape(q.shape)} ({heads} heads)")
        want_kv = spec.kv_heads if spec.kv_heads is not None else (
            spec.heads if spec.heads is not None else None)
        if want_kv is not None and kv_heads != want_kv:
            raise ValueError(f"k: the spec has kv_heads {want_kv}, got k with shape "
                             f"{_shape(k.shape)} ({kv_heads} heads)")
        if heads % kv_heads:
            raise ValueError(f"k: kv_heads = {kv_heads} (k.shape[1]) must divide heads = {heads} "
                             f"(q.shape[1])")

    def _extras(self, extra: Mapping[str, Any], sizes: dict[str, int], dtype: np.dtype):  # type: ignore[no-untyped-def]
        spec = self.spec
        check_names([p.name for p in spec.params] + [x.name for x in spec.indices], extra)
        params: dict[str, np.ndarray] = {}
        dtypes: dict[str, np.dtype] = {}
        for p in spec.params:
            value = _as_array(p.name, extra[p.name])
            if value.dtype.kind not in "fiub":
                raise TypeError(f"{p.name}: expected a number array, got {value.dtype}")
            need = self._dims(p.name, p.dims, value.shape, sizes, ())
            dtypes[p.name] = value.dtype if value.dtype.kind == "f" else np.dtype(dtype)
            params[p.name] = np.ascontiguousarray(value.reshape(need), dtype=dtype)
        indices: dict[str, np.ndarray] = {}
        for x in spec.indices:
            value = _as_array(x.name, extra[x.name])
            if value.dtype.kind not in "iu":
                raise TypeError(f"{x.name}: expected an integer array, got {value.dtype}")
            # [*DIMS] (one less axis than [B, *DIMS]: ndim decides) is shared by the batch
            shared = value.ndim == len(x.dims)
            lead = () if shared else (sizes["B"],)
            need = self._dims(x.name, x.dims, value.shape, sizes, lead, batch=sizes["B"])
            value = np.broadcast_to(value, need) if shared else value
            indices[x.name] = np.ascontiguousarray(value, dtype=np.int64)
        return params, dtypes, indices

    def _dims(self, name: str, dims: tuple[ir.Dim, ...], got: tuple[int, ...],
              sizes: dict[str, int], lead: tuple[int, ...], batch: int | None = None
              ) -> tuple[int, ...]:
        """The shape `dims` asks for ([batch, *DIMS] for an index array, whose errors list both
        shapes accepted), binding fresh size names on first sight."""
        need: list[int | str] = list(lead)
        for dim in dims:
            if isinstance(dim, int):
                need.append(dim)
            elif dim in sizes:
                need.append(sizes[dim])
            else:
                need.append(dim)  # a fresh name, bound below
        if len(got) != len(need):
            raise ValueError(f"{name}: expected shape {_accepted(need, dims, lead, batch)}, "
                             f"got {_shape(got)}")
        for axis, (want, have) in enumerate(zip(need, got)):
            if isinstance(want, str):
                sizes[want] = have
                need[axis] = have
            elif want != have:
                raise ValueError(f"{name}: expected shape "
                                 f"{_accepted(need, dims, lead, batch)}, got {_shape(got)}")
        if batch is not None:
            return (batch, *(int(n) for n in need[len(lead):]))
        return tuple(int(n) for n in need)


def _accepted(need: list[int | str], dims: tuple[ir.Dim, ...], lead: tuple[int, ...],
              batch: int | None) -> str:
    """The shape wanted; for an index array (batch given) both, [B, *DIMS] or [*DIMS]."""
    if batch is None:
        return _fmt(need, dims, lead)
    own = need[len(lead):]
    return f"{_fmt([batch, *own], dims, (batch,))} or {_fmt(own, dims, ())} (shared by the batch)"


def _fmt(need: list[int | str], dims: tuple[ir.Dim, ...], lead: tuple[int, ...]) -> str:
    names = (["B"] if lead else []) + [str(d) for d in dims]
    return "[" + ", ".join(f"{n}={w}" if str(w) != n else str(n) for n, w in zip(names, need)) + "]"


def check_dlse_shape(shape: tuple[int, ...], call: Call) -> None:
    need = call.shape_out[:3]
    if tuple(shape) != need:
        raise ValueError(f"dlse: expected shape {_shape(need)} (like lse: [B, heads, n_q]), "
                         f"got {_shape(tuple(shape))}")


class _NotConstant(Exception):
    """The softcap reads something this evaluator does not handle: left to the kernels."""


def _check_softcap(spec: ir.Spec, params: dict[str, np.ndarray], sizes: dict[str, int]) -> None:
    """A softcap from params must be positive for every head (LANGUAGE.md 7, q): cap <= 0
    gives uniform attention and NaN gradients, so it is refused before any kernel runs."""
    if spec.softcap is None:
        return
    try:
        with np.errstate(all="ignore"):
            value = _const_eval(spec.softcap, params, sizes)
            cap = np.broadcast_to(value, (sizes["heads"],))
    except (_NotConstant, IndexError, ValueError, TypeError, ZeroDivisionError):
        return
    bad = np.flatnonzero(cap <= 0)  # a NaN cap is not refused: NaN propagates (item 3)
    if bad.size:
        used = sorted({n.name for n in ir.walk(spec.softcap)
                       if isinstance(n, (ir.Name, ir.Subscript)) and n.name in params})
        where = f" at h = {int(bad[0])}" if np.ndim(value) else ""
        raise ValueError(f"{', '.join(used) or 'softcap'}: the softcap must be positive, got "
                         f"{float(cap[bad[0]])!r}{where}")


def _const_eval(e: ir.Expr, params: dict[str, np.ndarray], sizes: dict[str, int]) -> Any:
    """The value of a constant expression per head: numbers, sizes, h, params, arithmetic."""
    from . import numpy_ops

    def ev(x: ir.Expr) -> Any:
        return _const_eval(x, params, sizes)

    if isinstance(e, ir.Num):
        return int(e.text) if e.is_int else float(e.text)
    if isinstance(e, ir.Name):
        if e.name == "h":
            return np.arange(sizes["heads"])
        if e.name in sizes:
            return sizes[e.name]
        if e.name in params and params[e.name].size == 1:
            return params[e.name].reshape(())
    if isinstance(e, ir.Subscript) and e.name in params:
        subs = tuple(np.asarray(ev(i)) for i in e.indices)
        if all(s.dtype.kind in "iu" and (s >= 0).all() for s in subs):
            return params[e.name][subs]
    if isinstance(e, ir.Unary) and e.op == "-":
        return -ev(e.operand)
    if isinstance(e, ir.Binary) and e.op in _ARITH:
        return _ARITH[e.op](ev(e.left), ev(e.right))
    if isinstance(e, ir.Call) and hasattr(numpy_ops, e.func):
        return getattr(numpy_ops, e.func)(*(ev(a) for a in e.args))
    raise _NotConstant


_ARITH = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.true_divide,
          "^": np.power, "//": np.floor_divide, "%": np.mod}


WEIGHTS_LIMIT = 2**30  # bytes: `weights` refuses a larger result, and asks for rows=/heads=


def _runs(rows: np.ndarray, most: int) -> list[tuple[int, int]]:
    """Consecutive ascending runs of row indices, as [start, stop) in the given order, none
    longer than `most` rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(part[at]), int(part[min(at + most, part.size) - 1]) + 1)
            for part in np.split(rows, breaks) for at in range(0, part.size, most)]


def _picked(name: str, chosen: Any, size: int, what: str) -> np.ndarray:
    """`rows=` or `heads=` of `weights` as a non-empty 1-d array of indices into range(size)."""
    try:
        picked = np.atleast_1d(np.arange(size)[chosen if chosen is not None else slice(None)])
    except (IndexError, TypeError) as e:
        raise ValueError(f"{name}: expected {what} indices in 0..{size - 1}, a range or a "
                         f"slice; got {chosen!r} ({e})") from None
    if picked.ndim != 1 or picked.size == 0:
        raise ValueError(f"{name}: expected a non-empty list of {what}s, got {chosen!r}")
    return picked


def _row_block(spec: ir.Spec, extra: Mapping[str, Any], start: int, stop: int
               ) -> dict[str, Any]:
    """The arrays of a call restricted to query rows [start, stop): axes sized n_q sliced."""
    block = {}
    for name, value in extra.items():
        declared = spec.param(name) or spec.index(name)
        a = np.asarray(value)
        if declared is None or "n_q" not in declared.dims:
            block[name] = value
            continue
        lead = a.ndim - len(declared.dims)  # an index array's optional batch axis
        where: list[slice] = [slice(None)] * a.ndim
        for axis, dim in enumerate(declared.dims):
            if dim == "n_q":
                where[lead + axis] = slice(start, stop)
        block[name] = a[tuple(where)]
    return block


class Kernel:
    """A compiled spec: `kernel(q, k, v, **params)`, `.forward`, `.backward` (LANGUAGE.md 6)."""

    def __init__(self, spec: ir.Spec, target: str, source: str,
                 forward_impl: Callable[[Call], tuple[np.ndarray, np.ndarray | None]],
                 backward_impl: Callable[[Call, np.ndarray, Any, Any, Any],
                                         dict[str, np.ndarray]],
                 ) -> None:
        self.spec = spec
        self.target = target
        self.source = source
        self.validate = Validator(spec)
        self._forward = forward_impl
        self._backward = backward_impl
        # whether a block of query rows may run alone at its offset (`weights`); the causal
        # linear path needs q_offset == k_offset
        self.row_blocks = True

    def refuse_dlse(self, dlse: Any) -> None:
        """dlse is the adjoint of lse, which only the softmax family has (TypeError, like an
        argument the spec does not take)."""
        kind = self.spec.normalize.kind
        if dlse is not None and kind is not ir.NormKind.SOFTMAX:
            raise TypeError(f"dlse: the spec normalizes with '{kind.value}', which has no lse; "
                            "dlse is only taken by softmax specs")

    def __repr__(self) -> str:
        return f"<attndsl.Kernel {self.spec.name!r} target={self.target!r}>"

    def __call__(self, q: Any, k: Any, v: Any, **params_and_indices: Any) -> np.ndarray:
        return self.forward(q, k, v, **params_and_indices)

    def forward(self, q: Any, k: Any, v: Any, return_lse: bool = False, q_offset: Any = 0,
                k_offset: Any = 0, **params_and_indices: Any) -> Any:
        call = self.validate(q, k, v, params_and_indices, q_offset, k_offset)
        out, lse = self._forward(call)
        out = np.asarray(out, dtype=call.dtype)
        if lse is not None and self.spec.normalize.kind is ir.NormKind.SOFTMAX:
            lse = np.asarray(lse, dtype=call.dtype)
        else:
            lse = None
        return (out, lse) if return_lse else out

    def weights(self, q: Any, k: Any, v: Any, *, rows: Any = None, heads: Any = None,
                q_offset: Any = 0, k_offset: Any = 0, **params_and_indices: Any) -> np.ndarray:
        """The normalized weights [B, len(heads), len(rows), n_k] (all heads and rows by
        default) exactly as this target's kernels use them (masked entries 0): its forward with
        v = columns of the identity per key/value head, whose output row i is P[i, those keys].
        `rows` and `heads` (indices, a range or a slice) pick query rows and query heads; runs
        of consecutive rows are computed as query blocks at their offsets, and the keys in
        column blocks of the identity, each small enough for WEIGHTS_LIMIT (a few columns of
        the identity at a time when n_k is large: never an n_k x n_k matrix past the limit)."""
        call = self.validate(q, k, v, params_and_indices, q_offset, k_offset)
        s = call.sizes
        picked = _picked("rows", rows, s["n_q"], "query row")
        head_ix = _picked("heads", heads, s["heads"], "query head")
        item = call.dtype.itemsize
        n_k = s["n_k"]
        result = s["B"] * head_ix.size * picked.size * n_k * item
        column = s["B"] * s["kv_heads"] * n_k * item  # one column of v = the identity
        cell = s["B"] * s["heads"] * item  # one (query row, key column) of the forward's out
        whole = self.validate.uses_n or not self.row_blocks  # uses_n: a block would change n
        least = column + cell * (s["n_q"] if whole else 1)  # one column, one row (or all)
        if result + least > WEIGHTS_LIMIT:
            fit = max(1, (WEIGHTS_LIMIT - least) // (s["B"] * head_ix.size * n_k * item))
            raise ValueError(
                f"weights: [{s['B']}, {head_ix.size}, {picked.size}, {n_k}] would take "
                f"{(result + least) / 2**30:.1f} GiB with a column of the identity and a query "
                f"block (limit {WEIGHTS_LIMIT / 2**30:.0f} GiB); ask for fewer query rows or "
                f"heads, e.g. rows=range(0, {min(fit, s['n_q'])}) or heads=[0]")
        room = WEIGHTS_LIMIT - result
        # the widest column block that fits with one query block of one row (or all rows):
        # every column block recomputes the logits, while query blocks cost nothing extra
        width = min(n_k, max(1, room // least))
        most = max(1, (room - width * column) // (cell * width))  # rows per query block
        weights = np.empty((s["B"], head_ix.size, picked.size, n_k), call.dtype)
        for c0 in range(0, n_k, width):
            c1 = min(n_k, c0 + width)
            eye_v = np.zeros((s["B"], s["kv_heads"], n_k, c1 - c0), call.dtype)
            eye_v[:, :, c0:c1] = np.eye(c1 - c0, dtype=call.dtype)
            if whole:
                out = self.forward(call.q, call.k, eye_v, q_offset=call.q_offset,
                                   k_offset=call.k_offset, **params_and_indices)
                weights[..., c0:c1] = out[:, head_ix][:, :, picked]
                continue
            at = 0
            for start, stop in _runs(picked, most):
                weights[:, :, at:at + stop - start, c0:c1] = self.forward(
                    call.q[:, :, start:stop], call.k, eye_v, q_offset=call.q_offset + start,
                    k_offset=call.k_offset,
                    **_row_block(self.spec, params_and_indices, start, stop))[:, head_ix]
                at += stop - start
        return weights

    def backward(self, q: Any, k: Any, v: Any, dout: Any, out: Any = None, lse: Any = None,
                 dlse: Any = None, q_offset: Any = 0, k_offset: Any = 0,
                 **params_and_indices: Any) -> dict[str, np.ndarray]:
        """Gradients of sum(out * dout) + sum(lse * dlse) (dlse: softmax family only)."""
        call = self.validate(q, k, v, params_and_indices, q_offset, k_offset)
        self.refuse_dlse(dlse)
        dout = _as_array("dout", dout)
        if dout.shape != call.shape_out:
            raise ValueError(f"dout: expected shape {_shape(call.shape_out)} (like out), got "
                             f"{_shape(dout.shape)}")
        if dout.dtype.kind != "f":
            raise TypeError(f"dout: expected a float array, got {dout.dtype}")
        dout = np.ascontiguousarray(dout, dtype=call.dtype)
        if out is not None:
            out = _as_array("out", out)
            if out.shape != call.shape_out:
                raise ValueError(f"out: expected shape {_shape(call.shape_out)}, got "
                                 f"{_shape(out.shape)}")
            out = np.ascontiguousarray(out, dtype=call.dtype)
        if lse is not None:
            lse = _as_array("lse", lse)
            need = call.shape_out[:3]
            if lse.shape != need:
                raise ValueError(f"lse: expected shape {_shape(need)}, got {_shape(lse.shape)}")
            lse = np.ascontiguousarray(lse, dtype=call.dtype)
        if dlse is not None:
            dlse = _as_array("dlse", dlse)
            check_dlse_shape(dlse.shape, call)
            if dlse.dtype.kind != "f":
                raise TypeError(f"dlse: expected a float array, got {dlse.dtype}")
            dlse = np.ascontiguousarray(dlse, dtype=call.dtype)
        grads = self._backward(call, dout, out, lse, dlse)
        # writeable C-order arrays (a read-only broadcast view is copied): the caller owns them
        result = {name: np.require(grads[name], call.dtype, ["C", "W"])
                  for name in ("q", "k", "v")}
        for name in call.params:
            result[name] = np.asarray(grads[name]).astype(call.param_dtypes[name]).reshape(
                np.shape(params_and_indices[name]))
        return result
