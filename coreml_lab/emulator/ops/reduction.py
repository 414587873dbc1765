"""Reductions: reduce_* over axes, reduce_argmax/argmin, and cumsum.

Semantics: coremltools ``ops/defs/iOS15/reduction.py`` (``reduce_*``; ``axes``
optional = every dimension, ``keep_dims`` default False), ``iOS17/reduction.py``
(``reduce_argmax``/``reduce_argmin`` gain ``output_dtype`` int32|uint16) and
``iOS15/tensor_operation.py`` (``cumsum``: ``axis`` default 0, ``exclusive`` and
``reverse`` default False).

Every sum goes through :mod:`..numerics` with the profile's accumulation dtype;
products use the same pairwise scheme (each partial product rounded to FP16 when
the device accumulates in FP16). Integer inputs (T includes int32) are reduced
exactly in int64 and narrowed to the declared int32 by the interpreter; ops whose
result is not an integer (mean, l2 norm, log ...) compute in float and truncate,
as numpy's ``astype`` does.

An empty ``axes`` list reduces nothing (the op is then elementwise), unlike
``torch.sum(dim=[])`` which reduces everything: the kernels add a length-1 axis
and reduce that.
"""

from __future__ import annotations

import torch

from .. import numerics
from ..registry import kernel

FP16 = torch.float16
FP32 = torch.float32


# ----------------------------------------------------------------------------- helpers


def _axes_and_input(call):
    """(x, dims, keepdim) for a ReductionAxes op, with ``dims`` sorted non-negative and non-empty."""
    x = call.tensor("x")
    keep = call.bool("keep_dims")
    axes = call.ints("axes")
    rank = x.ndim
    if axes is None:
        dims = list(range(rank))
    else:
        for a in axes:
            if not -rank <= a < max(rank, 1):
                raise ValueError(
                    f"{call.op.op_type}: input 'axes' has {a}, expected axes in [{-rank}, {rank - 1}] "
                    f"for x of rank {rank}"
                )
        dims = sorted({a % rank for a in axes}) if rank else []
    if not dims:
        # nothing to reduce: reduce a new length-1 axis, which leaves x's shape unchanged
        return x.unsqueeze(-1), [x.ndim], False
    return x, dims, keep


def _flatten_reduced(x: torch.Tensor, dims):
    """x permuted so ``dims`` come last and flattened into one trailing axis, and the keepdim shape."""
    keep_shape = [1 if i in dims else s for i, s in enumerate(x.shape)]
    rest = [i for i in range(x.ndim) if i not in dims]
    y = x.permute(*rest, *dims).reshape(*[x.shape[i] for i in rest], -1)
    return y, keep_shape


def _pairwise_fp16(x: torch.Tensor, dims, keepdim: bool, op, identity: float) -> torch.Tensor:
    """Reduce with ``op`` over ``dims`` as a pairwise tree, every partial result rounded to FP16."""
    y, keep_shape = _flatten_reduced(x.to(FP16), dims)
    if y.shape[-1] == 0:
        y = torch.full(y.shape[:-1], identity, dtype=FP16)
    else:
        while y.shape[-1] > 1:
            if y.shape[-1] % 2:
                y = torch.cat([y, torch.full_like(y[..., :1], identity)], dim=-1)
            y = op(y[..., 0::2], y[..., 1::2])
        y = y[..., 0]
    return y.reshape(keep_shape) if keepdim else y


def _sum(call, x, dims, keep):
    """Sum in the profile's accumulation dtype (exact int64 for integer inputs)."""
    if not x.is_floating_point():
        return torch.sum(x.to(torch.int64), dim=dims, keepdim=keep)
    return numerics.reduce_sum(x, dims, keep, call.accumulate)


