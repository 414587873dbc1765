"""Fast passes over whole tensors for the error statistics: elements paired in memory order, max |t|, finite masks.

Each is one or two dense torch passes on CPU where the obvious form makes several, or a strided
copy: the statistics call them on every value of every compute unit's run.
"""

from __future__ import annotations

import math

import torch


def storage_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 1-d view in memory order when it is dense (a transposed view needs no copy);
    otherwise flattened with a copy. For whole-tensor sums, where order does not matter."""
    if t.is_contiguous():
        return t.view(-1)
    perm = sorted(range(t.ndim), key=lambda i: -t.stride(i))
    p = t.permute(perm)
    return p.view(-1) if p.is_contiguous() else t.reshape(-1)


def paired_flat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-d views of two same-sized tensors whose elements pair up.

    Emulated values are often views (a transpose in the diagnosed program is a transpose in
    the reference too): when both share one dense layout they are read in memory order,
    without the slow strided copy that flattening in logical order would make.
    """
    if a.shape == b.shape and a.stride() == b.stride():
        return storage_order(a), storage_order(b)  # same layout: the same order, view or copy
    return a.reshape(-1), b.reshape(-1)


def max_abs(t: torch.Tensor) -> float:
    """max |t| in one pass (torch's vector_norm(inf) is several times slower on CPU)."""
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


def finite(t: torch.Tensor) -> torch.Tensor:
    """Mask of the finite elements of a floating tensor: ``|t| < inf`` (NaN compares False),
    two passes where ``torch.isfinite`` makes several on CPU."""
    return t.abs() < math.inf


def only_where(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` where ``mask`` holds, 0 elsewhere: pairs left out of a comparison are zeroed (they then
    add nothing to sums or maxima of |.|) rather than gathered, which is a slow copy on CPU."""
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype))


def largest_finite(t: torch.Tensor) -> float:
    """max |t| over the finite elements (0 if none), without gathering them."""
    return max_abs(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0))
