"""The mask and weight matrices of a spec, from the NumPy reference (`attndsl show --mask`, plot).

Every value here is what the generated NumPy reference computes, evaluated at one (b, h): the
mask pair by pair (`allowed`), each mask atom pair by pair, and the normalized weights P. The
tile picture applies the kernels' own rule (plan.py: an atom's status over a tile from its
pairs, combined by `tile_status_text`) to those atoms, so it shows what the kernels skip.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import ir
from .demo import (  # noqa: F401 (viz.demo_inputs etc. stay where callers found them)
    DEMO_DOCUMENTS,
    FREE_SIZE,
    Inputs,
    demo_index,
    demo_inputs,
    demo_params,
    documents,
    heads_of,
    parse_index,
    sequence_axis,
)
from .plan import make_plan, tile_status_text
from .runtime import numpy_ops

SKIPPED, PARTIAL, FULL = 0, 1, 2
TILE_CHARS = {FULL: "#", PARTIAL: "+", SKIPPED: "."}


# ---- the mask, pair by pair -----------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _reference(spec: ir.Spec) -> tuple[Any, Any]:
    """The generated NumPy module of the spec and an emitter that prints its expressions."""
    from .codegen import numpy_ref
    from .runtime import cache

    emitter = numpy_ref.Emitter(make_plan(spec))
    module = cache.load_module(numpy_ref.emit(emitter.plan), "numpy", spec.name)
    return module, emitter


def lookup_lines(spec: ir.Spec) -> list[str]:
    """The reference's lines computing the pair kernel's lookups (`doc_3 = xp.lookup(doc__,
    "doc", (b, i,), batched=True)`), in node order, as its `graph` prints them."""
    from .codegen import numpy_ref

    _, emitter = _reference(spec)
    printer = numpy_ref.Emitter(emitter.plan)
    for node in emitter.plan.lookups:
        printer.forward_node(node)
    return [line for line in printer.w.text().splitlines() if line]


def _mask_scope(spec: ir.Spec, inputs: Inputs) -> dict[str, Any]:
    """What the reference's mask reads: sizes, positions on their own axes and the lookups,
    each only as large as its axes (no logits: a mask at n = 8192 stays affordable)."""
    from .codegen.numpy_ref import array
    from .runtime.kernel import Validator

    call = Validator(spec)(inputs.q, inputs.k, inputs.v, inputs.extra)
    scope: dict[str, Any] = {"xp": numpy_ops, **{k: v for k, v in call.sizes.items()
                                                 if k != "n"}}
    b, h, i, j, q_off, k_off = numpy_ops.positions(
        *(call.sizes[k] for k in ("B", "heads", "n_q", "n_k")))
    scope.update(b=b, h=h, i=i, j=j, q_off=q_off, k_off=k_off)
    scope.update({array(name): a for name, a in {**call.params, **call.indices}.items()})
    with np.errstate(all="ignore"):
        exec("\n".join(lookup_lines(spec)), scope)  # noqa: S102 (the reference's own lines)
    return scope


def _at(value: Any, shape: tuple[int, ...], batch: int, head: int) -> np.ndarray:
    """A value of the 5-D layout (any axis possibly 1) at one (b, h): [n_q, n_k]."""
    value = np.asarray(value)
    value = value[..., 0] if value.ndim == 5 else value
    return np.broadcast_to(value, shape)[batch, head]


@dataclass
class PairMask:
    """The mask at one (b, h): allowed[i, j], and each atom of plan.py's MaskAtoms pair by pair."""

    allowed: np.ndarray  # [n_q, n_k] bool
    atoms: list[tuple[Any, np.ndarray]]  # (the atom's relation, its value at every pair)
    relation: Any  # the mask as a SymPy boolean; None when the spec has no mask


