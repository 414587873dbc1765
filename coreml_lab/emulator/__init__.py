"""Run converted Core ML ML Programs on any OS, under per-compute-unit precision profiles.

``EmulatedModel(mlmodel_or_path, compute_unit=...)`` behaves like
``MLModel.predict``; :mod:`.profiles` says how each compute unit holds and
computes FP16-typed ops; :func:`supported_ops` lists the MIL ops it executes.
Emulated numbers reveal precision risk; they are not bit-exact device output.
"""

from .device_facts import provenance
from .interpreter import OpExecutionError, OpRecord, UnsupportedOpError
from .model import EmulatedModel, EmulatedState, EmulatorInputError
from .profiles import (
                       PROFILES,
                       Device,
                       DeviceProfile,
                       Precision,
                       get_profile,
                       gpu_fp16_accumulation,
                       ne_fp16_accumulation,
                       ne_profile,
                       strict_fp16_cpu,
)
from .program import NotAnMLProgramError
from .registry import coverage_rows, supported_ops

__all__ = [
    "EmulatedModel", "EmulatedState", "EmulatorInputError", "OpRecord", "UnsupportedOpError",
    "OpExecutionError", "NotAnMLProgramError", "PROFILES", "Device", "DeviceProfile", "Precision",
    "get_profile", "strict_fp16_cpu", "gpu_fp16_accumulation", "ne_fp16_accumulation", "ne_profile", "provenance",
    "supported_ops", "coverage_rows",
]
