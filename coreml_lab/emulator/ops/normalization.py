"""Normalizations: batch_norm, instance_norm, layer_norm, l2_norm, local_response_norm.

Semantics: coremltools ``ops/defs/iOS15/normalization.py``; the iOS17 versions
only let the parameters (gamma, beta, mean, variance, epsilon ...) have a dtype
other than ``x``'s. Parameters arrive like every input in the op's compute dtype.

Means, variances and windowed sums of squares go through :mod:`..numerics` with
the profile's accumulation dtype; the rest of each formula (x - mean, squares,
sqrt, division, scale and shift) is computed in the compute dtype, so a device
computing in FP16 rounds after every step. Variance is the two-pass biased
estimate ``mean((x - mean)^2)``.

Group norm has no MIL op: coremltools' torch frontend writes it as
reshape / reduce_mean / sub / square / add / sqrt / real_div / mul / add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import numerics
from ..registry import kernel


def _scalar(call, name: str, like: torch.Tensor) -> torch.Tensor:
    """A float parameter as a 0-d tensor in ``like``'s dtype (rounded to FP16 on an FP16 device)."""
    return torch.tensor(call.float(name), dtype=like.dtype)


def _channel_view(t: torch.Tensor, x: torch.Tensor, what: str, op: str) -> torch.Tensor:
    """A per-channel [C] parameter shaped to broadcast against x [n, C, *D]."""
    c = x.shape[1]
    if t.numel() != c:
        raise ValueError(f"{op}: input {what!r} has {t.numel()} elements, expected C={c} (x shape {tuple(x.shape)})")
    return t.to(x.dtype).reshape(1, c, *([1] * (x.ndim - 2)))


def _standardize(call, x: torch.Tensor, dims, eps: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over ``dims``; sums in the accumulation dtype, the rest in x's dtype."""
    acc = call.accumulate
    mean = numerics.reduce_mean(x, dims, True, acc).to(x.dtype)
    d = x - mean
    var = numerics.reduce_mean(d * d, dims, True, acc).to(x.dtype)
    return d / torch.sqrt(var + eps)


def _check_rank(call, x, lo: int, hi: int | None):
    if x.ndim < lo or (hi is not None and x.ndim > hi):
        want = f"{lo} <= rank <= {hi}" if hi is not None else f"rank >= {lo}"
        raise ValueError(f"{call.op.op_type}: input 'x' has shape {tuple(x.shape)}, expected {want}")


@kernel("batch_norm", family="normalization")
def batch_norm(call):
    x = call.tensor("x")
    _check_rank(call, x, 3, 5)
    op = "batch_norm"
    mean = _channel_view(call.tensor("mean"), x, "mean", op)
    var = _channel_view(call.tensor("variance"), x, "variance", op)
    eps = _scalar(call, "epsilon", x)
    y = (x - mean) / torch.sqrt(var + eps)
    return _channel_affine(call, y, x, op)


def _channel_affine(call, y: torch.Tensor, x: torch.Tensor, op: str) -> torch.Tensor:
    """``y * gamma + beta`` with optional per-channel gamma/beta (batch_norm, instance_norm)."""
    if call.has("gamma"):
        y = y * _channel_view(call.tensor("gamma"), x, "gamma", op)
    if call.has("beta"):
        y = y + _channel_view(call.tensor("beta"), x, "beta", op)
    return y


@kernel("instance_norm", family="normalization")
def instance_norm(call):
    x = call.tensor("x")
    _check_rank(call, x, 3, None)  # docstring: 3 <= rank <= 4; higher ranks normalise the same way
    op = "instance_norm"
    y = _standardize(call, x, list(range(2, x.ndim)), _scalar(call, "epsilon", x))
    return _channel_affine(call, y, x, op)


@kernel("layer_norm", family="normalization")
def layer_norm(call):
    x = call.tensor("x")
    rank = x.ndim
    axes = call.ints("axes")
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(f"layer_norm: input 'axes' has {a}, expected axes in [{-rank}, {rank - 1}]")
    dims = sorted({a % rank for a in axes})
    if not dims:
        raise ValueError("layer_norm: input 'axes' is empty, expected at least one axis")
    eps = _scalar(call, "epsilon", x)
    # gamma / beta have shape x.shape[axes] with the axes in increasing order
    norm_shape = [x.shape[i] if i in dims else 1 for i in range(rank)]
    params = {}
    for name in ("gamma", "beta"):
        if call.has(name):
            t = call.tensor(name, dtype=x.dtype)
            if t.numel() != torch.Size(norm_shape).numel():
                raise ValueError(
                    f"layer_norm: input {name!r} has shape {tuple(t.shape)}, expected "
                    f"{tuple(x.shape[i] for i in dims)} (x.shape at axes {dims})"
                )
            params[name] = t
    if dims == list(range(rank - len(dims), rank)) and x.dtype == torch.float32 \
            and call.accumulate == torch.float32:
        # trailing axes in FP32: the same biased two-pass statistics, fused
        shape = [x.shape[i] for i in dims]
        g, b = (params[n].reshape(shape) if n in params else None for n in ("gamma", "beta"))
        return torch.nn.functional.layer_norm(x, shape, g, b, float(eps))
    y = _standardize(call, x, dims, eps)
    if "gamma" in params:
        y = y * params["gamma"].reshape(norm_shape)
    if "beta" in params:
        y = y + params["beta"].reshape(norm_shape)
    return y


@kernel("l2_norm", family="normalization")
def l2_norm(call):
    x = call.tensor("x")
    _check_rank(call, x, 3, None)
    # the last three dimensions are normalised together; leading dimensions are batch
    dims = [x.ndim - 3, x.ndim - 2, x.ndim - 1]
    eps = _scalar(call, "epsilon", x)
    s = numerics.reduce_sum(x * x, dims, True, call.accumulate).to(x.dtype)
    return x / torch.sqrt(s + eps)


@kernel("local_response_norm", family="normalization")
def local_response_norm(call):
    x = call.tensor("x")
    _check_rank(call, x, 3, None)
    size = call.int("size")
    if size is None or size < 1:
        raise ValueError(f"local_response_norm: input 'size' is {size}, expected a positive integer")
    alpha = call.float("alpha")
    beta = _scalar(call, "beta", x)
    k = _scalar(call, "k", x)
    # Window over channels Q(c) = [c - floor(size/2), c + floor((size-1)/2)], zero padded, as
    # Apple documents for MPSCNNCrossChannelNormalization (symmetric for odd sizes; the MIL
    # docstring does not say how an even size is placed).
    before, after = size // 2, (size - 1) // 2
    sq = (x * x).movedim(1, -1)                       # [n, *D, C]
    windows = F.pad(sq, (before, after)).unfold(-1, size, 1)  # [n, *D, C, size]
    s = numerics.reduce_sum(windows, [-1], False, call.accumulate).to(x.dtype).movedim(-1, 1)
    scale = torch.tensor(alpha / size, dtype=x.dtype)
    return x / torch.pow(k + scale * s, beta)
