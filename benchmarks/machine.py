"""What every benchmark result records about the machine it ran on."""

from __future__ import annotations

import platform
import subprocess


def lscpu_model() -> str:
    """lscpu's model name: the CPU changes between machines, so every result records it
    (Python's idea of the processor where lscpu cannot run)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name:")), "unknown")
