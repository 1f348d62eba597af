"""The CUDA toolchain around Numba: PTX without a GPU, ptxas reports, device-array staging.

Everything CUDA-specific that is not kernel source lives here, so `numba_cuda.py` only emits
text. Two ways to prove a kernel on a machine without a GPU (docs/cuda.md):

* the simulator: ``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported runs kernels as
  Python threads (no PTX, no ``compile_ptx``);
* the compiler: ``compile_ptx`` (libNVVM from the ``numba-cuda[cu12]`` wheels) then
  ``assemble`` with ptxas gives registers, spills and shared memory per kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INSTALL_HINT = (
    "the CUDA target needs numba-cuda: install attndsl[cuda] "
    "(pip install 'attndsl[cuda]', which pulls numba-cuda[cu12] with NVVM, NVRTC and ptxas)"
)


class CudaToolchainError(RuntimeError):
    """ptxas or the CUDA compiler is missing or failed."""


# --- availability ---------------------------------------------------------------------------


def simulator_enabled() -> bool:
    """True when Numba runs CUDA kernels in its Python simulator (NUMBA_ENABLE_CUDASIM=1).

    Numba reads the variable once, at import; after that only its config is authoritative.
    """
    if importlib.util.find_spec("numba") is not None:
        from numba.core import config

        return bool(getattr(config, "ENABLE_CUDASIM", False))
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def numba_cuda_installed() -> bool:
    """True when the NVIDIA-maintained numba-cuda package provides ``numba.cuda``."""
    return importlib.util.find_spec("numba_cuda") is not None


def require_cuda() -> Any:
    """Return the ``numba.cuda`` module, or raise ImportError saying what to install.

    Numba 0.68 still ships a deprecated built-in ``numba.cuda``; attndsl only supports the
    numba-cuda package that replaces it (``numba.cuda.implementation == "NVIDIA"``).
    """
    if not numba_cuda_installed():
        raise ImportError(INSTALL_HINT)
    from numba import cuda

    if getattr(cuda, "implementation", None) != "NVIDIA":
        raise ImportError(f"numba.cuda is Numba's built-in CUDA target; {INSTALL_HINT}")
    return cuda


# --- PTX --------------------------------------------------------------------------------------


def compile_ptx(
    pyfunc: Callable[..., Any],
    signature: str | tuple[Any, ...],
    cc: tuple[int, int] = (8, 0),
    fastmath: bool = False,
    launch_bounds: int | tuple[int, ...] | None = None,
    lineinfo: bool = False,
) -> str:
    """PTX for one kernel (``pyfunc`` or a ``cuda.jit`` dispatcher) at compute capability ``cc``.

    Needs no GPU and no driver: libNVVM compiles for the ``cc`` given. The signature must
    type every scalar (``float32``, ``int32``): a missing one would be inferred at launch, where
    a Python float becomes float64. Not available under the simulator.
    """
    if simulator_enabled():
        raise CudaToolchainError(
            "compile_ptx is unavailable under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1); "
            "run the PTX checks in a process without it"
        )
    cuda = require_cuda()
    fn = getattr(pyfunc, "py_func", pyfunc)
    ptx, _ = cuda.compile_ptx(
        fn,
        signature,
        cc=cc,
        fastmath=fastmath,
        launch_bounds=launch_bounds,
        lineinfo=lineinfo,
    )
    return str(ptx)


def ptx_entries(ptx: str) -> list[str]:
    """Mangled names of the ``.entry`` kernels in a PTX module."""
    return re.findall(r"\.entry\s+([\w$.]+)\s*\(", ptx)


# Instructions whose operands are float64: arithmetic, comparisons and special functions.
_F64_OP = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w]*)((?:\.[\w]+)*)\s")
_MOVE_OPS = frozenset({"ld", "st", "mov", "cvta", "ldu", "shfl", "atom", "red"})


@dataclass(frozen=True)
class F64Instruction:
    line: int
    text: str
    kind: str  # "arith" (math, compare, select), "convert" (cvt to/from f64), "move" (ld/st/mov)


def f64_instructions(ptx: str) -> list[F64Instruction]:
    """Every PTX instruction with a ``.f64`` operand type, classified.

    Register declarations (``.reg .f64``), comments and directives are not instructions.
    A float32 kernel should have none; a lone ``convert`` usually means a float64 literal or a
    Python float scalar argument leaked in and was narrowed straight back.
    """
    found: list[F64Instruction] = []
    for n, raw in enumerate(ptx.splitlines(), start=1):
        text = raw.split("//", 1)[0].strip()
        if not text or text.startswith(".") or ".f64" not in text:
            continue
        m = _F64_OP.match(text)
        if m is None:
            continue
        opcode, suffixes = m.group(1), m.group(2)
        if ".f64" not in suffixes:
            continue
        if opcode == "cvt":
            kind = "convert"
        elif opcode in _MOVE_OPS:
            kind = "move"
        else:
            kind = "arith"
        found.append(F64Instruction(n, text, kind))
    return found


def has_f64(ptx: str, include_conversions: bool = True) -> bool:
    """True when the PTX computes in float64.

    ``include_conversions=False`` ignores ``cvt`` to/from f64 and f64 loads/stores/moves, and
    only reports float64 arithmetic (add, mul, fma, div, setp, ex2, ...).
    """
    kinds = {"arith", "convert", "move"} if include_conversions else {"arith"}
    return any(ins.kind in kinds for ins in f64_instructions(ptx))


# --- ptxas ------------------------------------------------------------------------------------


def _pip_ptxas() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "cuda_nvcc" / "bin" / "ptxas"
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def find_ptxas() -> Path:
    """Path to ptxas, preferring the one that matches Numba's NVVM.

    Order: ``$ATTNDSL_PTXAS``; the ``nvidia-cuda-nvcc-cu12`` wheel (installed by
    ``numba-cuda[cu12]``, same 12.x release as its libNVVM, so it accepts the PTX ISA it
    emits); ``$CUDA_HOME/bin``; ``ptxas`` on PATH; ``/usr/local/cuda/bin``. A ptxas older than
    the NVVM rejects the PTX (``Unsupported .version``).
    """
    candidates: list[Path | None] = []
    if os.environ.get("ATTNDSL_PTXAS"):
        candidates.append(Path(os.environ["ATTNDSL_PTXAS"]))
    candidates.append(_pip_ptxas())
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "ptxas")
    which = shutil.which("ptxas")
    candidates.append(Path(which) if which else None)
    candidates.append(Path("/usr/local/cuda/bin/ptxas"))
    for c in candidates:
        if c is not None and c.is_file() and os.access(c, os.X_OK):
            return c
    raise CudaToolchainError(f"ptxas not found; {INSTALL_HINT}, or set ATTNDSL_PTXAS")


@dataclass(frozen=True)
class AssemblyReport:
    """What ``ptxas -v`` says about one kernel (entry) of a PTX module."""

    function: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int  # static shared memory (smem)
    stack_bytes: int  # local-memory stack frame: spills plus local arrays not in registers
    log: str = field(repr=False)


_FUNC_PROPS = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, "
    r"(\d+) bytes spill stores, (\d+) bytes spill loads"
)
_USED = re.compile(r"Compiling entry function '([^']+)'.*?Used (\d+) registers([^\n]*)", re.DOTALL)
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, AssemblyReport]:
    """Per-entry reports from the text of ``ptxas -v``."""
    props = {m.group(1): tuple(int(g) for g in m.groups()[1:]) for m in _FUNC_PROPS.finditer(log)}
    reports = {}
    for m in _USED.finditer(log):
        name, regs, rest = m.group(1), int(m.group(2)), m.group(3)
        stack, stores, loads = props.get(name, (0, 0, 0))
        smem = _SMEM.search(rest)
        reports[name] = AssemblyReport(
            function=name,
            registers=regs,
            spill_stores=stores,
            spill_loads=loads,
            shared_bytes=int(smem.group(1)) if smem else 0,
            stack_bytes=stack,
            log=log,
        )
    return reports


def assemble_all(ptx: str, cc: tuple[int, int] = (8, 0), ptxas: Path | None = None
                 ) -> dict[str, AssemblyReport]:
    """Assemble PTX with ``ptxas -arch=sm_XY -v``; one report per ``.entry``."""
    exe = ptxas or find_ptxas()
    arch = f"sm_{cc[0]}{cc[1]}"
    with tempfile.TemporaryDirectory(prefix="attndsl-ptxas-") as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        proc = subprocess.run(
            [str(exe), f"-arch={arch}", "-v", str(src), "-o", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise CudaToolchainError(f"ptxas -arch={arch} failed ({exe}):\n{log}")
    return parse_ptxas_log(log)


def assemble(ptx: str, cc: tuple[int, int] = (8, 0), ptxas: Path | None = None
             ) -> AssemblyReport:
    """Assemble a one-kernel PTX module and report its registers, spills and shared memory."""
    reports = assemble_all(ptx, cc, ptxas)
    if len(reports) != 1:
        raise CudaToolchainError(f"expected one entry in the PTX, ptxas reported {list(reports)}")
    return next(iter(reports.values()))


# --- device arrays ----------------------------------------------------------------------------


def is_device_array(obj: Any) -> bool:
    """True for arrays already on the GPU: anything with ``__cuda_array_interface__`` (Numba
    device arrays, CuPy, torch CUDA tensors), or a simulator device array."""
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    if simulator_enabled():
        from numba.cuda.simulator.cudadrv.devicearray import is_cuda_ndarray

        return bool(is_cuda_ndarray(obj))
    return False


@dataclass
class DeviceArgs:
    """Kernel arguments staged on the device, and where results go back to.

    ``on_host`` is True when the caller passed NumPy arrays: ``result`` then copies outputs
    back. With device inputs, outputs stay on the device (no copies, no synchronisation).
    """

    arrays: tuple[Any, ...]
    on_host: bool
    stream: Any = 0

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An uninitialised C-order device array, for an output."""
        return require_cuda().device_array(shape, dtype=np.dtype(dtype), stream=self.stream)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zero-filled device array (copied up: device_array is uninitialised)."""
        return require_cuda().to_device(np.zeros(shape, dtype), stream=self.stream)

    def result(self, *device_arrays: Any) -> Any:
        """Outputs as the caller's kind of array: NumPy for NumPy inputs, else device arrays."""
        if self.on_host:
            outs = tuple(a.copy_to_host(stream=self.stream) for a in device_arrays)
        else:
            outs = device_arrays
        return outs[0] if len(outs) == 1 else outs


