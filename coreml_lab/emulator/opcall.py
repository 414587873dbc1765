"""What a kernel sees of an op: ``OpCall`` (its inputs, declared defaults, precision, nested blocks).

A kernel of :mod:`.ops` receives one :class:`OpCall` per compiled step of the interpreter and reads
everything through it: inputs as torch tensors in the compute dtype or as plain values, the
defaults coremltools' op definitions declare for absent inputs, the device's precision and hazards,
and its nested blocks to run. :class:`Const` holds a constant input with its tensor per dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from . import dtypes
from .profiles import Precision
from .registry import declared_default


class Const:
    """A constant input: its value, and its tensor per dtype converted once."""

    __slots__ = ("value", "_tensors")

    def __init__(self, value):
        self.value = value
        self._tensors: dict = {}

    def tensor(self, dtype: torch.dtype | None) -> torch.Tensor:
        t = self._tensors.get(dtype)
        if t is None:
            base = self._tensors.get(None)
            if base is None:
                base = dtypes.to_torch(self.value)
                self._tensors[None] = base
            t = base if dtype is None or dtype == base.dtype else base.to(dtype)
            self._tensors[dtype] = t
        return t

    def release(self, min_bytes: int = 0) -> None:
        """Drop the converted copies (another dtype than the value's) of at least ``min_bytes``;
        :meth:`tensor` makes them again when asked. The value's own tensor stays."""
        base = self._tensors.get(None)
        for dtype, t in list(self._tensors.items()):
            if t is not base and t.numel() * t.element_size() >= min_bytes:
                del self._tensors[dtype]


class OpCall:
    """What a kernel sees: the op, its inputs, and the precision it must follow.

    * ``tensor(name)`` - an input as a torch tensor; floating inputs arrive in the
      op's compute dtype (FP32, or FP16 where the device computes in FP16).
    * ``value(name)`` - an input as a numpy value / python scalar / str
      (for parameters such as axes, strides, modes). An absent optional input reads as
      the default coremltools' op definition declares for the op's opset
      (:func:`.registry.declared_default`); ``int`` / ``float`` / ... likewise.
    * ``storage_dtype(i)`` - the torch dtype output ``i`` will be held in.
    * ``accumulate`` - the dtype for running sums (use :mod:`.numerics`).
    * ``hazard(rule)`` - whether the device uses a naive FP16 formula (profiles.HAZARDS).
    """

    __slots__ = ("op", "step", "env")

    def __init__(self, step):  # the compiled Step this call serves
        self.op = step.op
        self.step = step
        self.env = None

    # -- inputs -------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.step.inputs

    def _get(self, src, compute: torch.dtype | None, raw: bool):
        if isinstance(src, Const):
            if raw:
                return src.tensor(None)
            base = src.tensor(None)
            if compute is not None and base.is_floating_point() and base.dtype != compute:
                return src.tensor(compute)
            return base
        v = self.env[src]
        if (not raw and compute is not None and isinstance(v, torch.Tensor)
                and v.is_floating_point() and v.dtype != compute):
            v = v.to(compute)
        return v

    def tensor(self, name: str, default=None, dtype: torch.dtype | None = None):
        """An input; floating inputs in the compute dtype, or in ``dtype`` if given.

        Asking for the dtype a kernel will use anyway (e.g. the accumulation dtype for
        weights) lets constant inputs be converted once and cached across runs.
        """
        src = self.step.inputs.get(name)
        if src is None:
            return default
        if isinstance(src, tuple):
            raise TypeError(f"input {name!r} of {self.op.op_type} is a tuple; use tensors()")
        return self._get(src, dtype or self.step.precision.compute_dtype, raw=False)

    def raw(self, name: str, default=None):
        """An input in the dtype it is held in (no conversion)."""
        src = self.step.inputs.get(name)
        if src is None:
            return default
        return self._get(src, None, raw=True)

    def raws(self, name: str) -> list:
        """Tuple input members in the dtype they are held in (no conversion)."""
        src = self.step.inputs.get(name, ())
        if not isinstance(src, tuple):
            src = (src,)
        return [self._get(s, None, raw=True) for s in src]

    def tensors(self, name: str) -> list:
        src = self.step.inputs.get(name, ())
        if not isinstance(src, tuple):
            src = (src,)
        c = self.step.precision.compute_dtype
        return [self._get(s, c, raw=False) for s in src]

    def value(self, name: str, default=None):
        src = self.step.inputs.get(name)
        if src is None:
            declared = declared_default(self.op, name)
            return default if declared is None else declared
        if isinstance(src, tuple):
            return [self._value_of(s) for s in src]
        return self._value_of(src)

    def _value_of(self, src):
        if isinstance(src, Const):
            v = src.value
        else:
            v = self.env[src]
            if isinstance(v, torch.Tensor):
                v = v.numpy()
        if isinstance(v, np.ndarray) and v.ndim == 0:
            return v.item()
        if isinstance(v, np.generic):
            return v.item()
        return v

    def ints(self, name: str, default=None) -> list[int] | None:
        v = self.value(name)
        if v is None:
            return default
        return [int(i) for i in np.asarray(v).reshape(-1)]

    def int(self, name: str, default=None):
        v = self.value(name)
        return default if v is None else int(v)

    def float(self, name: str, default=None):
        v = self.value(name)
        return default if v is None else float(v)

    def bool(self, name: str, default=None):
        v = self.value(name)
        return default if v is None else bool(v)

    def str(self, name: str, default=None):
        v = self.value(name)
        return default if v is None else str(v)

    # -- precision ------------------------------------------------------------
    @property
    def precision(self) -> Precision:
        return self.step.precision

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.step.precision.compute_dtype

    @property
    def accumulate(self) -> torch.dtype:
        return self.step.precision.accumulate_dtype

    @property
    def device(self) -> str:
        return self.step.device

    def hazard(self, rule: str) -> bool:
        return rule in self.step.hazards

    def storage_dtype(self, i: int = 0) -> torch.dtype | None:
        return self.step.outputs[i][2]

    def declared(self, i: int = 0) -> str:
        return self.step.outputs[i][1]

    @property
    def outputs(self):
        return self.op.outputs

    # -- nested blocks ----------------------------------------------------------
    def run_block(self, index: int, inputs: list) -> list:
        """Run nested block ``index`` of this op with its block inputs bound to ``inputs``."""
        plan = self.step.blocks[index]
        return plan.run(inputs, parent_env=self.env, on_op=self.step.interpreter.active_on_op)