def pair_mask(spec: ir.Spec, inputs: Inputs, batch: int = 0, head: int = 0) -> PairMask:
    """The spec's mask at every pair of one (b, h), from the NumPy reference's graph."""
    n_q, n_k = inputs.q.shape[2], inputs.k.shape[2]
    if spec.mask is None:
        return PairMask(np.ones((n_q, n_k), dtype=bool), [], None)
    scope = _mask_scope(spec, inputs)
    _, emitter = _reference(spec)
    shape = (inputs.q.shape[0], inputs.q.shape[1], n_q, n_k)

    def evaluate(relation: Any) -> np.ndarray:
        """The relation as the reference prints it, at one (b, h), every pair."""
        with np.errstate(all="ignore"):
            value = eval(emitter.expr(relation), scope)
        return _at(value, shape, batch, head).astype(bool)

    atoms = [(atom.relation, evaluate(atom.relation)) for atom in emitter.plan.mask_atoms]
    return PairMask(evaluate(emitter.plan.deriv.mask), atoms, emitter.plan.deriv.mask)


# ---- tiles ----------------------------------------------------------------------------------


def tile_counts(values: np.ndarray, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile of bq x bk pairs (the last ones cut at the edges): how many are true, and how
    many pairs the tile has."""
    rows, cols = np.arange(0, values.shape[0], bq), np.arange(0, values.shape[1], bk)
    true = np.add.reduceat(np.add.reduceat(values.astype(np.int64), rows, axis=0), cols, axis=1)
    size_q = np.minimum(bq, values.shape[0] - rows)
    size_k = np.minimum(bk, values.shape[1] - cols)
    return true, np.outer(size_q, size_k)


def pair_status(values: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """A tile's status from its pairs: 0 none true, 2 all true, else 1."""
    true, size = tile_counts(values, bq, bk)
    return np.where(true == 0, SKIPPED, np.where(true == size, FULL, PARTIAL))


def _elementwise(reduce: Any) -> Any:
    return lambda *parts: functools.reduce(reduce, parts)


def kernel_status(mask: PairMask, bq: int, bk: int) -> np.ndarray:
    """The status the kernels give each tile: every atom's status from its pairs (what corners
    or a scan find), combined as plan.py's tile_status_text combines them (And -> min, ...)."""
    n_q, n_k = mask.allowed.shape
    if mask.relation is None:
        return np.full(((n_q + bq - 1) // bq, (n_k + bk - 1) // bk), FULL)
    states = {relation: f"atom{n}" for n, (relation, _) in enumerate(mask.atoms)}
    values = {f"atom{n}": pair_status(v, bq, bk) for n, (_, v) in enumerate(mask.atoms)}
    text = tile_status_text(mask.relation, states)
    scope = {"min": _elementwise(np.minimum), "max": _elementwise(np.maximum), **values}
    status = eval(text, {"__builtins__": {}}, scope)  # plan.py's formula, our names
    return np.broadcast_to(status, values["atom0"].shape if values else (1, 1)).copy()


def tile_picture(status: np.ndarray) -> str:
    """One character per tile: query tiles down, key tiles across."""
    return "\n".join("".join(TILE_CHARS[int(s)] for s in row) for row in status)


def tile_summary(status: np.ndarray) -> str:
    total = status.size
    counts = {s: int(np.sum(status == s)) for s in (FULL, PARTIAL, SKIPPED)}
    return (f"{counts[FULL]} full '{TILE_CHARS[FULL]}', {counts[PARTIAL]} partial "
            f"'{TILE_CHARS[PARTIAL]}', {counts[SKIPPED]} skipped '{TILE_CHARS[SKIPPED]}' of "
            f"{total} tiles: {100 * counts[SKIPPED] / total:.1f}% skipped")


# ---- weights --------------------------------------------------------------------------------


def attention_weights(spec: ir.Spec, q: np.ndarray, k: np.ndarray, extra: Mapping[str, Any]
                      ) -> np.ndarray:
    """The normalized weights P [B, heads, n_q, n_k] (masked entries 0), as the NumPy reference
    computes them (Kernel.weights: its out with v the identity of each key/value head)."""
    from . import compile as compile_spec

    kernel = compile_spec(spec, target="numpy")
    B, kv_heads, n_k = k.shape[:3]
    v = np.zeros((B, kv_heads, n_k, 1), q.dtype)  # weights only reads its shape and dtype
    return kernel.weights(q, k, v, **extra)