def as_device_arrays(*arrays: Any, stream: Any = 0) -> DeviceArgs:
    """Stage kernel inputs: NumPy arrays are made C-contiguous and copied to the device;
    device arrays are wrapped in place (``numba.cuda.as_cuda_array``) and must be C-contiguous.
    ``None`` passes through. Mixing host and device arrays is a TypeError: say where to compute.
    """
    cuda = require_cuda()
    present = [a for a in arrays if a is not None]
    on_device = [is_device_array(a) for a in present]
    if any(on_device) and not all(on_device):
        raise TypeError(
            "mix of NumPy and CUDA arrays: pass all inputs on the host or all on the device"
        )
    on_host = not any(on_device)
    staged: list[Any] = []
    for a in arrays:
        if a is None:
            staged.append(None)
        elif on_host:
            staged.append(cuda.to_device(np.ascontiguousarray(a), stream=stream))
        else:
            dev = a if not hasattr(a, "__cuda_array_interface__") else _as_cuda_array(cuda, a)
            if not dev.is_c_contiguous():
                raise ValueError(
                    f"device array of shape {tuple(dev.shape)} is not C-contiguous; "
                    "make it contiguous (e.g. .contiguous() / cupy.ascontiguousarray) first"
                )
            staged.append(dev)
    return DeviceArgs(tuple(staged), on_host, stream)


def _as_cuda_array(cuda: Any, obj: Any) -> Any:
    # Numba's own device arrays are already DeviceNDArray; as_cuda_array would re-wrap them.
    if hasattr(obj, "copy_to_host") and hasattr(obj, "is_c_contiguous"):
        return obj
    return cuda.as_cuda_array(obj)