def _to_compute(call, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A reduction result back in the op's arithmetic dtype (fp32 for integer inputs)."""
    return t.to(call.compute_dtype if like.is_floating_point() else FP32)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.to(FP32)


# ----------------------------------------------------------------------------- reduce_*


@kernel("reduce_sum", family="reduction")
def reduce_sum(call):
    x, dims, keep = _axes_and_input(call)
    return _sum(call, x, dims, keep)


@kernel("reduce_mean", family="reduction")
def reduce_mean(call):
    x, dims, keep = _axes_and_input(call)
    if not x.is_floating_point():
        # numpy mean of int32 is float64, narrowed back to int32 by truncation
        return torch.trunc(torch.mean(x.to(torch.float64), dim=dims, keepdim=keep)).to(torch.int64)
    return numerics.reduce_mean(x, dims, keep, call.accumulate)


@kernel("reduce_max", family="reduction")
def reduce_max(call):
    x, dims, keep = _axes_and_input(call)
    return torch.amax(x, dim=dims, keepdim=keep)


@kernel("reduce_min", family="reduction")
def reduce_min(call):
    x, dims, keep = _axes_and_input(call)
    return torch.amin(x, dim=dims, keepdim=keep)


@kernel("reduce_prod", family="reduction")
def reduce_prod(call):
    x, dims, keep = _axes_and_input(call)
    if x.is_floating_point() and call.accumulate == FP16:
        return _pairwise_fp16(x, dims, keep, torch.mul, 1.0)
    dtype = torch.int64 if not x.is_floating_point() else call.accumulate
    y, keep_shape = _flatten_reduced(x.to(dtype), dims)
    out = torch.prod(y, dim=-1)
    return out.reshape(keep_shape) if keep else out


@kernel("reduce_l1_norm", family="reduction")
def reduce_l1_norm(call):
    x, dims, keep = _axes_and_input(call)
    return _sum(call, torch.abs(x), dims, keep)


@kernel("reduce_sum_square", family="reduction")
def reduce_sum_square(call):
    x, dims, keep = _axes_and_input(call)
    sq = x.to(torch.int64) * x.to(torch.int64) if not x.is_floating_point() else x * x
    return _sum(call, sq, dims, keep)


@kernel("reduce_l2_norm", family="reduction")
def reduce_l2_norm(call):
    x, dims, keep = _axes_and_input(call)
    xf = _float(x)
    s = numerics.reduce_sum(xf * xf, dims, keep, call.accumulate if x.is_floating_point() else FP32)
    return torch.sqrt(_to_compute(call, s, x))


@kernel("reduce_log_sum", family="reduction")
def reduce_log_sum(call):
    x, dims, keep = _axes_and_input(call)
    s = _sum(call, x, dims, keep)
    return torch.log(_to_compute(call, s, x))


@kernel("reduce_log_sum_exp", family="reduction")
def reduce_log_sum_exp(call):
    x, dims, keep = _axes_and_input(call)
    xf = _float(x)
    if x.is_floating_point() and call.hazard("reduce_log_sum_exp_no_max_shift"):
        # Neural Engine: log(sum(exp(x))) with no max-shift, exp in FP16 and the sum in the device's
        # accumulator, rounded to FP16. Once the sum overflows to inf the device returns 0
        # (apple/coremltools#2690: the output drops to 0 once C*exp(x) > 65504, e.g. x ~ 7.63 for 32 channels).
        s = numerics.reduce_sum(torch.exp(xf.to(FP16)), dims, keep, call.accumulate).to(FP16)
        out = torch.log(s)
        return torch.where(torch.isinf(s), torch.zeros_like(out), out)
    # stable formula: m + log(sum(exp(x - m))), m the max over the reduced axes
    m = torch.amax(xf, dim=dims, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # all -inf (or +inf) rows: shift by 0
    acc = call.accumulate if x.is_floating_point() else FP32
    s = numerics.reduce_sum(torch.exp(xf - m), dims, keep, acc)
    s = _to_compute(call, s, x)
    if not keep:
        m = m.squeeze(tuple(dims))
    return torch.log(s) + m


# ----------------------------------------------------------------------------- argmax / argmin

_ARG_OUTPUT_DTYPES = ("int32", "uint16")


def _arg(call, fn):
    x = call.tensor("x")
    axis = call.int("axis")
    keep = call.bool("keep_dims")
    out_dtype = call.str("output_dtype")
    if out_dtype.lower() not in _ARG_OUTPUT_DTYPES:
        raise ValueError(
            f"{call.op.op_type}: input 'output_dtype' is {out_dtype!r}, expected one of {_ARG_OUTPUT_DTYPES}"
        )
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"{call.op.op_type}: input 'axis' is {axis}, expected an axis in [{-x.ndim}, {x.ndim - 1}]"
        )
    # ties: the docstring leaves the index unspecified; torch (like numpy) returns the first one
    return fn(x, dim=axis, keepdim=keep).to(torch.int32)


@kernel("reduce_argmax", family="reduction")
def reduce_argmax(call):
    return _arg(call, torch.argmax)


@kernel("reduce_argmin", family="reduction")
def reduce_argmin(call):
    return _arg(call, torch.argmin)


# ----------------------------------------------------------------------------- cumsum


@kernel("cumsum", family="reduction")
def cumsum(call):
    x = call.tensor("x")
    axis = call.int("axis")
    exclusive = call.bool("exclusive")
    reverse = call.bool("reverse")
    if x.ndim == 0:
        raise ValueError("cumsum: input 'x' must have rank >= 1, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"cumsum: input 'axis' is {axis}, expected an axis in [{-x.ndim}, {x.ndim - 1}]")
    axis %= x.ndim
    if reverse:
        x = torch.flip(x, dims=[axis])
    if x.is_floating_point():
        y = numerics.cumsum(x, axis, call.accumulate)
    else:
        y = torch.cumsum(x.to(torch.int64), dim=axis)
    if exclusive:
        # out[i] = sum of x[j] for j < i: shift the inclusive sums one step along the axis
        n = y.shape[axis]
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, min(n, 1))), y.narrow(axis, 0, max(n - 1, 0))],
                      dim=axis)
    if reverse:
        y = torch.flip(y, dims=[axis])
    return y

