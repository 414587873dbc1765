"""Explicit accumulation: sums and dot products in a stated dtype and order.

numpy's and torch's own FP16 reductions disagree with each other (``np.sum`` of
10,000 FP16 ones gives 10000 through pairwise blocks, ``np.cumsum`` stops at 2048),
so kernels never reduce FP16 tensors with them directly. With FP32 accumulation
the operands are widened and summed in FP32. With FP16 accumulation sums are
*pairwise*: every partial sum is rounded to FP16, the tree has depth log2(n), and
overflow of any partial sum to inf is kept. Dot products with FP16 accumulation
are *sequential* over the reduced dimension (each product and each running sum
rounded to FP16): the worst case, documented in docs/device_profiles.md.

:func:`mac_port` is the output port of a Neural Engine multiply-accumulate (device rules in
``profiles.NE_RULES``): the wide sum is rounded to FP16, denormals are flushed where the chip
does, the 2^15 ceiling turns 32,768 and above into inf, and the bias is added in FP16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

FP16 = torch.float16
FP32 = torch.float32


def _norm_dims(dims, ndim: int) -> list[int]:
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % ndim if ndim else 0 for d in dims})


def pairwise_sum_fp16(x: torch.Tensor, dims=None, keepdim: bool = False) -> torch.Tensor:
    """Sum over ``dims`` with every partial sum rounded to FP16 (pairwise tree)."""
    x = x.to(FP16)
    if x.ndim == 0:
        return x.clone()
    axes = _norm_dims(dims, x.ndim)
    keep_shape = [1 if i in axes else s for i, s in enumerate(x.shape)]
    rest = [i for i in range(x.ndim) if i not in axes]
    out_shape = [x.shape[i] for i in rest]
    y = x.permute(*rest, *axes).reshape(*out_shape, -1)
    n = y.shape[-1]
    if n == 0:
        y = torch.zeros(*out_shape, dtype=FP16)
    else:
        while y.shape[-1] > 1:
            if y.shape[-1] % 2:
                y = torch.cat([y, torch.zeros_like(y[..., :1])], dim=-1)
            y = y[..., 0::2] + y[..., 1::2]  # FP16 add: one rounding per partial sum
        y = y[..., 0]
    return y.reshape(keep_shape) if keepdim else y


def reduce_sum(x: torch.Tensor, dims=None, keepdim: bool = False, accumulate: torch.dtype = FP32) -> torch.Tensor:
    """Sum in the accumulation dtype; returns that dtype."""
    if accumulate == FP16:
        return pairwise_sum_fp16(x, dims, keepdim)
    if not x.is_floating_point():
        x = x.to(FP32)
    axes = _norm_dims(dims, x.ndim)
    if x.ndim == 0:
        return x.to(accumulate)
    return torch.sum(x.to(accumulate), dim=axes, keepdim=keepdim)


def reduce_mean(x: torch.Tensor, dims=None, keepdim: bool = False, accumulate: torch.dtype = FP32) -> torch.Tensor:
    """Sum in the accumulation dtype, then divide (in that dtype)."""
    axes = _norm_dims(dims, x.ndim)
    count = 1
    for a in axes:
        count *= x.shape[a] if x.ndim else 1
    s = reduce_sum(x, axes, keepdim, accumulate)
    return s / torch.tensor(max(count, 1), dtype=s.dtype)


def cumsum(x: torch.Tensor, dim: int, accumulate: torch.dtype = FP32) -> torch.Tensor:
    """Running sum along ``dim``; FP16 accumulation rounds every running sum (sequential)."""
    if accumulate != FP16:
        return torch.cumsum(x.to(accumulate), dim=dim)
    x = x.to(FP16)
    xs = x.movedim(dim, 0)
    out = torch.empty_like(xs)
    run = torch.zeros_like(xs[0])
    for i in range(xs.shape[0]):
        run = run + xs[i]
        out[i] = run
    return out.movedim(0, dim)


def matmul(a: torch.Tensor, b: torch.Tensor, accumulate: torch.dtype = FP32) -> torch.Tensor:
    """``a @ b`` with the stated accumulation (broadcasting like torch.matmul)."""
    if accumulate != FP16:
        return torch.matmul(a.to(accumulate), b.to(accumulate))
    a = a.to(FP16)
    b = b.to(FP16)
    squeeze_a = a.ndim == 1
    squeeze_b = b.ndim == 1
    if squeeze_a:
        a = a.unsqueeze(0)
    if squeeze_b:
        b = b.unsqueeze(-1)
    k = a.shape[-1]
    acc = None
    for i in range(k):
        term = a[..., :, i:i + 1] * b[..., i:i + 1, :]  # FP16 product, rounded
        acc = term if acc is None else acc + term       # FP16 running sum, rounded
    if acc is None:
        shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        acc = torch.zeros(shape, dtype=FP16)
    if squeeze_a:
        acc = acc.squeeze(-2)
    if squeeze_b:
        acc = acc.squeeze(-1)
    return acc


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, accumulate: torch.dtype = FP32):
    """``x @ weight.T + bias`` with the stated accumulation."""
    if accumulate != FP16:
        return F.linear(x.to(accumulate), weight.to(accumulate), None if bias is None else bias.to(accumulate))
    y = matmul(x, weight.to(FP16).transpose(-1, -2), FP16)
    return y if bias is None else y + bias.to(FP16)


def conv_nd(x: torch.Tensor, weight: torch.Tensor, bias, stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], groups: int, accumulate: torch.dtype = FP32) -> torch.Tensor:
    """N-d convolution (N = 1, 2, 3) with symmetric ``padding`` (callers pad asymmetric cases
    themselves and pass 0), and the stated accumulation."""
    nd = weight.ndim - 2
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    if accumulate != FP16:
        return fn(x.to(accumulate), weight.to(accumulate), None if bias is None else bias.to(accumulate),
                  stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups)
    return _conv_fp16_accumulate(x, weight, bias, stride, padding, dilation, groups)


def _conv_fp16_accumulate(x, weight, bias, stride, padding, dilation, groups):
    """N-d convolution as im2col + sequential FP16 dot products (every partial sum rounded)."""
    nd = weight.ndim - 2
    x = x.to(FP16)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])  # symmetric, last dim first
    cols = x
    for i in range(nd):
        span = (weight.shape[2 + i] - 1) * dilation[i] + 1
        cols = cols.unfold(2 + i, span, stride[i])  # appends a window dim
    cols = cols[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)]  # keep every dilation-th tap
    n, c = x.shape[:2]
    out_sizes = cols.shape[2:2 + nd]
    ksizes = cols.shape[2 + nd:]
    # [N, C, *out, *K] -> [N, G, C/G * prod(K), L]
    cols = cols.reshape(n, groups, c // groups, *out_sizes, *ksizes)
    perm = [0, 1, 2] + [3 + nd + i for i in range(nd)] + [3 + i for i in range(nd)]
    length = math.prod(out_sizes)
    cols = cols.permute(*perm).reshape(n, groups, (c // groups) * math.prod(ksizes), length)
    oc = weight.shape[0]
    wmat = weight.to(FP16).reshape(groups, oc // groups, -1)
    out = matmul(wmat.unsqueeze(0), cols, FP16).reshape(n, oc, *out_sizes)  # [N, G, OC/G, L] -> [N, OC, *out]
    if bias is not None:
        out = out + bias.to(FP16).view(1, -1, *([1] * nd))
    return out


#: smallest normal FP16 magnitude; below it a value is denormal
FP16_MIN_NORMAL = 2.0 ** -14


def mac_port(y: torch.Tensor, bias: torch.Tensor | None = None, bias_shape=None, *, ceiling: bool = True,
             flush_denormals: bool = False, bias_fp16: bool = True) -> torch.Tensor:
    """A Neural Engine multiply-accumulate output: ``y`` (the wide sum) rounded to FP16, then
    denormals flushed to +0 (``flush_denormals``), then every magnitude >= 2^15 made inf
    (``ceiling``: 32,752 stays finite, 32,768 is inf), then ``bias`` (viewed as ``bias_shape``)
    added in FP16 (or in y's dtype before rounding when not ``bias_fp16``). ``y`` must be the caller's
    own fresh result: the bias may be added into it in place."""
    if bias is not None and not bias_fp16:
        y = y + bias.to(y.dtype).view(bias_shape if bias_shape is not None else bias.shape)
        bias = None
    y = y.to(FP16)
    if flush_denormals:
        y = torch.where(y.abs() < FP16_MIN_NORMAL, torch.zeros((), dtype=FP16), y)
    if ceiling and y.numel():
        lo, hi = torch.aminmax(y)
        if not (hi < 32768.0 and lo > -32768.0):  # (NaN compares False: take the slow path)
            # exact in FP16 below the ceiling: doubling overflows to inf exactly when |y| >= 2^15
            y = (y * 2.0) * 0.5
    if bias is not None:  # into y in place: y is the kernel's fresh sum, or made above
        y = y.add_(bias.to(FP16).view(bias_shape if bias_shape is not None else bias.shape))
    return y
