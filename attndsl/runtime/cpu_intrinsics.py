"""Low-level building blocks that generated Numba CPU attention kernels call.

Everything here is callable from inside ``@njit(cache=True, nogil=True, fastmath=...)``
functions and keeps on-disk caching possible (no ctypes pointers held in globals):

* :func:`gemm` / :func:`gemm_unchecked` -- row-major ``C = alpha*op(A) @ op(B) + beta*C`` on
  sub-tiles addressed in place (element offsets + leading dimensions) through SciPy's
  single/double precision BLAS, bound by symbol name.
* :func:`gemm_skip_zero` -- the same in plain loops, skipping terms whose A element is 0.
* :func:`micro_gemm` -- ``C = alpha * A @ B (+ C)`` by a register-blocked micro-kernel of our
  own, B read in PANEL-wide panels (packed by :func:`key_panels` or :func:`value_panels`, or a
  row-major matrix as stored). :func:`micro_gemm_band` -- the same on a partly masked tile,
  each strip of rows over its allowed run only.
* :func:`rows_dot_keys` / :func:`rows_mix_values` -- ``A @ B^T`` and ``C += A @ B`` in plain
  loops for a few rows (decoding), where a BLAS call costs more than its product.
* :func:`fmax` -- ``llvm.maxnum`` with fast-math flags; unlike Numba's ``max`` it vectorizes.
* :func:`row_max` -- vectorized max of a contiguous run of a 1-D array.
* :func:`exp2` -- scalar 2**y: polynomial + exponent bit trick for float32, ``math.exp`` for
  float64. :func:`exp2_shift_sum` -- the fused softmax step ``x <- 2**(x - m)``, returns the sum.
* :func:`single_threaded_blas` -- BLAS must not spawn threads inside a kernel's threads.
* :class:`NoAliasCompiler` -- the kernels' Numba pipeline: their array arguments ``noalias``.
* :func:`transposed_rows` / :func:`key_panels` -- (called by the launcher) a GEMM's key
  operand transposed or packed in panels, and whether it is finite; :func:`value_panels`, v.
* :func:`finite_everywhere` -- (called by the launcher) whether a row operand is finite.
* :func:`cpu_features_prefer_512` / :func:`enable_512bit_vectors` -- let LLVM use zmm vectors.

How a generated kernel module uses it::

    from attndsl.runtime.cpu_intrinsics import (
        FASTMATH, NoAliasCompiler, gemm_unchecked, row_max, exp2, exp2_shift_sum,
        single_threaded_blas)

    @njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
    def _fwd(lo, hi, q, kt, v, o, lse, scale_log2):  # tasks lo..hi-1; calls gemm_unchecked(...)
        ...

    def forward(q, k, v):                             # plain-Python launcher
        ...
        with single_threaded_blas():
            threads.run(_fwd, tasks, q, kt, v, o, lse, scale_log2)   # runtime/threads.py

Pitfall for cached kernels: Numba's cache index is keyed on the *kernel's* bytecode only, not
on the helpers here; the cache key of a "cpu" module includes :data:`INTRINSICS_VERSION`
(runtime/cache.py) so a change here invalidates old caches.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import math
import os
from collections.abc import Iterator
from typing import Any

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.compiler import Compiler
from numba.extending import intrinsic, overload

from . import threads

__all__ = [
    "FASTMATH",
    "INTRINSICS_VERSION",
    "PREFER_512_ENV",
    "NoAliasCompiler",
    "band_panels",
    "blas_num_threads",
    "cpu_features_prefer_512",
    "elu_f32",
    "elu_grad_f32",
    "enable_512bit_vectors",
    "exp2",
    "exp2_f32",
    "exp2_f64",
    "exp2_shift",
    "exp2_shift_sum",
    "finite_everywhere",
    "fmax",
    "gemm",
    "gemm_skip_zero",
    "gemm_unchecked",
    "keep_nan",
    "key_panels",
    "micro_gemm",
    "micro_gemm_band",
    "row_dots",
    "row_max",
    "rows_dot_keys",
    "rows_mix_values",
    "set_blas_num_threads",
    "single_threaded_blas",
    "transposed_rows",
    "value_panels",
]

# Bump whenever generated code calling these helpers (or runtime/numba_funcs.py, whose overloads
# are compiled into the cached kernels) must be recompiled (see module docstring).
INTRINSICS_VERSION = "19"

# Fast-math flags for kernels: neither 'ninf' (masked scores are -inf and must stay so) nor
# 'nnan' (LLVM would drop the NaN checks that make a NaN logit reach out and lse). The reductions
# vectorize without them: sums need 'reassoc', the row max uses llvm.maxnum (see fmax).
FASTMATH: set[str] = {"nsz", "arcp", "contract", "afn", "reassoc"}  # Numba needs a set


class NoAliasCompiler(Compiler):
    """Numba's compiler, with every array argument of the compiled function marked `noalias`
    for LLVM (`@njit(pipeline_class=NoAliasCompiler)`): no other argument reaches its memory.

    Numba's parfors mark the loop bodies they outline so, when they see no aliasing; the
    generated kernels run their tasks without parfors (runtime/threads.py), and without the
    mark LLVM must assume that every store to an adjoint may change the inputs: Bahdanau's
    backward ran 25% slower. It holds for the kernels: their outputs are buffers the launcher
    allocates, never a view of an input (inputs may alias one another: they are only read).
    """

    def __init__(self, typingctx, targetctx, library, args, return_type, flags, locals):
        flags.noalias = True  # a copy made for this compilation
        super().__init__(typingctx, targetctx, library, args, return_type, flags, locals)

# ----------------------------------------------------------------------------------------------
# 512-bit vectors. LLVM's tuning for recent Intel cores includes 'prefer-256-bit' (avoids zmm
# frequency drops); for exp/max-heavy kernels zmm wins. NUMBA_CPU_FEATURES is read when Numba's
# JIT codegen is created -- when the first @njit function of the process is *defined* (this
# module defines some), so this section must run before anything below.
# ----------------------------------------------------------------------------------------------

# Environment switch: "1" -> enable_512bit_vectors() when this module is imported.
PREFER_512_ENV = "ATTNDSL_PREFER_512BIT"


def cpu_features_prefer_512() -> str:
    """Host CPU feature string with '-prefer-256-bit' appended (a NUMBA_CPU_FEATURES value)."""
    feats = llvm.get_host_cpu_features().flatten()
    return f"{feats},-prefer-256-bit" if feats else "-prefer-256-bit"


def _numba_codegen_created() -> bool:
    from numba.core.registry import cpu_target

    # threadsafe_cached_property stores the context (which owns the codegen) in the instance.
    return "_toplevel_target_context" in vars(cpu_target)


def enable_512bit_vectors() -> bool:
    """Make Numba compile for the host CPU with 512-bit vectors preferred; True if it applied.

    Sets NUMBA_CPU_FEATURES (and numba.config) to :func:`cpu_features_prefer_512`. It only takes
    effect if no @njit function was defined yet in this process -- the features are frozen into
    Numba's target machine then. Importing this module defines some, so from outside call it
    only through the environment: set ``ATTNDSL_PREFER_512BIT=1`` before importing
    ``attndsl.runtime.cpu_intrinsics`` (or any Numba code), or set ``NUMBA_CPU_FEATURES`` to
    :func:`cpu_features_prefer_512`'s value before the process starts. Returns False (and leaves
    the setting to child processes) when it is too late. Cache interplay: the feature string is
    part of Numba's cache index key, so kernels cached under the other setting are compiled again
    once (both variants then stay in the cache side by side).
    """
    value = cpu_features_prefer_512()
    os.environ["NUMBA_CPU_FEATURES"] = value
    if _numba_codegen_created():
        from numba.core import config

        return config.CPU_FEATURES == value
    from numba.core import config

    config.CPU_FEATURES = value
    return True


if os.environ.get(PREFER_512_ENV, "") == "1" and not os.environ.get("NUMBA_CPU_FEATURES"):
    enable_512bit_vectors()


# ----------------------------------------------------------------------------------------------
# BLAS binding: SciPy exports Fortran sgemm/dgemm as PyCapsules; register their addresses under
# fixed names so compiled (and cached) code links against the name, not a pointer value.
# ----------------------------------------------------------------------------------------------

_SGEMM_SYMBOL = "attndsl_scipy_sgemm"
_DGEMM_SYMBOL = "attndsl_scipy_dgemm"


def _capsule_address(capsule: object) -> int:
    """Return the raw pointer stored in a PyCapsule (SciPy's ``__pyx_capi__`` entries)."""
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype = ctypes.c_char_p
    get_name.argtypes = [ctypes.py_object]
    get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
    get_ptr.restype = ctypes.c_void_p
    get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return int(get_ptr(capsule, get_name(capsule)))


def _register_blas_symbols() -> None:
    """Bind SciPy's sgemm/dgemm to stable symbol names in LLVM's process-wide symbol table."""
    from scipy.linalg import cython_blas

    capi = cython_blas.__pyx_capi__
    llvm.add_symbol(_SGEMM_SYMBOL, _capsule_address(capi["sgemm"]))
    llvm.add_symbol(_DGEMM_SYMBOL, _capsule_address(capi["dgemm"]))


# Must run before any cached kernel that calls gemm is loaded: importing this module does it.
_register_blas_symbols()


@intrinsic
def _blas_gemm_colmajor(
    typingctx,
    trans_a,
    trans_b,
    m,
    n,
    k,
    alpha,
    a,
    a_off,
    lda,
    b,
    b_off,
    ldb,
    beta,
    c,
    c_off,
    ldc,
):
    """Column-major Fortran ``?gemm`` on ``a[a_off:]``, ``b[b_off:]``, ``c[c_off:]``."""
    arrays = (a, b, c)
    if not all(isinstance(t, types.Array) for t in arrays):
        return None
    dtype = c.dtype
    if dtype not in (types.float32, types.float64) or a.dtype != dtype or b.dtype != dtype:
        raise TypeError(f"gemm needs float32 or float64 arrays of one dtype, got {arrays}")
    if any(t.layout != "C" for t in arrays):
        raise TypeError(f"gemm needs C-contiguous arrays (pass whole arrays + offsets): {arrays}")
    symbol = _SGEMM_SYMBOL if dtype == types.float32 else _DGEMM_SYMBOL
    sig = types.void(
        trans_a, trans_b, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc
    )

    def codegen(context, builder, signature, args):
        (ta, tb, m_, n_, k_, al, a_, ao, lda_, b_, bo, ldb_, be, c_, co, ldc_) = args
        tys = signature.args
        i8, i32 = ir.IntType(8), ir.IntType(32)
        fty = context.get_value_type(dtype)
        cp, ip, fp = i8.as_pointer(), i32.as_pointer(), fty.as_pointer()
        # ?gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), all by reference.
        fnty = ir.FunctionType(ir.VoidType(), [cp, cp, ip, ip, ip, fp, fp, ip, fp, ip, fp, fp, ip])
        fn = cgutils.get_or_insert_function(builder.module, fnty, symbol)

        def float_ref(value, ty):
            # Fortran passes every scalar by reference: spill to an entry-block alloca.
            return cgutils.alloca_once_value(builder, context.cast(builder, value, ty, dtype))

        def int_ref(value, ty):
            # SciPy's cython_blas uses 32-bit Fortran integers (LP64), even with a 64-bit NumPy.
            as_i64 = context.cast(builder, value, ty, types.int64)
            return cgutils.alloca_once_value(builder, builder.trunc(as_i64, i32))

        def trans_char(value, ty):
            flag = context.cast(builder, value, ty, types.boolean)
            ch = builder.select(flag, ir.Constant(i8, ord("T")), ir.Constant(i8, ord("N")))
            return cgutils.alloca_once_value(builder, ch)

        def data_ptr(arr, arr_ty, off, off_ty):
            data = context.make_array(arr_ty)(context, builder, arr).data
            return builder.gep(data, [context.cast(builder, off, off_ty, types.int64)])

        builder.call(
            fn,
            [
                trans_char(ta, tys[0]),
                trans_char(tb, tys[1]),
                int_ref(m_, tys[2]),
                int_ref(n_, tys[3]),
                int_ref(k_, tys[4]),
                float_ref(al, tys[5]),
                data_ptr(a_, tys[6], ao, tys[7]),
                int_ref(lda_, tys[8]),
                data_ptr(b_, tys[9], bo, tys[10]),
                int_ref(ldb_, tys[11]),
                float_ref(be, tys[12]),
                data_ptr(c_, tys[13], co, tys[14]),
                int_ref(ldc_, tys[15]),
            ],
        )
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def gemm_unchecked(
    trans_a, trans_b, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc
):  # pragma: no cover - compiled
    """Row-major ``C = alpha * op(A) @ op(B) + beta * C`` without argument checks.

    ``A`` is the ``m x k`` (``k x m`` if ``trans_a``) tile starting at flat element ``a_off`` of
    the C-contiguous array ``a`` with row stride ``lda``; likewise ``B`` (``k x n``/``n x k``)
    and ``C`` (``m x n``). ``alpha``/``beta`` are cast to the arrays' dtype.
    """
    # Row-major C is column-major C^T = op(B)^T op(A)^T: swap operands, keep the flags.
    _blas_gemm_colmajor(
        trans_b, trans_a, n, m, k, alpha, b, b_off, ldb, a, a_off, lda, beta, c, c_off, ldc
    )


@njit
def _check_tile(size, off, rows, cols, ld):  # pragma: no cover - compiled
    """Raise unless a ``rows x cols`` row-major tile at ``off`` with stride ``ld`` fits."""
    if rows > 0 and cols > 0 and (off < 0 or ld < cols or off + (rows - 1) * ld + cols > size):
        raise ValueError("gemm: tile out of bounds or leading dimension too small")


@njit
def gemm(
    trans_a, trans_b, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc
):  # pragma: no cover - compiled
    """Bounds-checked :func:`gemm_unchecked` (raises ValueError); checks cost a few compares.

    For serial code and tests. Kernels use :func:`gemm_unchecked`, their launchers validate
    the shapes: a kernel never raises (an exception in a Numba parallel region surfaces as a
    SystemError, "returned a result with an exception set", not as the ValueError).
    """
    if m < 0 or n < 0 or k < 0:
        raise ValueError("gemm: negative dimension")
    if trans_a:
        _check_tile(a.size, a_off, k, m, lda)
    else:
        _check_tile(a.size, a_off, m, k, lda)
    if trans_b:
        _check_tile(b.size, b_off, n, k, ldb)
    else:
        _check_tile(b.size, b_off, k, n, ldb)
    _check_tile(c.size, c_off, m, n, ldc)
    gemm_unchecked(
        trans_a, trans_b, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc
    )


@njit(inline="always")
def _tile_at(x, off, ld, r, c, trans):  # pragma: no cover - compiled
    """Element (r, c) of op(X) for the row-major tile at ``off`` with stride ``ld``."""
    return x[off + c * ld + r] if trans else x[off + r * ld + c]


@njit(cache=True)
def gemm_skip_zero(
    trans_a, trans_b, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc
):  # pragma: no cover - compiled
    """:func:`gemm_unchecked` that skips the terms whose A element is exactly 0: 0 * NaN = 0.

    The careful path of a kernel whose row operands hold a NaN or inf: A is a tile of pair
    weights or adjoints, exactly 0 for masked pairs, which must not pick up B's NaN. Plain
    loops (only non-finite inputs take this path); ``beta`` 0 overwrites C.
    """
    a, b, c = a.reshape(a.size), b.reshape(b.size), c.reshape(c.size)  # C-contiguous: views
    for i in range(m):
        row = c_off + i * ldc
        for j in range(n):
            c[row + j] = c[row + j] * beta if beta != 0 else c.dtype.type(0)
        for p in range(k):
            av = _tile_at(a, a_off, lda, i, p, trans_a)
            if av != 0:
                s = alpha * av
                for j in range(n):
                    c[row + j] += s * _tile_at(b, b_off, ldb, p, j, trans_b)


# ----------------------------------------------------------------------------------------------
# A register-blocked GEMM of our own: MICRO_ROWS x PANEL tiles of C held in vector registers
# while the k loop runs (the classic BLIS micro-kernel). OpenBLAS packs both operands on every
# call; a score tile's GEMM has k = d (64), too short to pay for that: on an AVX2 EPYC a
# 256 x 256 x 64 sgemm ran at 81 GFLOP/s per core through OpenBLAS and at 95 here, with the keys
# packed in panels once per call (key_panels). B is read PANEL columns at a time, each row of a
# panel contiguous; A one element at a time (broadcast).
# ----------------------------------------------------------------------------------------------

PANEL = 16  # the micro-kernel's columns: two AVX2 vectors of float32 (one AVX-512 vector)
MICRO_ROWS = 6  # its rows: 6 x 2 accumulators, 2 B vectors and a broadcast fill AVX2's 16


def _micro_tile(rows: int):  # type: ignore[no-untyped-def]
    """An intrinsic computing C[rows x PANEL] = alpha * A[rows x k] @ B[k x PANEL] (plus C if
    `accumulate`): A's element (r, kk) at a[a_off + r * lda + kk * a_step], B's (kk, c) at
    b[b_off + kk * ldb + c], C's (r, c) at c[c_off + r * ldc + c]; arrays of one float dtype,
    C-contiguous, any number of axes (addressed flat)."""

    @intrinsic
    def tile(typingctx, k, alpha, a, a_off, lda, a_step, b, b_off, ldb, accumulate, c, c_off,
             ldc):
        arrays = (a, b, c)
        if not all(isinstance(t, types.Array) and t.layout == "C" for t in arrays):
            return None
        dtype = c.dtype
        if dtype not in (types.float32, types.float64) or a.dtype != dtype or b.dtype != dtype:
            return None
        sig = types.void(k, alpha, a, a_off, lda, a_step, b, b_off, ldb, accumulate, c, c_off,
                         ldc)

        def codegen(context, builder, signature, args):
            k_, alpha_, a_, a_off_, lda_, a_step_, b_, b_off_, ldb_, acc_, c_, c_off_, ldc_ = args
            tys = signature.args
            i32, i64 = ir.IntType(32), ir.IntType(64)
            scalar = context.get_value_type(dtype)
            vector = ir.VectorType(scalar, PANEL)  # LLVM splits it into the machine's vectors
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vector, [vector] * 3),
                f"llvm.fma.v{PANEL}f{64 if dtype == types.float64 else 32}")

            def int64(value, ty):
                return context.cast(builder, value, ty, types.int64)

            def start(arr, arr_ty, off, off_ty):
                data = context.make_array(arr_ty)(context, builder, arr).data
                return builder.gep(data, [int64(off, off_ty)])

            def rows_of(base, ld):  # the first element of each of the tile's rows
                return [builder.gep(base, [builder.mul(ld, ir.Constant(i64, r))])
                        for r in range(rows)]

            def splat(value):
                one = builder.insert_element(ir.Constant(vector, ir.Undefined), value,
                                             ir.Constant(i32, 0))
                return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined),
                                              ir.Constant(ir.VectorType(i32, PANEL), None))

            def at(pointer):
                return builder.bitcast(pointer, vector.as_pointer())

            a_rows = rows_of(start(a_, tys[2], a_off_, tys[3]), int64(lda_, tys[4]))
            a_step64 = int64(a_step_, tys[5])
            b_start, ldb64 = start(b_, tys[6], b_off_, tys[7]), int64(ldb_, tys[8])
            c_rows = rows_of(start(c_, tys[10], c_off_, tys[11]), int64(ldc_, tys[12]))
            # the accumulators: allocas LLVM promotes to registers (phi nodes of the loop)
            sums = [cgutils.alloca_once_value(builder, ir.Constant(vector, None))
                    for _ in range(rows)]
            with cgutils.for_range(builder, int64(k_, tys[0])) as loop:
                kk = loop.index
                row = builder.load(at(builder.gep(b_start, [builder.mul(kk, ldb64)])), align=1)
                for r in range(rows):
                    x = splat(builder.load(builder.gep(a_rows[r], [builder.mul(kk, a_step64)])))
                    builder.store(builder.call(fma, [x, row, builder.load(sums[r])]), sums[r])
            scale = splat(context.cast(builder, alpha_, tys[1], dtype))
            accumulate = context.cast(builder, acc_, tys[9], types.boolean)
            for r in range(rows):
                value = builder.fmul(builder.load(sums[r]), scale)
                with builder.if_else(accumulate) as (add, store):
                    with add:
                        old = builder.load(at(c_rows[r]), align=1)
                        builder.store(builder.fadd(old, value), at(c_rows[r]), align=1)
                    with store:  # C is not read: what it held (even NaN) does not matter
                        builder.store(value, at(c_rows[r]), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile1, _tile2, _tile3, _tile4, _tile5, _tile6 = (_micro_tile(r) for r in range(1, 7))


@njit(inline="always")
def _tile_rows(rows, k, alpha, a, a_off, lda, a_step, b, b_off, ldb, accumulate, c, c_off,
               ldc):  # pragma: no cover - compiled
    """The micro-kernel on a strip of 1..MICRO_ROWS rows (one intrinsic per height)."""
    if rows == MICRO_ROWS:
        _tile6(k, alpha, a, a_off, lda, a_step, b, b_off, ldb, accumulate, c, c_off, ldc)
    elif rows == 1:
        _tile1(k, alpha, a, a_off, lda, a_step, b, b_off, ldb, accumulate, c, c_off, ldc)
    elif rows == 2:
        _tile2(k, alpha, a, a_off, lda, a_step, b, b_off, ldb, accumulate, c, c_off, ldc)
    elif rows == 3:
        _tile3(k, alpha, a, a_off, lda, a_step, b, b_off, ldb, accumulate, c, c_off, ldc)
    elif rows == 4:
        _tile4(k, alpha, a, a_off, lda, a_step, b, b_off, ldb, accumulate, c, c_off, ldc)
    else:
        _tile5(k, alpha, a, a_off, lda, a_step, b, b_off, ldb, accumulate, c, c_off, ldc)


@njit(cache=True, nogil=True)
def micro_gemm(m, n, k, alpha, a, a_off, lda, a_step, b, b_off, ldb, panel_step, accumulate, c,
               c_off, ldc):  # pragma: no cover - compiled
    """Row-major ``C = alpha * A @ B`` (``+ C`` if `accumulate`) for C ``m x n`` rounded up to
    PANEL columns, by the micro-kernel above: every PANEL-th column of C is written, the columns
    past ``n`` too (from B's columns there, which must be readable: zero padding).

    A's element (r, kk) is ``a[a_off + r * lda + kk * a_step]``: ``a_step = 1`` as stored,
    ``lda = 1`` for a transposed one (P^T, dS^T read in place). B is read in panels of PANEL
    columns, the p-th starting at ``b_off + p * panel_step`` with its rows ``ldb`` apart: the
    keys packed by `key_panels` (``ldb = PANEL``, ``panel_step = PANEL * k``), rows packed by
    `value_panels` (``ldb = PANEL``, ``panel_step = PANEL * n_rows``), or a row-major matrix as
    it is (``ldb`` its row stride, ``panel_step = PANEL``). No checks.
    """
    panels = (n + PANEL - 1) // PANEL
    i = 0
    while i + MICRO_ROWS <= m:  # MICRO_ROWS rows of A stay in L1 for every panel
        for p in range(panels):
            _tile6(k, alpha, a, a_off + i * lda, lda, a_step, b, b_off + p * panel_step, ldb,
                   accumulate, c, c_off + i * ldc + p * PANEL, ldc)
        i += MICRO_ROWS
    rest, ao = m - i, a_off + i * lda
    for p in range(panels if rest else 0):
        _tile_rows(rest, k, alpha, a, ao, lda, a_step, b, b_off + p * panel_step, ldb,
                   accumulate, c, c_off + i * ldc + p * PANEL, ldc)


@njit(cache=True, nogil=True)
def micro_gemm_band(m, n, k, alpha, a, a_off, lda, a_step, b, b_off, ldb, panel_step, accumulate,
                    c, c_off, ldc, lo, hi, per, depth):  # pragma: no cover - compiled
    """`micro_gemm` on a partly masked tile whose row r needs only the run ``[lo[r // per],
    hi[r // per])`` (empty where ``lo >= hi``), computed per strip of MICRO_ROWS rows over the
    union of its rows' runs. A causal diagonal tile needs about half of its products.

    ``depth`` False: the runs are C's columns (S = Q K^T, dP = dO V^T): only the panels
    holding a strip's run are written, the others are left as they were (the caller masks
    them). ``depth`` True: the runs are the sum's terms (P @ V, dS @ K, and with ``per =
    PANEL`` the transposed P^T @ dO and dS^T @ Q, a run per panel of keys): A must be zero
    outside them, every column is written (C's strip, or its zeros when the run is empty).
    """
    panels = (n + PANEL - 1) // PANEL
    i = 0
    while i < m:
        rows = min(MICRO_ROWS, m - i)
        start, stop = k if depth else n, 0
        for r in range(i, i + rows):
            if lo[r // per] < hi[r // per]:
                start, stop = min(start, lo[r // per]), max(stop, hi[r // per])
        p0, p1, span, ao, bo = 0, panels, k, a_off + i * lda, b_off
        if depth:
            span = max(stop - start, 0)
            ao, bo = ao + start * a_step, bo + start * ldb
        elif start < stop:
            p0, p1 = start // PANEL, (stop + PANEL - 1) // PANEL
        else:
            p1 = 0  # no run: nothing of this strip is needed
        if depth and span == 0 and accumulate:
            p1 = 0  # nothing to add
        for p in range(p0, p1):
            _tile_rows(rows, span, alpha, a, ao, lda, a_step, b, bo + p * panel_step, ldb,
                       accumulate, c, c_off + i * ldc + p * PANEL, ldc)
        i += rows


@njit(inline="always")
def band_panels(lo, hi, m, n, panel_lo, panel_hi):  # pragma: no cover - compiled
    """From the runs ``[lo[r], hi[r])`` of columns of rows 0..m-1 (n columns): each panel p of
    PANEL columns gets ``[panel_lo[p], panel_hi[p])``, the rows from the first to the last whose
    run reaches it (empty when none does): the runs of a transposed product (``P^T @ dO``)."""
    for p in range((n + PANEL - 1) // PANEL):
        panel_lo[p], panel_hi[p] = m, 0
    for r in range(m):
        if lo[r] < hi[r]:
            for p in range(lo[r] // PANEL, (hi[r] + PANEL - 1) // PANEL):
                panel_lo[p] = min(panel_lo[p], r)
                panel_hi[p] = max(panel_hi[p], r + 1)


# Decoding's products: a few query rows (m <= 8) against a key tile. OpenBLAS packs the whole
# key tile for so few rows; these plain loops (unsigned indices: no wraparound, they vectorize
# over features) ran 1.5x (m = 8) to 6x (m = 1) faster per tile on an AMD EPYC (znver3).
# Decoding streams K and V once from beyond L2 with little arithmetic per byte: the loops ask
# for the rows AHEAD rows on (`prefetch`), so the loads overlap the products. Two decoding
# passes over 16 MiB of keys (or values), 4 rows, d = 64, one thread, AVX2 EPYC: the products
# of keys 1.19-1.36 ms -> 0.91-1.05 (with two keys per pass), of values 1.22-1.26 -> 1.00-1.03.
AHEAD = 16


@intrinsic
def prefetch(typingctx, x, index):
    """Ask the cache for the line holding the C-contiguous ``x``'s flat element ``index`` (a
    hint: a read, kept close; no load waits for it and it never faults)."""
    if not (isinstance(x, types.Array) and x.layout == "C" and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        address = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        builder.call(fn, [address, i32(0), i32(3), i32(1)])  # read, locality 3, data
        return context.get_dummy_value()

    return types.void(x, index), codegen


@njit(inline="always")
def _prefetch_rows(b, start, rows, ld, size):  # pragma: no cover - compiled
    """`prefetch` each cache line of ``rows`` rows of ``b`` ``ld`` apart from flat ``start``
    (all unsigned), when they lie inside its ``size`` elements."""
    if start + rows * ld <= size:
        for at in range(start, start + rows * ld, np.uint64(64 // b.itemsize)):
            prefetch(b, at)


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def rows_dot_keys(m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc):  # pragma: no cover
    """``C[r, j] = A[r, :] . B[j, :]`` (``C = A @ B^T``, m x n, summing k) on row-major tiles
    addressed like :func:`gemm_unchecked`'s; C is overwritten. Rows go four at a time against
    two rows of B, so each row of A is loaded once for two dot products and each row of B once
    for four (four rows against one key ran 1.5x faster than one by one in decoding; two keys
    per pass another 1.05-1.2x); the rest one by one."""
    U = np.uint64
    a, b, c = a.reshape(a.size), b.reshape(b.size), c.reshape(c.size)  # C-contiguous: views
    ao, bo, co, la, lb, lc = U(a_off), U(b_off), U(c_off), U(lda), U(ldb), U(ldc)
    size = U(b.size)
    r = U(0)
    while r + U(4) <= U(m):
        a0 = ao + r * la
        a1, a2, a3 = a0 + la, a0 + U(2) * la, a0 + U(3) * la
        c0 = co + r * lc
        j = U(0)
        while j + U(2) <= U(n):
            bj = bo + j * lb
            bk = bj + lb
            _prefetch_rows(b, bj + U(AHEAD) * lb, U(2), lb, size)
            t0 = t1 = t2 = t3 = u0 = u1 = u2 = u3 = c.dtype.type(0)
            for f in range(U(k)):
                x, y = b[bj + f], b[bk + f]
                p0, p1, p2, p3 = a[a0 + f], a[a1 + f], a[a2 + f], a[a3 + f]
                t0 += p0 * x
                t1 += p1 * x
                t2 += p2 * x
                t3 += p3 * x
                u0 += p0 * y
                u1 += p1 * y
                u2 += p2 * y
                u3 += p3 * y
            cj = c0 + j
            c[cj], c[cj + lc], c[cj + U(2) * lc], c[cj + U(3) * lc] = t0, t1, t2, t3
            cj += U(1)
            c[cj], c[cj + lc], c[cj + U(2) * lc], c[cj + U(3) * lc] = u0, u1, u2, u3
            j += U(2)
        if j < U(n):  # an odd key
            bj = bo + j * lb
            t0 = t1 = t2 = t3 = c.dtype.type(0)
            for f in range(U(k)):
                x = b[bj + f]
                t0 += a[a0 + f] * x
                t1 += a[a1 + f] * x
                t2 += a[a2 + f] * x
                t3 += a[a3 + f] * x
            cj = c0 + j
            c[cj], c[cj + lc], c[cj + U(2) * lc], c[cj + U(3) * lc] = t0, t1, t2, t3
        r += U(4)
    for rr in range(r, U(m)):
        ar = ao + rr * la
        for j in range(U(n)):
            bj = bo + j * lb
            _prefetch_rows(b, bj + U(AHEAD) * lb, U(1), lb, size)
            t = c.dtype.type(0)
            for f in range(U(k)):
                t += a[ar + f] * b[bj + f]
            c[co + rr * lc + j] = t


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def rows_mix_values(m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc):  # pragma: no cover
    """``C[r, :] += sum_j A[r, j] * B[j, :]`` (``C += A @ B``, m x n, summing k) on row-major
    tiles addressed like :func:`gemm_unchecked`'s (for finite B: a weight 0 times a NaN in B
    is NaN here, as in BLAS; see :func:`gemm_skip_zero`). Four rows of B at a time, so each
    row of C is loaded and stored once per four (decoding ran this 1.6x faster than one by
    one); the rest one by one."""
    U = np.uint64
    a, b, c = a.reshape(a.size), b.reshape(b.size), c.reshape(c.size)  # C-contiguous: views
    ao, bo, co, la, lb, lc = U(a_off), U(b_off), U(c_off), U(lda), U(ldb), U(ldc)
    size = U(b.size)
    j = U(0)
    while j + U(4) <= U(k):
        b0 = bo + j * lb
        b1, b2, b3 = b0 + lb, b0 + U(2) * lb, b0 + U(3) * lb
        _prefetch_rows(b, b0 + U(AHEAD) * lb, U(4), lb, size)
        for r in range(U(m)):
            ar = ao + r * la + j
            p0, p1, p2, p3 = a[ar], a[ar + U(1)], a[ar + U(2)], a[ar + U(3)]
            cr = co + r * lc
            for f in range(U(n)):
                c[cr + f] += p0 * b[b0 + f] + p1 * b[b1 + f] + p2 * b[b2 + f] + p3 * b[b3 + f]
        j += U(4)
    for jj in range(j, U(k)):
        bj = bo + jj * lb
        for r in range(U(m)):
            p = a[ao + r * la + jj]
            cr = co + r * lc
            for f in range(U(n)):
                c[cr + f] += p * b[bj + f]


@njit(inline="always", fastmath=FASTMATH)
def all_finite(x, off, n):  # pragma: no cover - compiled
    """Whether ``n`` elements of the C-contiguous ``x`` from flat ``off`` hold no NaN or inf:
    the sum of x * 0 is 0, else NaN (no 'nnan'/'ninf' among the flags, so it is kept)."""
    flat = x.reshape(x.size)
    zero = x.dtype.type(0)
    total = zero
    start = np.uint64(off)  # unsigned: no wraparound select, so the sum vectorizes (decoding
    for p in range(np.uint64(n)):  # ran 1.4x faster than with signed indices)
        total += flat[start + p] * zero
    return total == zero


# ----------------------------------------------------------------------------------------------
# Vectorizable max. Numba lowers max()/ternaries to compare+select that LLVM will not vectorize
# as a reduction; llvm.maxnum with nnan/nsz is recognised as an fmax reduction.
# ----------------------------------------------------------------------------------------------

_MAXNUM_FLAGS = ("nnan", "nsz")


@intrinsic
def fmax(typingctx, a, b):
    """``llvm.maxnum(a, b)`` for two floats of the same type (float32 or float64)."""
    if a not in (types.float32, types.float64) or b != a:
        return None

    def codegen(context, builder, signature, args):
        llty = context.get_value_type(a)
        fnty = ir.FunctionType(llty, [llty, llty])
        name = "llvm.maxnum.f32" if a == types.float32 else "llvm.maxnum.f64"
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        return builder.call(fn, list(args), fastmath=_MAXNUM_FLAGS)

    return a(a, b), codegen


@intrinsic
def keep_nan(typingctx, x, r):
    """``r``, or ``x`` where ``x`` is NaN: a select, not a branch (vectorizes, and no phi node
    when inlined many times); for functions whose clamps (maxnum) would drop a NaN argument."""
    if x not in (types.float32, types.float64) or r != x:
        return None

    def codegen(context, builder, signature, args):
        xv, rv = args
        return builder.select(builder.fcmp_unordered("uno", xv, xv), xv, rv)

    return x(x, r), codegen


@njit(fastmath=FASTMATH, cache=True)
def row_max(x, off, n):  # pragma: no cover - compiled
    """Max of ``x[off:off+n]`` (1-D array); ``-inf`` for ``n == 0`` or an all ``-inf`` run.

    No bounds checks (like every helper here): ``0 <= off`` and ``off + n <= x.size``.
    """
    # Unsigned indices: Numba emits no negative-index wraparound, so the loop vectorizes, and
    # no view is made (a slice costs an NRT incref/decref per row).
    base = np.uint64(off)
    m = x.dtype.type(-np.inf)
    for i in range(np.uint64(n)):
        m = fmax(m, x[base + i])
    return m


# ----------------------------------------------------------------------------------------------
# exp2. float32: 2**y = 2**n * 2**f with n = round(y), f in [-0.5, 0.5]; 2**f by a degree-6
# minimax polynomial (max rel. error ~9.7e-8 in float32 Horner), 2**n a float built from the
# exponent bits. float64: math.exp(y * ln 2), exact to ~1e-13 relative for |y| < 1000.
# ----------------------------------------------------------------------------------------------

# Coefficients of 2**f on [-0.5, 0.5] after the constant 1, relative-error minimax, rounded to
# float32 (degree 7 cost a third more per softmax step on an AVX2 EPYC for ~3e-8 of error)
_EXP2_POLY = (0.6931471824645996, 0.24022647738456726, 0.055503323674201965,
              0.00961843691766262, 0.0013398875016719103, 0.00015353361959569156)
_ZERO32 = np.float32(0.0)
# Below 2**-126 (the smallest normal) the result is flushed to 0: keeps 2**n a normal float.
_MIN_EXP32 = -126.0
_MAGIC32 = 12582912.0  # 1.5 * 2**23: in n + _MAGIC32 the low mantissa bits hold the integer n
_LN2 = math.log(2.0)


@intrinsic
def exp2_f32(typingctx, y):
    """2**y for float32 y: rel. error < 1e-7 on [-126, 127]; 0 below -126 and for -inf; NaN
    for NaN (a NaN logit must reach the row's sum, not vanish as a weight 0).

    Straight-line LLVM IR, no branch: a loop calling it vectorizes (the softmax step, the
    backward's P, fx.tanh), and it may be inlined any number of times. Every step is written
    so that the kernels' fast-math flags cannot undo it (Numba puts them on every float
    instruction of a function, this one's too once inlined): n = rint(y) by llvm.rint, not
    the (y + magic) - magic that 'reassoc' folds to y; 2**n from the bits of n + magic, not
    fptosi (poison for NaN); and 2**f * 2**n a multiplication, which carries a NaN through
    whatever bits 2**n got from it.
    """
    if y != types.float32:
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        f32, i32 = ir.FloatType(), ir.IntType(32)

        def const(x: float) -> ir.Constant:
            return ir.Constant(f32, x)

        def call(name: str, *xs: ir.Value) -> ir.Value:
            fnty = ir.FunctionType(f32, [f32] * len(xs))
            return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), xs)

        low = builder.fcmp_ordered("<", value, const(_MIN_EXP32))  # false for NaN
        clamped = builder.select(low, const(_MIN_EXP32), value)
        n = call("llvm.rint.f32", clamped)
        f = builder.fsub(clamped, n)  # exact, in [-0.5, 0.5]
        p = const(_EXP2_POLY[-1])
        for c in (*_EXP2_POLY[-2::-1], 1.0):  # Horner, p(0) = 1 exactly
            p = call("llvm.fma.f32", p, f, const(c))
        n_bits = builder.bitcast(builder.fadd(n, const(_MAGIC32)), i32)  # low bits: n
        biased = builder.add(builder.shl(n_bits, ir.Constant(i32, 23)), ir.Constant(i32, 127 << 23))
        result = builder.fmul(p, builder.bitcast(biased, f32))  # p * 2**n, exact
        return builder.select(low, const(0.0), result)

    return types.float32(types.float32), codegen


@njit(fastmath=FASTMATH, inline="always")
def exp2_f64(y):  # pragma: no cover - compiled
    """2**y for float64 y via math.exp (libm accuracy; -inf -> 0)."""
    return math.exp(y * _LN2)


_LOG2E32 = np.float32(1.4426950408889634)
_ONE32 = np.float32(1.0)
_ELU_NEAR = np.float32(-0.5)
# expm1's Taylor coefficients 1/2!, ..., 1/10!
_E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10 = (np.float32(1 / math.factorial(n))
                                                 for n in range(2, 11))


@njit(fastmath=FASTMATH)
def elu_f32(v):  # pragma: no cover - compiled
    """elu(v) for float32 v, branch-free (a loop calling it vectorizes; libm's expm1f does not):
    above -0.5, expm1 by its Taylor series to v^10 (truncation < 3e-10); below, exp(v) - 1
    with exp2_f32 (the result is at least 0.39 in size there, so the subtraction loses
    nothing). NaN stays NaN, -inf gives -1, -0.0 gives 0.0. NumPy's elu (numpy_ops) and the
    kernels' fx.elu both call this: the same bits."""
    t = _E9 + v * _E10
    t = _E8 + v * t
    t = _E7 + v * t
    t = _E6 + v * t
    t = _E5 + v * t
    t = _E4 + v * t
    t = _E3 + v * t
    t = _E2 + v * t
    near = v + v * v * t
    far = exp2_f32(v * _LOG2E32) - _ONE32  # -inf: 0 - 1
    below = near if v > _ELU_NEAR else far
    return below if v <= _ZERO32 else v  # NaN: neither test holds -> NaN itself


@njit(fastmath=FASTMATH)
def elu_grad_f32(v):  # pragma: no cover - compiled
    """elu'(v) = 1 if v > 0 else exp(v), for float32 v through exp2_f32 (vectorizes; 0 for
    -inf, NaN for NaN)."""
    return _ONE32 if v > _ZERO32 else exp2_f32(v * _LOG2E32)


def exp2(y):  # pragma: no cover - replaced by the overload inside compiled code
    """2**y for a float32 or float64 scalar (dispatches to exp2_f32 / exp2_f64); njit only."""
    raise NotImplementedError("exp2 is only callable from Numba-compiled code")


@overload(exp2, inline="always", fastmath=FASTMATH)
def _exp2_overload(y):
    if y == types.float32:
        return lambda y: exp2_f32(y)
    if y == types.float64:
        return lambda y: exp2_f64(y)
    return None


@njit(fastmath=FASTMATH, cache=True)
def exp2_shift(x, off, n, shift):  # pragma: no cover - compiled
    """``x[off+i] = 2**(x[off+i] - shift)`` for i < n (P from scores and a saved lse)."""
    base = np.uint64(off)  # unsigned: no wraparound, vectorizes (see row_max)
    s = x.dtype.type(shift)
    for i in range(np.uint64(n)):
        x[base + i] = exp2(x[base + i] - s)


@njit(fastmath=FASTMATH, cache=True)
def exp2_shift_sum(x, off, n, shift):  # pragma: no cover - compiled
    """``x[off+i] = 2**(x[off+i] - shift)`` for i < n, returning the sum (in x's dtype).

    The softmax step on a score row in base 2: ``shift`` is the row max (must be finite;
    the kernel substitutes 0 for a fully masked row), masked ``-inf`` entries become 0.
    """
    base = np.uint64(off)  # unsigned: no wraparound, vectorizes (see row_max)
    s = x.dtype.type(shift)
    acc = x.dtype.type(0.0)
    for i in range(np.uint64(n)):
        e = exp2(x[base + i] - s)
        x[base + i] = e
        acc += e
    return acc


# ----------------------------------------------------------------------------------------------
# Host-side helpers of the launcher (runtime/cpu_kernel.py): O(N d) passes over the row operands.
# ----------------------------------------------------------------------------------------------

# The finiteness checks below sum ``e * 0``: reassociated (vectorized, not one add after
# another), but no other fast-math flag, so LLVM keeps the product (NaN for NaN and inf).
_SUM_ONLY = {"reassoc"}
_TRANSPOSE_BLOCK = 64  # keys per unit of transposed_rows: read once, written d columns apart

# These passes run on the kernels' threads (runtime/threads.py), not as Numba parfors: a parfor
# launch cost 0.13-0.2 ms even on an empty array (the workqueue's helper wakes late on these
# VMs, and every chunk is waited for), and key_panels' parfor sliced a view per panel. Each
# task takes whole units (a panel, a block of keys, a row...) worth _PASS_BYTES or more: with
# units of a few microseconds each, the thread returning from its range waited for the GIL
# while the other claimed range after range, and two threads ran slower than one. Each task
# writes its own flag (a NaN or inf seen): no task waits on another. Full softmax, N = 2048,
# 8 heads, d = 64, float32, AVX2 EPYC, 2 threads, medians of 22 calls: the forward's prologue
# (before its kernel starts) 3.0-3.5 ms against 3.9-4.4 with parfors, the backward's 6.4-7.1
# against 7.7-7.9; tasks of 16 MiB (one thread at this size) 3.6-3.7 and 6.8-7.5.
_PASS_BYTES = 1 << 20


def _pass(kernel: Any, units: int, unit_bytes: int, *args: Any, flags: bool = False) -> bool:
    """`kernel(lo, hi, per, *args)` on every thread, its tasks `per` units each. With `flags`,
    the kernel also takes `bad`, one flag per task (a NaN or inf seen), and the result says
    whether none was set."""
    per = max(1, _PASS_BYTES // max(1, unit_bytes))
    tasks = -(-units // per)
    bad = np.zeros(tasks if flags else 0, np.bool_)
    threads.run(kernel, tasks, per, *args, *((bad,) if flags else ()))
    return not bad.any()


@njit(cache=True, nogil=True)
def _transposed_rows_tasks(lo, hi, per, x, out, bad):  # pragma: no cover - compiled
    B, H, n, F = x.shape
    blocks = (n + _TRANSPOSE_BLOCK - 1) // _TRANSPOSE_BLOCK
    zero = x.dtype.type(0)
    for task in range(lo, hi):
        nonfinite = zero
        for unit in range(task * per, min((task + 1) * per, B * H * blocks)):
            b, h = unit // (H * blocks), (unit // blocks) % H
            j0 = (unit % blocks) * _TRANSPOSE_BLOCK
            j1 = min(j0 + _TRANSPOSE_BLOCK, n)
            for c in range(F):
                for j in range(j0, j1):
                    e = x[b, h, j, c]
                    out[b, h, c, j] = e
                    nonfinite += e * zero
        bad[task] = nonfinite != zero  # NaN from a NaN or inf


def transposed_rows(x: np.ndarray, out: np.ndarray) -> bool:
    """``x`` [B, H, n, F] written into ``out``, a C-contiguous [B, H, F, n]; whether every
    element is finite.

    The GEMMs' key operands, transposed in blocks of keys, with the finiteness check of the
    careful path in the same pass over ``x`` (summing ``e * 0``, as `finite_everywhere` does:
    counting `not isfinite(e)` ran the pass 2.3x slower on an AVX2 EPYC).
    """
    B, H, n, F = x.shape
    return _pass(_transposed_rows_tasks, B * H * -(-n // _TRANSPOSE_BLOCK),
                 _TRANSPOSE_BLOCK * F * x.itemsize, x, out, flags=True)


@njit(cache=True, nogil=True, fastmath=_SUM_ONLY)
def _key_panels_tasks(lo, hi, per, x, out, bad):  # pragma: no cover - compiled
    B, H, n, F = x.shape
    P = out.shape[2]
    zero = x.dtype.type(0)
    for task in range(lo, hi):
        nonfinite = zero
        for unit in range(task * per, min((task + 1) * per, B * H * P)):
            b, h, p = unit // (H * P), (unit // P) % H, unit % P
            j0 = p * PANEL
            width = min(PANEL, n - j0)
            rows = x[b, h]  # unsigned indices below: they vectorize (see row_max)
            for j in range(np.uint64(j0), np.uint64(j0 + width)):  # its own pass (key_panels)
                for c in range(np.uint64(F)):
                    nonfinite += rows[j, c] * zero
            if width == PANEL:  # a constant trip count: LLVM unrolls the copy (1.6x faster)
                for c in range(F):
                    for jj in range(PANEL):
                        out[b, h, p, c, jj] = x[b, h, j0 + jj, c]
                continue
            for c in range(F):
                for jj in range(width):
                    out[b, h, p, c, jj] = x[b, h, j0 + jj, c]
                for jj in range(width, PANEL):
                    out[b, h, p, c, jj] = zero
        bad[task] = nonfinite != zero


def key_panels(x: np.ndarray, out: np.ndarray) -> bool:
    """``x`` [B, H, n, F] packed into ``out``, a C-contiguous [B, H, P, F, PANEL] with
    P = ceil(n / PANEL) (zeros past key n); whether every element of ``x`` is finite.

    The GEMMs' key operands for `micro_gemm`: panel p holds keys p * PANEL .. p * PANEL +
    PANEL - 1 as its columns, one contiguous PANEL-wide row per feature (the layout a BLAS packs
    on every call, packed here once per call), checked for finiteness as in `transposed_rows`
    (a pass of its own over the panel's rows, contiguous: summed in the copy, the check cost
    more than the copy).
    """
    B, H, _, F = x.shape
    return _pass(_key_panels_tasks, B * H * out.shape[2], PANEL * F * x.itemsize, x, out,
                 flags=True)


@njit(cache=True, nogil=True)
def _value_panels_tasks(lo, hi, per, x, out):  # pragma: no cover - compiled
    B, H, n, F = x.shape
    for task in range(lo, hi):
        for unit in range(task * per, min((task + 1) * per, B * H * n)):
            b, h, j = unit // (H * n), (unit // n) % H, unit % n
            for p in range(F // PANEL):
                for c in range(PANEL):
                    out[b, h, p, j, c] = x[b, h, j, p * PANEL + c]


def value_panels(x: np.ndarray, out: np.ndarray) -> None:
    """``x`` [B, H, n, F] with F a multiple of PANEL packed into ``out``, a C-contiguous
    [B, H, F / PANEL, n, PANEL]: panel p holds columns p * PANEL .. p * PANEL + PANEL - 1 of
    every row, for `micro_gemm` (v for ``P @ v``, dO and q in the backward: read one contiguous
    panel at a time)."""
    B, H, n, F = x.shape
    _pass(_value_panels_tasks, B * H * n, F * x.itemsize, x, out)


@njit(cache=True, nogil=True, fastmath=_SUM_ONLY)
def _finite_tasks(lo, hi, per, flat, bad):  # pragma: no cover - compiled
    zero = flat.dtype.type(0)
    for task in range(lo, hi):
        nonfinite = zero
        # unsigned: no negative-index wraparound, so the loop vectorizes (10x, see row_max)
        for p in range(np.uint64(task * per), np.uint64(min((task + 1) * per, flat.size))):
            nonfinite += flat[p] * zero
        bad[task] = nonfinite != zero


def finite_everywhere(x: np.ndarray) -> bool:
    """Whether the C-contiguous ``x`` holds no NaN or inf: the careful path's check of a row
    operand, without the boolean array of ``np.isfinite(x).all()`` (a fresh N x d mapping).

    Both checks here sum ``e * 0`` over the elements: 0 (or -0) while every ``e`` is finite,
    NaN from the first NaN or inf on (these helpers are compiled without fast-math, so the
    product is not folded away). It vectorizes, where counting `not isfinite(e)` did not.
    """
    flat = x.reshape(x.size)
    return _pass(_finite_tasks, flat.size, flat.itemsize, flat, flags=True)


@njit(cache=True, nogil=True, fastmath=_SUM_ONLY)
def _row_dots_tasks(lo, hi, per, a, b, out):  # pragma: no cover - compiled
    rows, F = out.size, a.shape[-1]
    a2, b2, out1 = a.reshape((rows, F)), b.reshape((rows, F)), out.reshape(rows)
    for task in range(lo, hi):
        for r in range(task * per, min((task + 1) * per, rows)):
            total = a.dtype.type(0)
            for c in range(np.uint64(F)):  # unsigned: vectorizes (see row_max)
                total += a2[r, c] * b2[r, c]
            out1[r] = total


def row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a * b).sum(-1)`` for C-contiguous ``a``, ``b`` [..., F] of one dtype, in that dtype:
    the backward's D = rowsum(dO * O), one pass on every thread (NumPy's product and sum made
    an N x F array first and ran on one thread: 1.0 ms at N = 2048, 8 heads, d = 64; 0.18 ms
    here on one)."""
    out = np.empty(a.shape[:-1], a.dtype)
    _pass(_row_dots_tasks, out.size, 2 * a.shape[-1] * a.itemsize, a, b, out)
    return out


# ----------------------------------------------------------------------------------------------
# BLAS threading. OpenBLAS threads its own GEMMs (>= ~64x64x64); inside a kernel every thread
# would then fork BLAS threads too -> oversubscription. Kernels calling gemm on threads must
# run with BLAS single-threaded: either OPENBLAS_NUM_THREADS=1 in the environment before NumPy or
# SciPy is first imported, or wrap each launch in `with single_threaded_blas():`.
# ----------------------------------------------------------------------------------------------


def _scipy_openblas() -> ctypes.CDLL | None:
    """The OpenBLAS that scipy.linalg.cython_blas uses (already loaded), if found."""
    import scipy

    libdir = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
        try:
            return ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
        except OSError:
            continue
    return None


def _openblas_fns() -> tuple[object, object] | None:
    lib = _scipy_openblas()
    if lib is None:
        return None
    for prefix in ("scipy_openblas", "openblas"):
        try:
            get_fn = getattr(lib, f"{prefix}_get_num_threads")
            set_fn = getattr(lib, f"{prefix}_set_num_threads")
        except AttributeError:
            continue
        get_fn.restype, get_fn.argtypes = ctypes.c_int, []
        set_fn.restype, set_fn.argtypes = None, [ctypes.c_int]
        return get_fn, set_fn
    return None


_OPENBLAS = _openblas_fns()


def blas_num_threads() -> int | None:
    """Threads SciPy's OpenBLAS (the one gemm calls) currently uses; None if unknown."""
    return None if _OPENBLAS is None else int(_OPENBLAS[0]())


def set_blas_num_threads(n: int) -> int | None:
    """Set SciPy's OpenBLAS thread count process-wide; returns the previous count."""
    if _OPENBLAS is not None:
        prev = int(_OPENBLAS[0]())
        _OPENBLAS[1](int(n))
        return prev
    try:  # Non-OpenBLAS SciPy builds: fall back to threadpoolctl when it is installed.
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    threadpool_limits(limits=int(n), user_api="blas")
    return None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the body with gemm's BLAS single-threaded; restores the previous count on exit.

    Enter it in the Python launcher around every threaded kernel launch that calls gemm
    (about 1 us per entry). It changes process-wide state, so don't run other BLAS work on
    other Python threads meanwhile.
    """
    prev = set_blas_num_threads(1)
    try:
        yield
    finally:
        if prev is not None and prev != 1:
            set_blas_num_threads(prev)
