"""The error histogram: counts of log10 |a - r| in fixed bins, from a sample of each tensor's values.

Exact matches, values below the first edge or at or above the last, and non-finite results are
counted apart; the metrics of :mod:`.metrics` use every value, the histogram's shape needs no more
than :attr:`ErrorHistogram.SAMPLE` of them per tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .tensor_passes import paired_flat

#: histogram bin edges of log10 |a - r| (exact matches and non-finite values are counted apart)
HIST_EDGES = np.arange(-12.0, 4.01, 0.25)


class ErrorHistogram:
    """Counts of log10 |a - r| in :data:`HIST_EDGES` bins, plus exact matches and non-finite values.

    Tensors of more than :attr:`SAMPLE` values contribute an evenly strided sample of them (the
    shape of a distribution needs no more); the metrics of :class:`.metrics.ErrorStats` use every value.
    """

    SAMPLE = 4096

    def __init__(self):
        self.counts = np.zeros(len(HIST_EDGES) - 1, dtype=np.int64)
        self.exact = 0
        self.nonfinite = 0
        self.below = 0
        self.above = 0

    @classmethod
    def sampled_count(cls, n: int) -> int:
        """How many of ``n`` values :meth:`sample` keeps."""
        return len(range(0, n, n // cls.SAMPLE)) if n > cls.SAMPLE else n

    @classmethod
    def sample(cls, x):
        """The values a tensor contributes: all, or every ``len // SAMPLE``-th one."""
        n = x.shape[0]
        return x[::n // cls.SAMPLE] if n > cls.SAMPLE else x

    def add(self, a, r) -> None:
        if isinstance(a, torch.Tensor) and isinstance(r, torch.Tensor) and a.numel() == r.numel():
            a, r = paired_flat(a.detach(), r.detach())
            a, r = self.sample(a).float(), self.sample(r).float()
            if not math.isfinite(float(r.sum())):  # inf/NaN propagate into the sum: mask only then
                ok = torch.isfinite(r)
                a, r = a[ok], r[ok]
            if not math.isfinite(float(a.sum())):
                fin = torch.isfinite(a)
                self.nonfinite += int((~fin).sum())
                a, r = a[fin], r[fin]
            self._add_abs(torch.sub(a, r).abs_())
            return
        a = self.sample(np.asarray(a).reshape(-1)).astype(np.float64)
        r = self.sample(np.asarray(r).reshape(-1)).astype(np.float64)
        ok = np.isfinite(r)
        a, r = a[ok], r[ok]
        fin = np.isfinite(a)
        self.nonfinite += int((~fin).sum())
        d = np.abs(a[fin] - r[fin])
        self.exact += int((d == 0).sum())
        d = d[d > 0]
        logd = np.log10(d)
        self.below += int((logd < HIST_EDGES[0]).sum())
        self.above += int((logd >= HIST_EDGES[-1]).sum())
        self.counts += np.histogram(logd, bins=HIST_EDGES)[0]

    def add_abs_diff(self, d: torch.Tensor) -> None:
        """Add finite absolute differences |a - r| (flat FP32), sampled like :meth:`add`."""
        self.add_abs_sample(self.sample(d))

    @classmethod
    def sample_part(cls, part: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """The values of ``part`` (elements ``start`` on of a flat tensor of ``n``) that :meth:`sample` of
        the whole tensor keeps, copied (``part`` is a temporary)."""
        if n <= cls.SAMPLE:
            return part.clone()
        step = n // cls.SAMPLE
        return part[(-start) % step::step].clone()

    def add_abs_sample(self, d: torch.Tensor) -> None:
        """Add absolute differences already sampled (:meth:`sample`, :meth:`sample_part`)."""
        self._add_abs(d.contiguous())  # numpy's log10 is vectorised on dense arrays only

    def _add_abs(self, d: torch.Tensor) -> None:
        # one bincount over slots: 0 = exact or below the first edge, 1..bins = the bins,
        # bins+1 = at or above the last edge (numpy: a few thousand values, no thread start-up)
        d = d.numpy()
        bins = len(HIST_EDGES) - 1
        pos = np.log10(np.maximum(d, np.float32(1e-30)))  # 0 (exact) lands below the first edge
        pos -= HIST_EDGES[0]
        pos *= 1.0 / (HIST_EDGES[1] - HIST_EDGES[0])
        pos += 1.0
        np.clip(pos, 0, bins + 1, out=pos)  # truncation below is floor (pos >= 0)
        slots = np.bincount(pos.astype(np.intp), minlength=bins + 2)
        exact = int(np.count_nonzero(d == 0))
        self.exact += exact
        self.below += int(slots[0]) - exact
        self.counts += slots[1:bins + 1]
        self.above += int(slots[bins + 1])

    def merge(self, other: ErrorHistogram) -> None:
        self.counts += other.counts
        self.exact += other.exact
        self.nonfinite += other.nonfinite
        self.below += other.below
        self.above += other.above

    def to_dict(self) -> dict:
        return {"counts": self.counts.tolist(), "exact": self.exact, "nonfinite": self.nonfinite,
                "below": self.below, "above": self.above}
