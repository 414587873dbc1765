"""FP16 range analysis: which values do not fit half precision.

FP16 facts used here: the largest finite value is 65504 (anything larger becomes
inf); normal numbers start at 2^-14 ~ 6.1e-5 (below that, subnormals keep fewer
significant bits); the smallest subnormal is 2^-24 ~ 6.0e-8 (anything smaller
flushes to zero). Statistics are computed from FP32 reference values, so they
tell what *would* happen if a tensor were stored in FP16.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .emulator.program import walk_ops
from .tensor_passes import chunks

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14
FP16_MIN_SUBNORMAL = 2.0 ** -24


@dataclass
class RangeStats:
    """Streaming counts over the values of one tensor (across inputs)."""

    n: int = 0
    max_abs: float = 0.0
    min_abs_nonzero: float = float("inf")
    overflow: int = 0        # |x| > 65504
    subnormal: int = 0       # 0 < |x| < 2^-14
    flush: int = 0           # 0 < |x| < 2^-24 (becomes 0)
    nonfinite: int = 0

    def add(self, x) -> None:
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point():
                return
            x = x.detach().reshape(-1)
            x = (x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy()
        x = np.asarray(x)
        if x.dtype.kind != "f":
            return
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        x = x.reshape(-1)
        self.n += int(x.size)
        for part in chunks(x.size):  # a large tensor chunk by chunk: every count is the same (tensor_passes.LARGE)
            self._add_flat(x[part])

    def _add_flat(self, x: np.ndarray) -> None:
        if not x.size:
            return
        # numpy, single-threaded: a few passes over one tensor are cheaper than torch's thread start-up
        b = np.abs(x)
        top = float(b.max())
        if not math.isfinite(top):  # NaN and inf propagate into max: mask only then
            bad = ~np.isfinite(b)
            self.nonfinite += int(np.count_nonzero(bad))
            b[bad] = 0  # b is our own |x|; a zero changes no count below (zeros are left out of them)
            top = float(b.max())
        self.max_abs = max(self.max_abs, top)
        if top > FP16_MAX:  # only then count (overflow is rare)
            self.overflow += int(np.count_nonzero(b > FP16_MAX))
        smallest = _min_nonzero(b)
        if math.isfinite(smallest):
            self.min_abs_nonzero = min(self.min_abs_nonzero, smallest)
        if smallest < FP16_MIN_NORMAL:  # only then count (most tensors have no tiny values)
            zeros = int(np.count_nonzero(b == 0))
            self.subnormal += int(np.count_nonzero(b < FP16_MIN_NORMAL)) - zeros
            self.flush += int(np.count_nonzero(b < FP16_MIN_SUBNORMAL)) - zeros

    def result(self) -> dict:
        n = max(self.n, 1)
        return {
            "max_abs": self.max_abs,
            "min_abs_nonzero": self.min_abs_nonzero if self.min_abs_nonzero != float("inf") else float("nan"),
            "overflow_frac": self.overflow / n,
            "subnormal_frac": self.subnormal / n,
            "flush_frac": self.flush / n,
            "nonfinite_frac": self.nonfinite / n,
            "elements": self.n,
        }


def _min_nonzero(b: np.ndarray) -> float:
    """Smallest nonzero value of a finite, non-negative float32/64 array (inf if all are 0), in one pass.

    Non-negative floats order like their bit patterns; subtracting 1 from the bits (as unsigned)
    sends 0 to the largest pattern, so the minimum skips zeros without a mask.
    """
    signed, unsigned = (np.int32, np.uint32) if b.dtype == np.float32 else (np.int64, np.uint64)
    b = np.ascontiguousarray(b)
    m = (b.view(signed) - signed(1)).view(unsigned).min()
    if m == np.iinfo(unsigned).max:
        return math.inf
    return float(np.array(m + unsigned(1), dtype=unsigned).view(b.dtype)[()])


def range_of(x) -> dict:
    s = RangeStats()
    s.add(x)
    return s.result()


#: program -> its const_ranges rows (weights do not change; diagnoses repeat)
_CONST_RANGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def const_ranges(program) -> list[dict]:
    """FP16 range of every floating weight/constant of a program, with the ops using it (by output var)."""
    rows = _CONST_RANGES.get(program)
    if rows is None:
        rows = _CONST_RANGES[program] = _const_ranges(program)
    return [dict(r, used_by=list(r["used_by"])) for r in rows]


def _const_ranges(program) -> list[dict]:
    rows = []
    # the top level, as the diagnosis's rows (constants inside loop bodies and branches are not listed)
    for op in walk_ops(program, nested=False, consts=True):
        if op.op_type != "const":
            continue
        val = op.outputs[0].val
        arr = np.asarray(val) if val is not None else None
        if arr is None or not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
            continue
        r = range_of(arr)
        users = sorted({c.outputs[0].name for c in op.outputs[0].child_ops if c.outputs})
        rows.append({"const": op.outputs[0].name, "shape": tuple(arr.shape), "dtype": str(arr.dtype),
                     "used_by": users, **r})
    return rows
