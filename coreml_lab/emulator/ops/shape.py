"""Shape kernels: padding, tiling, reshaping and reordering a tensor (family "tensor").

Semantics: coremltools ``ops/defs/iOS15/tensor_operation.py`` and
``tensor_transformation.py`` with the iOS16/iOS17/iOS18 redefinitions (iOS17 reshape
``0`` matched from the right). Creation, sorting and slicing live in :mod:`.tensor`.

Choices where the docstrings are silent:

* ``depth_to_space`` / ``space_to_depth`` / ``space_to_batch`` / ``batch_to_space``
  use TensorFlow's block order (the TF frontend maps those ops one to one; channel
  index ``(i * block + j) * C + c``), ``pixel_shuffle``/``pixel_unshuffle`` torch's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import kernel
from .tensor import _axis, _x

# ----------------------------------------------------------------------------- pad / tile


@kernel("pad", family="tensor", exact=True)
def pad(call):
    x = _x(call)
    pads = call.ints("pad")
    mode = call.str("mode")
    if mode not in ("constant", "reflect", "replicate"):
        raise ValueError(f"pad: input mode={mode!r} is not supported; expected 'constant', 'reflect' or 'replicate'")
    if len(pads) % 2 or len(pads) // 2 > x.ndim:
        raise ValueError(f"pad: input pad has {len(pads)} values; expected an even count of at most "
                         f"2 * rank = {2 * x.ndim}")
    if any(p < 0 for p in pads):
        raise ValueError(f"pad: input pad={pads} has negative values; expected non-negative")
    npairs = len(pads) // 2
    first = x.ndim - npairs
    if mode == "constant":
        value = call.value("constant_val")
        tpad = []
        for i in reversed(range(npairs)):
            tpad += [pads[2 * i], pads[2 * i + 1]]
        return F.pad(x, tpad, mode="constant", value=float(value))
    out = x
    for i in range(npairs):
        d = first + i
        before, after = pads[2 * i], pads[2 * i + 1]
        if before == 0 and after == 0:
            continue
        n = x.shape[d]
        src = torch.arange(-before, n + after)
        if mode == "replicate":
            if before > n or after > n or n == 0:
                raise ValueError(f"pad: replicate padding ({before}, {after}) exceeds dimension {d} of size {n}")
            src = src.clamp(0, n - 1)
        else:
            if before > n - 1 or after > n - 1:
                raise ValueError(f"pad: reflect padding ({before}, {after}) must be at most size-1 = {n - 1} "
                                 f"for dimension {d}")
            src = src.abs()
            src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
        out = out.index_select(d, src)
    return out


@kernel("tile", family="tensor", exact=True)
def tile(call):
    x = _x(call)
    reps = call.ints("reps")
    if len(reps) != x.ndim:
        raise ValueError(f"tile: input reps={reps} must have one entry per dimension of x (rank {x.ndim})")
    return x.repeat(*reps) if reps else x.clone()


# ----------------------------------------------------------------------------- shape ops


@kernel("identity", family="tensor", exact=True)
def identity(call):
    return call.tensor("x")  # kernels never write into their inputs, so no copy is needed


@kernel("flatten2d", family="tensor", exact=True)
def flatten2d(call):
    x = _x(call)
    axis = call.int("axis")
    a = axis + x.ndim if axis < 0 else axis
    if not 0 <= a <= x.ndim:
        raise ValueError(f"flatten2d: input axis={axis} is out of range for a rank-{x.ndim} tensor")
    pre = math.prod(x.shape[:a])
    return x.reshape(pre, math.prod(x.shape[a:]))


def _resolve_shape(in_shape, shape, op="reshape"):
    """Target shape with 0 (copy the matching dim, counted from the right; 1 if none) and -1."""
    out = list(shape)
    rank, k = len(in_shape), len(out)
    for i, s in enumerate(out):
        if s == 0:
            j = rank - (k - i)
            out[i] = in_shape[j] if j >= 0 else 1
    neg = [i for i, s in enumerate(out) if s == -1]
    if len(neg) > 1:
        raise ValueError(f"{op}: input shape={list(shape)} has more than one -1")
    total = math.prod(in_shape)
    if neg:
        known = math.prod(s for s in out if s != -1)
        if known == 0 or total % known:
            raise ValueError(f"{op}: cannot infer -1 in shape={list(shape)} for {total} elements")
        out[neg[0]] = total // known
    if math.prod(out) != total:
        raise ValueError(f"{op}: input shape={list(shape)} (resolved {out}) does not hold {total} elements "
                         f"of x with shape {list(in_shape)}")
    return out


@kernel("reshape", family="tensor", exact=True)
def reshape(call):
    x = _x(call)
    return x.reshape(_resolve_shape(tuple(x.shape), call.ints("shape")))


@kernel("reshape_like", family="tensor", exact=True)
def reshape_like(call):
    x = _x(call)
    shapes = [tuple(t.shape) for t in call.tensors("ref_tensors")]
    begins = [int(v) for v in call.value("begins")]
    ends = [int(v) for v in call.value("ends")]
    masks = [bool(v) for v in call.value("end_masks")]
    if not (len(shapes) == len(begins) == len(ends) == len(masks)):
        raise ValueError("reshape_like: inputs ref_tensors, begins, ends and end_masks must have the same length")
    out = []
    for shp, b, e, m in zip(shapes, begins, ends, masks):
        out += list(shp[b:]) if m else list(shp[b:e])
    return x.reshape(out)


@kernel("expand_dims", family="tensor", exact=True)
def expand_dims(call):
    x = _x(call)
    axes = call.ints("axes")
    out_rank = x.ndim + len(axes)
    norm = sorted(a + out_rank if a < 0 else a for a in axes)
    if any(not 0 <= a < out_rank for a in norm) or len(set(norm)) != len(norm):
        raise ValueError(f"expand_dims: input axes={axes} are invalid for a rank-{x.ndim} tensor")
    shape = list(x.shape)
    for a in norm:
        shape.insert(a, 1)
    return x.reshape(shape)


@kernel("squeeze", family="tensor", exact=True)
def squeeze(call):
    x = _x(call)
    axes = call.ints("axes")
    if axes is None:
        return x.reshape([s for s in x.shape if s != 1])
    drop = {_axis(a, x.ndim, "axes", "squeeze") for a in axes}
    return x.reshape([s for i, s in enumerate(x.shape) if not (i in drop and s == 1)])


@kernel("transpose", family="tensor", exact=True)
def transpose(call):
    x = _x(call)
    perm = [_axis(p, x.ndim, "perm", "transpose") for p in call.ints("perm")]
    if sorted(perm) != list(range(x.ndim)):
        raise ValueError(f"transpose: input perm={call.ints('perm')} is not a permutation of {x.ndim} axes")
    return x.permute(*perm).contiguous()


@kernel("concat", family="tensor", exact=True)
def concat(call):
    values = call.tensors("values")
    if not values:
        raise ValueError("concat: input values is empty")
    if values[0].ndim == 0:
        return torch.stack(values)
    axis = _axis(call.int("axis"), values[0].ndim, op="concat")
    if call.bool("interleave"):
        st = torch.stack(values, dim=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return st.reshape(shape)
    return torch.cat(values, dim=axis)


@kernel("split", family="tensor", exact=True)
def split(call):
    x = _x(call)
    axis = _axis(call.int("axis"), x.ndim, op="split")
    sizes = call.ints("split_sizes")
    n = x.shape[axis]
    if sizes is None:
        num = call.int("num_splits")
        if num is None or num <= 0 or n % num:
            raise ValueError(f"split: input num_splits={num} does not divide axis {axis} of size {n}")
        sizes = [n // num] * num
    if sum(sizes) != n:
        raise ValueError(f"split: input split_sizes={sizes} do not sum to the axis size {n}")
    parts = [p.clone() for p in torch.split(x, sizes, dim=axis)]
    return parts[0] if len(call.outputs) == 1 else parts


@kernel("stack", family="tensor", exact=True)
def stack(call):
    values = call.tensors("values")
    axis = call.int("axis")
    rank = values[0].ndim + 1
    return torch.stack(values, dim=_axis(axis, rank, op="stack"))


@kernel("reverse", family="tensor", exact=True)
def reverse(call):
    x = _x(call)
    axes = call.ints("axes")
    if axes is None:
        axes = list(range(x.ndim))
    axes = [_axis(a, x.ndim, "axes", "reverse") for a in axes]
    return torch.flip(x, axes) if axes else x.clone()


@kernel("reverse_sequence", family="tensor", exact=True)
def reverse_sequence(call):
    x = _x(call)
    lengths = call.tensor("lengths").long().reshape(-1)
    seq = _axis(call.int("seq_axis"), x.ndim, "seq_axis", "reverse_sequence")
    batch = _axis(call.int("batch_axis"), x.ndim, "batch_axis", "reverse_sequence")
    if seq == batch:
        raise ValueError("reverse_sequence: inputs seq_axis and batch_axis must differ")
    T, B = x.shape[seq], x.shape[batch]
    if lengths.numel() != B:
        raise ValueError(f"reverse_sequence: input lengths has {lengths.numel()} values; expected {B}")
    if (lengths < 0).any() or (lengths > T).any():
        raise ValueError(f"reverse_sequence: input lengths must be in [0, {T}]")
    t = torch.arange(T).reshape(1, T)
    L = lengths.reshape(B, 1)
    src = torch.where(t < L, L - 1 - t, t)  # [B, T]
    shape = [1] * x.ndim
    shape[batch], shape[seq] = B, T
    if batch > seq:
        src = src.t()
    index = src.reshape(shape).expand(x.shape)
    return torch.gather(x, seq, index)


# ----------------------------------------------------------------------------- depth / space / batch


def _rank4(x, op):
    if x.ndim != 4:
        raise ValueError(f"{op}: input x must have rank 4 (n, C, H, W); got shape {list(x.shape)}")


@kernel("depth_to_space", family="tensor", exact=True)
def depth_to_space(call):
    x = _x(call)
    _rank4(x, "depth_to_space")
    b = call.int("block_size")
    n, c, h, w = x.shape
    if b < 1 or c % (b * b):
        raise ValueError(f"depth_to_space: input block_size={b} does not divide the {c} channels by block^2")
    co = c // (b * b)
    y = x.reshape(n, b, b, co, h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, co, h * b, w * b)


@kernel("space_to_depth", family="tensor", exact=True)
def space_to_depth(call):
    x = _x(call)
    _rank4(x, "space_to_depth")
    b = call.int("block_size")
    n, c, h, w = x.shape
    if b < 1 or h % b or w % b:
        raise ValueError(f"space_to_depth: input block_size={b} does not divide H={h}, W={w}")
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@kernel("pixel_shuffle", family="tensor", exact=True)
def pixel_shuffle(call):
    x = _x(call)
    _rank4(x, "pixel_shuffle")
    f = call.int("upscale_factor")
    if f < 1 or x.shape[1] % (f * f):
        raise ValueError(f"pixel_shuffle: input upscale_factor={f} does not divide {x.shape[1]} channels by f^2")
    return F.pixel_shuffle(x, f)


@kernel("pixel_unshuffle", family="tensor", exact=True)
def pixel_unshuffle(call):
    x = _x(call)
    _rank4(x, "pixel_unshuffle")
    f = call.int("downscale_factor")
    if f < 1 or x.shape[2] % f or x.shape[3] % f:
        raise ValueError(f"pixel_unshuffle: input downscale_factor={f} does not divide H, W {list(x.shape[2:])}")
    return F.pixel_unshuffle(x, f)


def _pairs(call, name, op):
    v = np.asarray(call.value(name)).reshape(-1).tolist()
    if len(v) != 4:
        raise ValueError(f"{op}: input {name} must have shape (2, 2); got {v}")
    return [int(i) for i in v]


@kernel("space_to_batch", family="tensor", exact=True)
def space_to_batch(call):
    x = _x(call)
    _rank4(x, "space_to_batch")
    bh, bw = call.ints("block_shape")
    t, bo, le, ri = _pairs(call, "paddings", "space_to_batch")
    x = F.pad(x, [le, ri, t, bo])
    n, c, hp, wp = x.shape
    if hp % bh or wp % bw:
        raise ValueError(f"space_to_batch: padded spatial size {hp}x{wp} is not divisible by block_shape "
                         f"{[bh, bw]}")
    y = x.reshape(n, c, hp // bh, bh, wp // bw, bw).permute(3, 5, 0, 1, 2, 4)
    return y.reshape(bh * bw * n, c, hp // bh, wp // bw)


@kernel("batch_to_space", family="tensor", exact=True)
def batch_to_space(call):
    x = _x(call)
    _rank4(x, "batch_to_space")
    bh, bw = call.ints("block_shape")
    t, bo, le, ri = _pairs(call, "crops", "batch_to_space")
    nb, c, h, w = x.shape
    if nb % (bh * bw):
        raise ValueError(f"batch_to_space: batch {nb} is not divisible by block_shape product {bh * bw}")
    n = nb // (bh * bw)
    y = x.reshape(bh, bw, n, c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(n, c, h * bh, w * bw)
    return y[:, :, t:h * bh - bo, le:w * bw - ri].contiguous()
