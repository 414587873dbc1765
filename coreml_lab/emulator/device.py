"""What a profile is made of: Precision (how an op computes), Device (one piece of silicon), DeviceProfile.

A :class:`DeviceProfile` is a compute unit: its devices in preference order; for every op it
says which device runs it and with what :class:`Precision` (:meth:`DeviceProfile.place`). The
profiles themselves (CPU_ONLY, CPU_AND_GPU, CPU_AND_NE, ALL and their variants) are
:mod:`.profiles`'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .device_rules import HAZARDS, NE_RULES

FP16 = "fp16"
FP32 = "fp32"

_TORCH = {FP16: torch.float16, FP32: torch.float32}

#: Op families. Kernels register under one; profiles can set precision per family.
FAMILIES = (
    "elementwise",   # unary/binary arithmetic, comparison, logical, cast
    "activation",    # relu, gelu, softplus, softmax ...
    "reduction",     # reduce_*, cumsum, argmax/argmin
    "normalization",  # batch/layer/instance/group/l2 norm, LRN
    "linear",        # linear, matmul, einsum
    "conv",          # conv, conv_transpose
    "pool",          # max/avg/l2 pool
    "resize",        # upsample/resize/crop_resize
    "attention",     # scaled_dot_product_attention
    "recurrent",     # lstm, gru, rnn
    "tensor",        # reshape/transpose/slice/concat/gather/scatter/pad/...
    "control",       # cond, while_loop, select, lists
    "constexpr",     # weight decompression (runs at load time on device)
    "state",         # read_state / coreml_update_state
    "misc",          # random, classify, nms ...
)


@dataclass(frozen=True)
class Precision:
    """How one op computes: dtype tensors are held in, arithmetic, and sums.

    ``storage`` applies to tensors the program declares FP16 (FP32-declared tensors
    are always FP32). ``compute`` is the dtype of intermediate arithmetic inside a
    composite op (softmax, layer_norm, gelu ...). ``accumulate`` is the dtype of
    running sums in reductions and dot products.
    """

    storage: str = FP32
    compute: str = FP32
    accumulate: str = FP32

    def __post_init__(self):
        for f in ("storage", "compute", "accumulate"):
            v = getattr(self, f)
            if v not in (FP16, FP32):
                raise ValueError(f"Precision.{f} must be 'fp16' or 'fp32', got {v!r}")

    @property
    def storage_dtype(self) -> torch.dtype:
        return _TORCH[self.storage]

    @property
    def compute_dtype(self) -> torch.dtype:
        return _TORCH[self.compute]

    @property
    def accumulate_dtype(self) -> torch.dtype:
        return _TORCH[self.accumulate]


FP32_EXACT = Precision(FP32, FP32, FP32)


@dataclass(frozen=True)
class Device:
    """One piece of silicon: what it accepts and how it computes FP16-typed ops.

    ``fp16`` maps op family -> Precision (key ``"default"`` for the rest).
    ``runs_fp32_ops``: False for the Neural Engine (barred from FP32-typed ops).
    ``unsupported_ops``: op types this device never runs (they fall to the next device).
    """

    name: str
    fp16: Mapping[str, Precision]
    runs_fp32_ops: bool = True
    unsupported_ops: frozenset = frozenset()
    hazards: frozenset = frozenset()
    notes: tuple = ()

    def precision_for(self, family: str) -> Precision:
        return self.fp16.get(family, self.fp16["default"])

    def accepts(self, op_type: str, is_fp16: bool) -> bool:
        if op_type in self.unsupported_ops:
            return False
        return is_fp16 or self.runs_fp32_ops


@dataclass(frozen=True)
class DeviceProfile:
    """A compute unit: devices in preference order (first that accepts an op runs it)."""

    compute_unit: str
    devices: tuple
    description: str = ""
    #: the Neural Engine chip generation this profile models ("" when it has no NE device)
    variant: str = ""

    def place(self, op_type: str, family: str, is_fp16: bool) -> tuple[str, Precision, frozenset]:
        """(device name, precision, hazard rules) for one op."""
        for dev in self.devices:
            if dev.accepts(op_type, is_fp16):
                prec = dev.precision_for(family) if is_fp16 else FP32_EXACT
                return dev.name, prec, dev.hazards if is_fp16 else frozenset()
        # The last device (CPU) accepts everything; reaching here means a user profile
        # rejected an op everywhere.
        raise ValueError(
            f"profile {self.compute_unit!r}: no device accepts op type {op_type!r}; "
            "the last device must accept every op"
        )

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"profile {self.compute_unit!r} has no device {name!r}; it has "
                       f"{[d.name for d in self.devices]}")

    def with_device(self, name: str, **changes) -> DeviceProfile:
        """A copy where device ``name`` has some fields replaced.

        ``fp16=`` may be a Precision (applies to every family) or a mapping of
        family -> Precision merged over the current one.
        """
        dev = self.device(name)
        if "fp16" in changes:
            new = changes["fp16"]
            if isinstance(new, Precision):
                changes["fp16"] = {"default": new}
            else:
                bad = set(new) - set(FAMILIES) - {"default"}
                if bad:
                    raise ValueError(f"unknown op families {sorted(bad)}; expected some of {FAMILIES}")
                changes["fp16"] = {**dev.fp16, **new}
        if "hazards" in changes:
            known = set(HAZARDS) | set(NE_RULES)
            bad = set(changes["hazards"]) - known
            if bad:
                raise ValueError(f"unknown hazard rules {sorted(bad)}; known: {sorted(known)}")
            changes["hazards"] = frozenset(changes["hazards"])
        new_dev = dataclasses.replace(dev, **changes)
        devices = tuple(new_dev if d.name == name else d for d in self.devices)
        return dataclasses.replace(self, devices=devices, description=self.description + f" (modified {name})")
