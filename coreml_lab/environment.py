"""Where a run happened: OS and version, chip, Python and library versions, runtime."""

from __future__ import annotations

import platform

import coremltools as ct
import numpy as np
import torch


def environment(runtime: str) -> dict:
    """Where a run happened: OS and version, chip, library versions, runtime (measured or emulated)."""
    mac = platform.mac_ver()[0]
    return {
        "os": platform.system(), "os_version": mac or platform.release(), "machine": platform.machine(),
        "chip": platform.processor() or platform.machine(), "python": platform.python_version(),
        "coremltools": ct.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "runtime": runtime, "measured": runtime == "coreml",
    }
