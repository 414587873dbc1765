"""Error metrics between a result ``a`` and a reference ``r``, over all elements.

Formulas (all sums and means run over every element of every input seen):

* ``max_abs_err`` = max |a - r|;  ``mean_abs_err`` = mean |a - r|
* ``rel_err`` = max |a - r| / max |r|   (normwise, so tiny reference values do not explode it)
* ``snr_db`` = 10 log10( sum r^2 / sum (a - r)^2 )
* ``psnr_db`` = 10 log10( max |r|^2 / mean (a - r)^2 )   (mean, not sum: independent of tensor size)
* ``cosine`` = sum(a r) / sqrt(sum a^2 * sum r^2)
* ``nonfinite_frac`` = fraction of elements where ``a`` is inf/NaN but ``r`` is finite
* ``top1_agree`` = fraction of rows whose argmax over the last axis agrees (classifier-like outputs)

When ``a`` has non-finite values where ``r`` is finite, the error metrics are
``inf`` (errors) and ``-inf`` (dB): a NaN output is never "close". A perfect
match gives ``inf`` dB. Sums accumulate in float64; each tensor's own pass is FP32
(vectorised torch; pairs with an inf/NaN on either side are counted, not summed), float64
only if FP32 sums would overflow. The histogram of the same differences is
:mod:`.error_histogram`'s; the fast whole-tensor passes are :mod:`.tensor_passes`'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .error_histogram import ErrorHistogram
from .tensor_passes import chunks, difference, finite, max_abs, only_where, paired_flat, storage_order
from .tensor_passes import largest_finite as largest_finite  # re-exported: the statistics read it here

#: the smallest FP16 subnormal (fp16.FP16_MIN_SUBNORMAL; metrics sits below fp16 in the layers)
FP16_MIN_SUBNORMAL = 2.0 ** -24



def _db(num: float, den: float) -> float:
    if den == 0:
        return math.inf if num > 0 else math.nan
    if num == 0:
        return -math.inf
    return 10.0 * math.log10(num / den)


@dataclass
class ErrorStats:
    """Streaming accumulator of the metrics above (add() per tensor pair, result() at the end)."""

    n: int = 0
    n_nonfinite: int = 0
    sum_abs: float = 0.0
    max_abs: float = 0.0
    sum_sq_err: float = 0.0
    sum_sq_ref: float = 0.0
    sum_sq_val: float = 0.0
    sum_prod: float = 0.0
    max_ref: float = 0.0
    rows: int = 0
    rows_agree: int = 0
    ref_nonfinite: int = 0

    def add(self, a, r, classifier: bool | None = None, ref_sums=None, hist: ErrorHistogram | None = None) -> None:
        """Accumulate ``a`` against ``r``; ``hist`` (if given) takes the same differences."""
        if isinstance(a, torch.Tensor) and isinstance(r, torch.Tensor) and not classifier \
                and a.numel() == r.numel() and a.numel():
            if self._add_fast(a, r, ref_sums, hist) or self._add_masked(a, r, hist):
                return
            a, r = paired_flat(a.detach(), r.detach())  # FP32 sums overflow: the exact path, in numpy
            a, r, classifier = a.float().numpy(), r.float().numpy(), False
        if isinstance(a, torch.Tensor):
            a = a.detach().float().numpy()
        if isinstance(r, torch.Tensor):
            r = r.detach().float().numpy()
        self._add_exact(np.asarray(a), np.asarray(r), classifier, hist)

    def _add_exact(self, a: np.ndarray, r: np.ndarray, classifier, hist) -> None:
        """Any values (inf/NaN included): finite pairs are compared in float64, the rest counted."""
        if hist is not None:
            hist.add(a, r)
        if a.shape != r.shape:
            if a.size == r.size:
                a = a.reshape(r.shape)
            else:
                raise ValueError(f"cannot compare shapes {a.shape} and {r.shape}")
        ref_ok = np.isfinite(r)
        both = np.isfinite(a)
        both &= ref_ok
        n_ref_ok, n_both = int(np.count_nonzero(ref_ok)), int(np.count_nonzero(both))
        self.n += int(r.size)
        self.ref_nonfinite += int(r.size) - n_ref_ok
        self.n_nonfinite += n_ref_ok - n_both
        if n_both == r.size:
            av, rv = a.reshape(-1), r.reshape(-1)
        else:
            av, rv = a[both], r[both]
        av, rv = av.astype(np.float64, copy=False), rv.astype(np.float64, copy=False)
        if n_both:
            d = av - rv
            self.sum_sq_err += float(np.square(d).sum())
            self.sum_sq_ref += float(np.square(rv).sum())
            self.sum_sq_val += float(np.square(av).sum())
            self.sum_prod += float((av * rv).sum())
            np.abs(d, out=d)
            self.sum_abs += float(d.sum())
            self.max_abs = max(self.max_abs, float(d.max()))
            self.max_ref = max(self.max_ref, float(np.abs(rv).max()))
        if classifier is None:
            classifier = r.ndim >= 1 and r.shape[-1] > 1 and r.ndim <= 2
        if classifier and r.ndim >= 1 and r.shape[-1] > 1:
            ra = r.reshape(-1, r.shape[-1])
            aa = a.reshape(-1, r.shape[-1])
            row_ok = np.isfinite(aa).all(-1)  # a row with inf/NaN never agrees
            self.rows += ra.shape[0]
            self.rows_agree += int(((ra.argmax(-1) == np.nan_to_num(aa).argmax(-1)) & row_ok).sum())

    def _add_fast(self, a: torch.Tensor, r: torch.Tensor, ref_sums=None, hist=None) -> bool:
        """All-finite tensors (the common case): few vectorised torch passes in FP32, sums in float64.

        With ``d = a - r``: ``a.r = r.r + r.d`` and ``a.a = r.r + 2 r.d + d.d``, so ``a`` is read
        once; ``ref_sums`` = (r.r, max |r|) lets a caller comparing several results against one
        reference compute those once. Large tensors go chunk by chunk (:func:`.tensor_passes.chunks`).
        """
        if a is r and ref_sums is not None and math.isfinite(ref_sums[0]):  # the reference itself
            rr, rmax = ref_sums
            self.n += a.numel()
            self.sum_sq_ref += rr
            self.sum_sq_val += rr
            self.sum_prod += rr
            self.max_ref = max(self.max_ref, rmax)
            if hist is not None:
                hist.exact += ErrorHistogram.sampled_count(a.numel())
            return True
        a, r = paired_flat(a.detach(), r.detach())
        if r.dtype != torch.float32:
            r = r.float()
        rr, rmax = ref_sums if ref_sums is not None else reference_sums(r)
        if not math.isfinite(rr):
            return False
        n = a.numel()
        dd = rd = sum_abs = top = 0.0
        sample = []
        for part in chunks(n):
            d = difference(a[part], r[part])
            dd += float(torch.dot(d, d))
            rd += float(torch.dot(r[part], d))
            if not (math.isfinite(dd) and math.isfinite(rd)):
                return False  # inf/NaN in a value (it propagates into the sums) or FP32 overflow: the exact path
            d = d.abs_()
            sum_abs += float(d.sum())
            top = max(top, float(d.max()))
            if hist is not None:
                sample.append(ErrorHistogram.sample_part(d, part.start, n))
        self.n += n
        self._add_sums(sum_abs, top, dd, rd, rr, rmax)
        if hist is not None:
            hist.add_abs_sample(sample[0] if len(sample) == 1 else torch.cat(sample))
        return True

    def _add_sums(self, sum_abs: float, max_abs_d: float, dd: float, rd: float, rr: float, rmax: float) -> None:
        """Accumulate one tensor's sum and max of |d| and its dot products d.d, r.d, r.r (``d = a - r``):
        ``a.r = r.r + r.d``, ``a.a = r.r + 2 r.d + d.d``."""
        self.sum_abs += sum_abs
        self.max_abs = max(self.max_abs, max_abs_d)
        self.sum_sq_err += dd
        self.sum_sq_ref += rr
        self.sum_sq_val += rr + 2 * rd + dd
        self.sum_prod += rr + rd
        self.max_ref = max(self.max_ref, rmax)

    def _add_masked(self, a: torch.Tensor, r: torch.Tensor, hist=None) -> bool:
        """Tensors with inf/NaN (an attention mask's -inf, an overflow): the pairs where both are
        finite are compared as in :meth:`_add_fast`, the others counted as in :meth:`_add_exact`.
        Pairs left out are zeroed rather than gathered, so it stays a few dense torch passes.
        False if the FP32 sums overflow (the caller takes the float64 path)."""
        a, given = paired_flat(a.detach(), r.detach())
        ref_ok = finite(given)
        both = finite(a) & ref_ok
        n_ref_ok, n_both = int(ref_ok.sum()), int(both.sum())
        r = only_where(both, given.float())
        d = only_where(both, difference(a, r))
        dd, rd, rr = float(torch.dot(d, d)), float(torch.dot(r, d)), float(torch.dot(r, r))
        if not (math.isfinite(dd) and math.isfinite(rd) and math.isfinite(rr)):
            return False
        self.n += r.numel()
        self.ref_nonfinite += r.numel() - n_ref_ok
        self.n_nonfinite += n_ref_ok - n_both
        if n_both:
            d = d.abs_()
            self._add_sums(float(d.sum()), float(d.max()), dd, rd, rr, max_abs(r))
        if hist is not None:
            hist.add(a, given)  # it masks its own sample
        return True

    def merge(self, other: ErrorStats) -> None:
        """Add another accumulator's counts (one measurement shared by several compute units)."""
        for f in ("n", "n_nonfinite", "sum_abs", "sum_sq_err", "sum_sq_ref", "sum_sq_val", "sum_prod", "rows",
                  "rows_agree", "ref_nonfinite"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_ref = max(self.max_ref, other.max_ref)

    def result(self) -> dict:
        compared = self.n - self.ref_nonfinite
        if self.n_nonfinite:
            errs = dict(max_abs_err=math.inf, mean_abs_err=math.inf, rel_err=math.inf, snr_db=-math.inf,
                        psnr_db=-math.inf)
        else:
            mean_sq = self.sum_sq_err / compared if compared else math.nan
            errs = dict(
                max_abs_err=self.max_abs,
                mean_abs_err=self.sum_abs / compared if compared else math.nan,
                rel_err=self.max_abs / self.max_ref if self.max_ref else (0.0 if self.max_abs == 0 else math.inf),
                snr_db=_db(self.sum_sq_ref, self.sum_sq_err),
                psnr_db=_db(self.max_ref ** 2, mean_sq) if compared else math.nan,
            )
        den = math.sqrt(self.sum_sq_val * self.sum_sq_ref)
        errs["cosine"] = self.sum_prod / den if den else (1.0 if self.sum_sq_val == self.sum_sq_ref == 0 else math.nan)
        errs["nonfinite_frac"] = self.n_nonfinite / self.n if self.n else 0.0
        errs["top1_agree"] = self.rows_agree / self.rows if self.rows else math.nan
        errs["elements"] = self.n
        return errs


def degenerate_reference(max_abs_err: float, rel_err: float) -> str | None:
    """Why a relative error means nothing for this output, or None when the reference carries signal.

    ``max |r|`` is recovered from the metrics (``rel_err = max |a - r| / max |r|``). A reference
    that is all zeros has no scale to be relative to; one whose every value is below FP16's
    smallest subnormal (2^-24 ~ 5.96e-8) flushes to zero in FP16 entirely, so an FP16 result of
    zeros has relative error 1 by construction, not because the model computes anything wrong.
    """
    try:
        max_abs_err, rel_err = float(max_abs_err), float(rel_err)
    except (TypeError, ValueError):
        return None
    if math.isnan(max_abs_err) or math.isnan(rel_err) or math.isinf(max_abs_err) or rel_err == 0:
        return None
    max_ref = 0.0 if math.isinf(rel_err) else max_abs_err / rel_err
    if max_ref == 0:
        return ("the reference output is all zeros: it carries no signal, so a relative error means nothing "
                f"(compare the absolute error, {max_abs_err:.3g})")
    if max_ref < FP16_MIN_SUBNORMAL:
        return (f"the reference output is tiny (max |x| = {max_ref:.3g}, below FP16's smallest subnormal "
                "2^-24 ~ 5.96e-8): in FP16 every such value flushes to zero (a constant is raised to 2^-24), so "
                "the reference carries no signal FP16 can hold and the relative error says nothing about the "
                "model (1 when the result is all zeros); scale the output up, or keep the ops that produce it "
                "in FP32")
    return None


def reference_sums(r: torch.Tensor) -> tuple[float, float]:
    """(r.r, max |r|) of a reference tensor, for :meth:`ErrorStats.add`'s ``ref_sums``."""
    r = storage_order(r.detach()).float()
    if not r.numel():
        return 0.0, 0.0
    return float(torch.dot(r, r)), max_abs(r)


class DiffStats:
    """Light divergence between two results (compute-unit pairs): max |a - b| relative to max |b|."""

    __slots__ = ("max_abs", "max_ref", "n", "nonfinite")

    def __init__(self):
        self.max_abs = self.max_ref = 0.0
        self.n = self.nonfinite = 0

    def add(self, a: torch.Tensor, b: torch.Tensor, max_b: float | None = None) -> None:
        """``max_b`` (max |b| over finite values), when known, saves a pass; ``a is b`` costs nothing."""
        self.merge(DiffStats.measure(a, b, max_b))

    @staticmethod
    def measure(a: torch.Tensor, b: torch.Tensor, max_b: float | None = None) -> DiffStats:
        """The divergence of one pair alone (to :meth:`merge` into several accumulators)."""
        out = DiffStats()
        out.n = a.numel()
        if a is b and max_b is not None:
            out.max_ref = max_b
            return out
        a, b = paired_flat(a.detach(), b.detach())
        # a - b in FP32, chunk by chunk when large: one chunk-sized temporary at a time, not full-size ones
        # (the largest values set the memory peak)
        d = 0.0
        for part in chunks(a.numel()):
            m = max_abs(difference(a[part], b[part]))
            if not math.isfinite(m):  # inf/NaN: the masked comparison below (a running max() would drop NaN)
                d = m
                break
            d = max(d, m)
        if not math.isfinite(d):  # compare where both are finite (zeroed elsewhere: no gather)
            a, b = a.float(), b.float()
            fa, fb = finite(a), finite(b)
            out.nonfinite = int((fa != fb).sum())
            both = fa & fb
            b = only_where(both, b)
            d = max_abs(only_where(both, torch.sub(a, b)))
            max_b = None
        out.max_abs = d
        out.max_ref = max_b if max_b is not None else max_abs(b)
        return out

    def merge(self, other: DiffStats) -> None:
        self.n += other.n
        self.nonfinite += other.nonfinite
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_ref = max(self.max_ref, other.max_ref)

    def result(self) -> dict:
        rel = self.max_abs / self.max_ref if self.max_ref else (0.0 if self.max_abs == 0 else math.inf)
        return {"max_abs_diff": self.max_abs, "rel_diff": rel,
                "nonfinite_frac": self.nonfinite / self.n if self.n else 0.0}


def compare(a, r, classifier: bool | None = None) -> dict:
    """All metrics for one pair of tensors."""
    s = ErrorStats()
    s.add(a, r, classifier)
    return s.result()
