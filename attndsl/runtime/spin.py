"""Spinning without the GIL, for runtime/threads.py: a helper waiting for the next launch and
a caller waiting for its helpers' last ranges poll a flag (a 1-element int64 array) in nogil
compiled loops, so neither sleeps (on these VMs a sleeping thread woke 70-170 us late).

Imported by threads.py at its first launch, not at import: defining a Numba function fixes
Numba's CPU features for the process, and cpu_intrinsics must be able to set them first
(ATTNDSL_PREFER_512BIT).
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _load_acquire(typingctx, flag):  # type: ignore[no-untyped-def]
    """`flag[0]` of a 1-element int64 array, read from memory each time (an atomic acquire
    load: LLVM may not hoist it out of a loop that writes nothing)."""
    if not (isinstance(flag, types.Array) and flag.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.load_atomic(data, ordering="acquire", align=8)

    return types.int64(flag), codegen


@intrinsic
def _pause(typingctx):  # type: ignore[no-untyped-def]
    """The CPU's spin-wait hint (x86 `pause`; nothing elsewhere)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        if _X86:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _atomic_add(typingctx, flag, delta):  # type: ignore[no-untyped-def]
    """`flag[0] += delta` of a 1-element int64 array, atomically (acquire and release: what
    this thread wrote before is seen by the thread that reads the new value)."""
    if not (isinstance(flag, types.Array) and flag.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        amount = context.cast(builder, args[1], signature.args[1], types.int64)
        builder.atomic_rmw("add", data, amount, "acq_rel")
        return context.get_dummy_value()

    return types.void(flag, delta), codegen


@njit(nogil=True, cache=True)
def join(busy):  # pragma: no cover - compiled
    """`busy[0] += 1`, atomically (another helper may be leaving, without the GIL)."""
    _atomic_add(busy, 1)


@njit(nogil=True, cache=True)
def leave_and_spin(busy, flag, value, rounds):  # pragma: no cover - compiled
    """A helper leaving a launch: `busy[0] -= 1` once the GIL is released (the caller, which
    spins until it reads 0, then takes a free GIL: were the helper still holding it, the
    caller would sleep on it and wake late), then `spin(flag, value, True, rounds)`."""
    if busy.size:
        _atomic_add(busy, -1)
    return spin(flag, value, True, rounds)


@njit(nogil=True, cache=True)
def spin(flag, value, equal, rounds):  # pragma: no cover - compiled
    """Spin (without the GIL) while `(flag[0] == value) == equal`, for `rounds` polls after
    the first; whether it stopped holding."""
    for _ in range(rounds):
        if (_load_acquire(flag) == value) != equal:
            return True
        _pause()
    return (_load_acquire(flag) == value) != equal
