"""Pooling ops: avg_pool, max_pool (1-d, 2-d, 3-d), l2_pool (1-d, 2-d).

Semantics: coremltools ``ops/defs/iOS15/pool.py`` (no later opset redefines
them; ``same_lower`` is rejected by the iOS15 type inference and allowed from
iOS16 on, which needs nothing here).

* Padding: ``valid`` / ``custom`` (``pad[2i]`` before, ``pad[2i+1]`` after) /
  ``same`` (total ``max(0, (ceil(D / s) - 1) * s + K - D)``, extra element after) /
  ``same_lower`` (extra element before), as for conv.
* ``ceil_mode`` (1-d/2-d, symmetric pads): ``D_out = floor((D + pb + pa - K + s - 1) / s) + 1``,
  minus one if that last window would start at or past ``D + pb`` (and some padding is
  set). Windows running past the padded input see nothing there: max ignores it and
  avg does not count it, like torch's ``ceil_mode``.
* avg: padded zeros count in the denominator unless ``exclude_padding_from_average``
  (then the denominator is the number of real input elements in the window).
* max: padding never wins (-inf).
* l2: ``sqrt(sum(x^2))`` over the window (padding contributes 0).

Sums go through :func:`numerics.reduce_sum` with the op's accumulation dtype when it
is FP16 (pairwise FP16 partial sums over each window); with FP32 accumulation torch's
FP32 pooling computes the window sums. Divisors (element counts) are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import numerics
from ..registry import kernel
from .conv import _torch_pad_arg, conv_pads

FP16 = torch.float16
FP32 = torch.float32


def _pool_geometry(call, x):
    op = call.op.op_type
    nd = x.ndim - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"{op}: input 'x' must be rank 3..5 [n, C, *D], got shape {tuple(x.shape)}")
    if op == "l2_pool" and nd > 2:
        raise ValueError(f"l2_pool: input 'x' must be rank 3 or 4 (1-d or 2-d pooling), got shape {tuple(x.shape)}")
    ks = call.ints("kernel_sizes")
    if ks is None or len(ks) != nd:
        raise ValueError(f"{op}: input 'kernel_sizes' = {ks} must have one value per spatial dimension ({nd})")
    strides = call.ints("strides")
    if len(strides) != nd:
        raise ValueError(f"{op}: input 'strides' = {strides} must have one value per spatial dimension ({nd})")
    pad_type = call.str("pad_type").lower()
    pads = conv_pads(op, pad_type, list(x.shape[2:]), ks, strides, [1] * nd, call.ints("pad"))
    ceil_mode = call.bool("ceil_mode")
    extra = [0] * nd
    if ceil_mode:
        if pad_type == "same":
            raise ValueError(f"{op}: input 'ceil_mode' = True is not allowed with pad_type 'same'")
        for i, (d, k, s, (pb, pa)) in enumerate(zip(x.shape[2:], ks, strides, pads)):
            out = (d + pb + pa - k + s - 1) // s + 1
            if (out - 1) * s >= d + pb and (pb > 0 or pa > 0):
                out -= 1
            extra[i] = max(0, (out - 1) * s + k - (d + pb + pa))
    return nd, ks, strides, pads, extra


def _window_sum(xp, ks, strides, accumulate):
    """Sum over every pooling window of an already padded input (no padding left)."""
    nd = len(ks)
    if accumulate == FP16:
        w = xp.to(FP16)
        for i in range(nd):
            w = w.unfold(2 + i, ks[i], strides[i])
        return numerics.reduce_sum(w, list(range(w.ndim - nd, w.ndim)), False, FP16)
    v = xp.to(accumulate)
    if nd == 1:
        return F.avg_pool2d(v.unsqueeze(-2), (1, ks[0]), (1, strides[0]), divisor_override=1).squeeze(-2)
    fn = F.avg_pool2d if nd == 2 else F.avg_pool3d
    return fn(v, tuple(ks), tuple(strides), divisor_override=1)


def _padded(x, pads, extra, value):
    all_pads = [(b, a + e) for (b, a), e in zip(pads, extra)]
    if not any(b or a for b, a in all_pads):
        return x
    return F.pad(x, _torch_pad_arg(all_pads), value=value)


@kernel("max_pool", family="pool")
def max_pool(call):
    x = call.tensor("x")
    nd, ks, strides, pads, extra = _pool_geometry(call, x)
    # max is exact in any dtype: pool in FP32 (torch's CPU half pooling is not guaranteed)
    xp = _padded(x.to(FP32), pads, extra, -math.inf)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    return fn(xp, tuple(ks), tuple(strides)).to(x.dtype)


@kernel("avg_pool", family="pool")
def avg_pool(call):
    x = call.tensor("x")
    nd, ks, strides, pads, extra = _pool_geometry(call, x)
    exclude = call.bool("exclude_padding_from_average")
    sums = _window_sum(_padded(x, pads, extra, 0.0), ks, strides, call.accumulate)
    # element counts per window: ones over what the denominator includes, zeros elsewhere
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=FP32)
    if exclude:
        mask = _padded(ones, pads, extra, 0.0)
    else:
        mask = _padded(F.pad(ones, _torch_pad_arg(pads), value=1.0), [(0, 0)] * nd, extra, 0.0)
    counts = _window_sum(mask, ks, strides, FP32)
    return sums / counts.to(sums.dtype)


@kernel("l2_pool", family="pool")
def l2_pool(call):
    x = call.tensor("x")
    nd, ks, strides, pads, extra = _pool_geometry(call, x)
    sq = x * x  # in the compute dtype
    sums = _window_sum(_padded(sq, pads, extra, 0.0), ks, strides, call.accumulate)
    return torch.sqrt(sums)
