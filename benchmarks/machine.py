"""What every benchmark result records about the machine it ran on."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def lscpu_model() -> str:
    """lscpu's model name: the CPU changes between machines, so every result records it
    (Python's idea of the processor where lscpu cannot run)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name:")), "unknown")


def vector_isa(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The widest vector instruction set the CPU advertises (from /proc/cpuinfo's flags): LLVM
    and torch's kernels pick their code paths by it, so two results are comparable only when
    it is recorded with them."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "unknown"
    flags = set(next((line.split(":", 1)[1] for line in text.splitlines()
                      if line.startswith(("flags", "Features"))), "").split())
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"),
                       ("sse4_2", "SSE4.2"), ("sve", "SVE"), ("asimd", "NEON")):
        if flag in flags:
            return name
    return "none of AVX/SSE4.2/NEON"
