"""Tensor creation, shape, slicing, reordering, sorting and NMS kernels.

Semantics: coremltools ``ops/defs/iOS15/tensor_operation.py`` and
``tensor_transformation.py`` with the iOS16/iOS17/iOS18 redefinitions (topk
``sort``/``return_indices``/``output_indices_dtype`` and ``k=-1``; iOS17 reshape
``0`` matched from the right; iOS17 NMS with boxes-last layout and no score
threshold; iOS18 ``slice_update``). ``cumsum`` lives in :mod:`.reduction`.

Choices where the docstrings are silent (each is the documented or numpy
behaviour the docstrings point to):

* sorting (``argsort``, ``topk``) is stable: equal values keep their input order
  (lowest index first) in both ascending and descending order.
* ``slice_by_index`` / ``slice_update`` follow Python slicing: a masked begin/end
  means "from the start/to the end in the stride's direction", negative indices
  count from the end, out-of-range bounds are clamped.
* ``depth_to_space`` / ``space_to_depth`` / ``space_to_batch`` / ``batch_to_space``
  use TensorFlow's block order (the TF frontend maps those ops one to one; channel
  index ``(i * block + j) * C + c``), ``pixel_shuffle``/``pixel_unshuffle`` torch's.
* ``non_maximum_suppression`` ranks a box by its best class score (first class on
  ties), picks boxes greedily by descending score (lowest index on ties), suppresses
  later boxes whose IoU with a picked one is ``> iou_threshold`` (only boxes of the
  same best class with ``per_class_suppression``), rejects boxes whose best score is
  below ``score_threshold`` (iOS15), and pads the outputs: boxes and scores with
  0, indices with -1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import kernel

# ----------------------------------------------------------------------------- helpers


def _axis(axis: int, rank: int, what: str = "axis", op: str = "") -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < max(rank, 1):
        raise ValueError(f"{op}: input {what}={axis} is out of range for a rank-{rank} tensor")
    return a


def _out_dtype(call, i: int = 0, fallback: torch.dtype = torch.float32) -> torch.dtype:
    d = call.storage_dtype(i)
    return d if d is not None else fallback


def _x(call, name: str = "x"):
    return call.tensor(name)


# ----------------------------------------------------------------------------- creation


@kernel("fill", family="tensor", exact=True)
def fill(call):
    shape = call.ints("shape")
    value = call.value("value")
    return torch.full(shape, value, dtype=_out_dtype(call))


@kernel("fill_like", family="tensor", exact=True)
def fill_like(call):
    ref = call.raw("ref_tensor")
    value = call.value("value")
    return torch.full(tuple(ref.shape), value, dtype=_out_dtype(call))


@kernel("range_1d", family="tensor")
def range_1d(call):
    start, end, step = call.tensor("start"), call.tensor("end"), call.tensor("step")
    s, e, st = start.reshape(-1)[0].item(), end.reshape(-1)[0].item(), step.reshape(-1)[0].item()
    if st == 0:
        raise ValueError("range_1d: input step=0 is invalid; expected a non-zero step")
    n = max(0, int(math.ceil((e - s) / st)))
    if not start.is_floating_point():
        return torch.arange(n, dtype=torch.int64).mul_(int(st)).add_(int(s)).to(start.dtype)
    dt = start.dtype
    # start + i * step, each step rounded in the compute dtype
    return torch.arange(n, dtype=dt) * step.reshape(()).to(dt) + start.reshape(()).to(dt)


@kernel("one_hot", family="tensor", exact=True)
def one_hot(call):
    idx = call.tensor("indices").long()
    depth = call.int("one_hot_vector_size")
    axis = call.int("axis")
    rank = idx.ndim
    a = axis + rank + 1 if axis < 0 else axis
    if not 0 <= a <= rank:
        raise ValueError(f"one_hot: input axis={axis} is out of range for rank-{rank} indices")
    dtype = _out_dtype(call)
    on = torch.tensor(call.value("on_value"), dtype=dtype)
    off = torch.tensor(call.value("off_value"), dtype=dtype)
    shape = [1] * (rank + 1)
    shape[a] = depth
    r = torch.arange(depth).reshape(shape)
    hit = idx.unsqueeze(a) == r
    return torch.where(hit, on, off)


@kernel("non_zero", family="tensor", exact=True)
def non_zero(call):
    x = call.raw("x")
    return torch.nonzero(x).to(torch.int32)


@kernel("shape", family="tensor", exact=True)
def shape(call):
    x = call.raw("x")
    return torch.tensor(list(x.shape), dtype=torch.int32)


@kernel("band_part", family="tensor", exact=True)
def band_part(call):
    x = _x(call)
    lower = call.int("lower")
    upper = call.int("upper")
    m, n = x.shape[-2], x.shape[-1]
    rows = torch.arange(m).reshape(m, 1)
    cols = torch.arange(n).reshape(1, n)
    keep = torch.ones(m, n, dtype=torch.bool)
    if lower >= 0:
        keep &= (rows - cols) <= lower
    if upper >= 0:
        keep &= (cols - rows) <= upper
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype))


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


# ----------------------------------------------------------------------------- sorting


def _sorted(x: torch.Tensor, axis: int, ascending: bool):
    return torch.sort(x, dim=axis, descending=not ascending, stable=True)


@kernel("argsort", family="tensor", exact=True)
def argsort(call):
    x = _x(call)
    axis = _axis(call.int("axis"), x.ndim, op="argsort")
    _, idx = _sorted(x, axis, call.bool("ascending"))
    return idx.to(torch.int32)


@kernel("topk", family="tensor", exact=True)
def topk(call):
    x = _x(call)
    axis = _axis(call.int("axis"), x.ndim, op="topk")
    k = call.int("k")
    n = x.shape[axis]
    if k == -1:
        k = n
    if not 0 <= k <= n:
        raise ValueError(f"topk: input k={k} is out of range for axis {axis} of size {n}")
    # sort=False allows any order; the sorted order is one of them
    vals, idx = _sorted(x, axis, call.bool("ascending"))
    vals, idx = vals.narrow(axis, 0, k), idx.narrow(axis, 0, k)
    if len(call.outputs) == 1:  # return_indices=False: iOS17 declares no output_indices_dtype then
        return vals
    dtype_name = call.str("output_indices_dtype")
    if dtype_name not in ("int32", "uint16"):
        raise ValueError(f"topk: input output_indices_dtype={dtype_name!r} is not supported; "
                         "expected 'int32' or 'uint16'")
    return vals, idx.to(_out_dtype(call, 1, torch.int32))


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


# ----------------------------------------------------------------------------- slicing


def _slice_plan(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask, op):
    """Per dimension: (positive-stride python slice, flip?, squeeze?)."""
    rank = len(shape)
    for name, v in (("begin", begin), ("end", end)):
        if len(v) != rank:
            raise ValueError(f"{op}: input {name} has {len(v)} values; expected rank(x) = {rank}")
    stride = stride if stride is not None else [1] * rank
    begin_mask = begin_mask if begin_mask is not None else [False] * rank
    end_mask = end_mask if end_mask is not None else [False] * rank
    squeeze_mask = squeeze_mask if squeeze_mask is not None else [False] * rank
    plan = []
    for d in range(rank):
        n = shape[d]
        if squeeze_mask[d]:
            b = begin[d] + n if begin[d] < 0 else begin[d]
            if not 0 <= b < n:
                raise ValueError(f"{op}: squeezed index begin[{d}]={begin[d]} is out of range for size {n}")
            plan.append((slice(b, b + 1, 1), False, True))
            continue
        s = stride[d]
        if s == 0:
            raise ValueError(f"{op}: input stride[{d}]=0 is invalid; expected a non-zero stride")
        b = None if begin_mask[d] else begin[d]
        e = None if end_mask[d] else end[d]
        start, stop, step = slice(b, e, s).indices(n)
        length = len(range(start, stop, step))
        if length == 0:
            plan.append((slice(0, 0, 1), False, False))
        elif step > 0:
            plan.append((slice(start, start + (length - 1) * step + 1, step), False, False))
        else:
            last = start + (length - 1) * step
            plan.append((slice(last, start + 1, -step), True, False))
    return plan


def _masks(call, name):
    v = call.value(name)
    if v is None:
        return None
    return [bool(b) for b in np.asarray(v).reshape(-1)]


def _plan_from_call(call, x, op):
    return _slice_plan(
        tuple(x.shape), call.ints("begin"), call.ints("end"), call.ints("stride"),
        _masks(call, "begin_mask"), _masks(call, "end_mask"), _masks(call, "squeeze_mask"), op)


def _width_slice_gain(call, out: torch.Tensor, width_begin: int) -> torch.Tensor:
    """M1 / A14 Neural Engine (NE_RULES width_slice_gain_16): a slice with a non-zero begin on the
    last (width) axis passes its values through a gain of 16 - finite up to 4,094, inf from 4,096."""
    if width_begin == 0 or not out.is_floating_point() or not call.hazard("width_slice_gain_16"):
        return out
    return torch.where(out.abs() > 4094.0, out.sign() * torch.inf, out).to(out.dtype)


@kernel("slice_by_index", family="tensor", exact=True)
def slice_by_index(call):
    x = _x(call)
    plan = _plan_from_call(call, x, "slice_by_index")
    out = x[tuple(p[0] for p in plan)]
    flips = [d for d, p in enumerate(plan) if p[1]]
    if flips:
        out = torch.flip(out, flips)
    keep = [s for d, s in enumerate(out.shape) if not plan[d][2]]
    width_begin = plan[-1][0].start if plan and x.ndim else 0
    return _width_slice_gain(call, out.reshape(keep).clone(), width_begin)


@kernel("slice_by_size", family="tensor", exact=True)
def slice_by_size(call):
    x = _x(call)
    begin, size = call.ints("begin"), call.ints("size")
    if len(begin) != x.ndim or len(size) != x.ndim:
        raise ValueError(f"slice_by_size: inputs begin and size must have rank(x) = {x.ndim} values")
    out = x
    for d, (b, s) in enumerate(zip(begin, size)):
        n = x.shape[d]
        b = b + n if b < 0 else b
        s = n - b if s == -1 else s
        if b < 0 or s < 0 or b + s > n:
            raise ValueError(f"slice_by_size: begin={begin[d]}, size={size[d]} is out of range for "
                             f"dimension {d} of size {n}")
        out = out.narrow(d, b, s)
        width_begin = b
    return _width_slice_gain(call, out.clone(), width_begin if x.ndim else 0)


@kernel("slice_update", family="tensor", exact=True)
def slice_update(call):
    x = _x(call)
    update = call.tensor("update").to(x.dtype)
    plan = _plan_from_call(call, x, "slice_update")
    index = tuple(p[0] for p in plan)
    out = x.clone()
    view = out[index]
    keep = [s for d, s in enumerate(view.shape) if not plan[d][2]]
    if list(update.shape) != keep:
        if update.numel() != view.numel():
            raise ValueError(f"slice_update: input update has shape {list(update.shape)}; the slice has "
                             f"shape {keep}")
    update = update.reshape(view.shape)
    flips = [d for d, p in enumerate(plan) if p[1]]
    if flips:
        update = torch.flip(update, flips)
    out[index] = update
    return out


@kernel("sliding_windows", family="tensor", exact=True)
def sliding_windows(call):
    x = _x(call)
    axis = _axis(call.int("axis"), x.ndim, op="sliding_windows")
    size = call.int("size")
    stride = call.int("stride")
    if size <= 0 or stride <= 0 or size > x.shape[axis]:
        raise ValueError(f"sliding_windows: inputs size={size}, stride={stride} are invalid for axis "
                         f"{axis} of size {x.shape[axis]}")
    w = x.unfold(axis, size, stride)  # window dim appended last
    return w.movedim(-1, axis + 1).contiguous()


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


# ----------------------------------------------------------------------------- NMS


def _nms(boxes, scores, iou_threshold, score_threshold, max_boxes, per_class):
    """boxes [n, B, 4] (center x, center y, w, h), scores [n, B, K] -> selected indices [n, max_boxes]."""
    n, B, _ = boxes.shape
    best, cls = scores.max(dim=-1)  # first class on ties
    cx, cy, w, h = boxes.unbind(-1)
    x1, x2 = cx - w / 2, cx + w / 2
    y1, y2 = cy - h / 2, cy + h / 2
    area = w * h
    alive = torch.ones(n, B, dtype=torch.bool)
    if score_threshold is not None:
        alive &= best >= score_threshold
    key = best.double().nan_to_num(nan=-1e308, neginf=-1e308)
    sel = torch.full((n, max_boxes), -1, dtype=torch.int64)
    rows = torch.arange(n)
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    for t in range(min(max_boxes, B)):
        if not alive.any():
            break
        j = torch.where(alive, key, neg).argmax(dim=-1)  # lowest index on ties
        valid = alive[rows, j]
        sel[:, t] = torch.where(valid, j, -1)
        iw = (torch.minimum(x2, x2[rows, j, None]) - torch.maximum(x1, x1[rows, j, None])).clamp(min=0)
        ih = (torch.minimum(y2, y2[rows, j, None]) - torch.maximum(y1, y1[rows, j, None])).clamp(min=0)
        inter = iw * ih
        union = area + area[rows, j, None] - inter
        iou = torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)),
                          torch.zeros_like(union))
        kill = iou > iou_threshold
        if per_class:
            kill &= cls == cls[rows, j, None]
        alive &= ~(kill & valid[:, None])
        alive[rows, j] = False
    return sel


@kernel("non_maximum_suppression", family="misc")
def non_maximum_suppression(call):
    boxes, scores = call.tensor("boxes"), call.tensor("scores")
    ios17 = not call.has("score_threshold")
    if ios17:  # [n, 4, B], [n, K, B]
        boxes, scores = boxes.transpose(1, 2), scores.transpose(1, 2)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"non_maximum_suppression: inputs boxes {list(boxes.shape)} and scores "
                         f"{list(scores.shape)} do not have the documented layout")
    max_boxes = call.int("max_boxes")
    if max_boxes < 0:
        raise ValueError(f"non_maximum_suppression: input max_boxes={max_boxes} must be non-negative")
    iou_t = call.float("iou_threshold")
    score_t = None if ios17 else call.float("score_threshold")
    sel = _nms(boxes, scores, iou_t, score_t, max_boxes, call.bool("per_class_suppression"))
    ok = sel >= 0
    g = sel.clamp(min=0)
    out_boxes = torch.gather(boxes, 1, g[..., None].expand(-1, -1, 4))
    out_scores = torch.gather(scores, 1, g[..., None].expand(-1, -1, scores.shape[-1]))
    out_boxes = torch.where(ok[..., None], out_boxes, torch.zeros((), dtype=boxes.dtype))
    out_scores = torch.where(ok[..., None], out_scores, torch.zeros((), dtype=scores.dtype))
    indices = sel.to(torch.int32)
    if ios17:
        return out_boxes.transpose(1, 2).contiguous(), out_scores.transpose(1, 2).contiguous(), indices
    return out_boxes, out_scores, indices, ok.sum(dim=-1).to(torch.int32)
