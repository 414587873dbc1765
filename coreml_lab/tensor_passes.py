"""Fast passes over whole tensors for the error statistics: elements paired in memory order, max |t|, finite masks.

Each is one or two dense torch passes on CPU where the obvious form makes several, or a strided
copy: the statistics call them on every value of every compute unit's run.
"""

from __future__ import annotations

import math

import torch

#: Tensors of more elements than this are measured chunk by chunk (:func:`chunks`): a full-size temporary
#: of 16 MB and more is often mapped fresh from the OS (glibc maps every allocation above its mmap
#: threshold, at most 32 MB), and faulting its pages in costs several times the arithmetic on them, while
#: a chunk's temporaries come from the heap again and again. Maxima and counts are the same either way;
#: sums over chunks are added in float64, so they can differ from one whole-tensor pass in their last bits.
LARGE = 1 << 22
#: elements per chunk (4 MB in FP32)
CHUNK = 1 << 20


def chunks(n: int):
    """Slices covering ``range(n)``: one when ``n <= LARGE``, else pieces of :data:`CHUNK` elements."""
    if n <= LARGE:
        return [slice(0, n)]
    return [slice(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


def difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b`` of two flat tensors in FP32, as a new tensor the caller may change in place.

    FP16 and BF16 operands are widened to FP32 first: the same values as torch's own promotion (the
    widening is exact and the subtraction one FP32 rounding), several times faster on CPU than its
    mixed-dtype subtraction. An FP64 operand is subtracted in FP64 and the difference rounded to FP32.
    """
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        return torch.sub(a, b).float()
    if b.dtype != torch.float32:
        b = b.float()
    return torch.sub(a, b) if a.dtype == torch.float32 else a.float().sub_(b)


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
