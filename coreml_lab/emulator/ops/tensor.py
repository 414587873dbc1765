"""Tensor creation, sorting, slicing and NMS kernels (family "tensor"; NMS "misc").

Semantics: coremltools ``ops/defs/iOS15/tensor_operation.py`` and
``tensor_transformation.py`` with the iOS16/iOS17/iOS18 redefinitions (topk
``sort``/``return_indices``/``output_indices_dtype`` and ``k=-1``; iOS17 NMS with
boxes-last layout and no score threshold; iOS18 ``slice_update``). ``cumsum`` lives in
:mod:`.reduction`; reshaping, reordering, padding and tiling in :mod:`.shape`.

Choices where the docstrings are silent (each is the documented or numpy
behaviour the docstrings point to):

* sorting (``argsort``, ``topk``) is stable: equal values keep their input order
  (lowest index first) in both ascending and descending order.
* ``slice_by_index`` / ``slice_update`` follow Python slicing: a masked begin/end
  means "from the start/to the end in the stride's direction", negative indices
  count from the end, out-of-range bounds are clamped.
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
