"""gather / scatter kernels: gather, gather_along_axis, gather_nd and their scatter twins.

Semantics: coremltools ``ops/defs/iOS15/scatter_gather.py`` plus iOS16
(``batch_dims`` for gather / gather_nd) and iOS17 (``validate_indices``; negative
indices are documented as out of bound there).

Index handling, the same for every op and opset:

* before iOS17, negative indices in ``[-D, 0)`` count from the end; the iOS17
  definitions (the opset that adds ``validate_indices``) count negative indices as
  out of bound ("now supports only positive values -- negative values are considered
  out-of-bound"), and the converters make iOS17 indices non-negative first;
* ``validate_indices=True`` raises on any index outside ``[0, D)``, as Core ML stops
  the prediction ("Unable to compute the prediction using ML Program");
* otherwise out-of-bound indices are "undefined but memory safe" on device: gathers
  clamp them into range, scatters drop those updates (coremltools' iOS17 op tests
  expect an unvalidated scatter at index -1 not to update the last row).

Scatter modes ``update/add/sub/mul/div/max/min`` are applied in update order
(``update`` with repeated indices keeps the last update). ``add``/``sub`` run in the
profile's accumulation dtype (FP16 accumulation rounds after every update).
"""

from __future__ import annotations

import math

import torch

from ..registry import kernel

_MODES = ("update", "add", "sub", "mul", "div", "max", "min")
_NO_SPEC = type("NoSpec", (), {"input_types": {}})()


def _axis(axis: int, rank: int, op: str) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise ValueError(f"{op}: input axis={axis} is out of range for a rank-{rank} tensor")
    return a


def _fix_indices(call, idx: torch.Tensor, size, op: str, drop: bool = False):
    """int64 indices in [0, size) (size: int or a tensor broadcastable to idx) and an in-range mask."""
    idx = idx.long()
    size_t = torch.as_tensor(size, dtype=torch.long)
    if call.bool("validate_indices"):
        bad = (idx < 0) | (idx >= size_t)
        if bad.any():
            first = idx[bad].reshape(-1)[0].item()
            raise ValueError(f"{op}: validate_indices=True and input indices contain {first}, outside "
                             f"[0, {size}) (iOS17 treats negative indices as out of bound); Core ML stops "
                             f"here too: Unable to compute the prediction using ML Program")
        return idx, None
    if "validate_indices" not in getattr(call.op, "input_spec", _NO_SPEC).input_types:
        idx = torch.where(idx < 0, idx + size_t, idx)  # before iOS17: from the end
    ok = (idx >= 0) & (idx < size_t)
    if bool(ok.all()):
        return idx, None
    if drop:
        return idx.clamp(min=0), ok
    return torch.minimum(idx.clamp(min=0), size_t - 1), None


# ----------------------------------------------------------------------------- gathers


@kernel("gather", family="tensor", exact=True)
def gather(call):
    x = call.tensor("x")
    idx = call.tensor("indices")
    axis = _axis(call.int("axis"), x.ndim, "gather")
    bd = call.int("batch_dims")
    if bd < 0:
        bd += idx.ndim
    if not 0 <= bd <= min(axis, idx.ndim):
        raise ValueError(f"gather: input batch_dims={call.int('batch_dims')} must be in [0, min(axis, "
                         f"rank(indices))] = [0, {min(axis, idx.ndim)}]")
    if tuple(idx.shape[:bd]) != tuple(x.shape[:bd]):
        raise ValueError(f"gather: the first batch_dims={bd} dims of x {list(x.shape)} and indices "
                         f"{list(idx.shape)} must match")
    idx, _ = _fix_indices(call, idx, x.shape[axis], "gather")
    out_shape = list(x.shape[:axis]) + list(idx.shape[bd:]) + list(x.shape[axis + 1:])
    if bd == 0:
        return x.index_select(axis, idx.reshape(-1)).reshape(out_shape)
    Bp = math.prod(x.shape[:bd])
    P = math.prod(x.shape[bd:axis])
    Q = math.prod(x.shape[axis + 1:])
    xr = x.reshape(Bp, P, x.shape[axis], Q)
    ir = idx.reshape(Bp, 1, -1, 1)
    out = torch.gather(xr, 2, ir.expand(Bp, P, ir.shape[2], Q))
    return out.reshape(out_shape)


@kernel("gather_along_axis", family="tensor", exact=True)
def gather_along_axis(call):
    x = call.tensor("x")
    idx = call.tensor("indices")
    axis = _axis(call.int("axis"), x.ndim, "gather_along_axis")
    if idx.ndim != x.ndim:
        raise ValueError(f"gather_along_axis: indices rank {idx.ndim} must equal x rank {x.ndim}")
    idx, _ = _fix_indices(call, idx, x.shape[axis], "gather_along_axis")
    return torch.gather(x, axis, idx)


def _nd_linear(call, idx: torch.Tensor, dims, op: str, drop: bool = False):
    """Linear offsets into ``dims`` from the last axis of ``idx`` (indices fixed as :func:`_fix_indices`)."""
    L = idx.shape[-1]
    sizes = torch.tensor(list(dims[:L]), dtype=torch.long)
    idx, ok = _fix_indices(call, idx, sizes, op, drop)
    strides = torch.tensor([math.prod(dims[i + 1:L]) for i in range(L)], dtype=torch.long)
    lin = (idx * strides).sum(-1)
    if ok is not None:
        ok = ok.all(-1)
    return lin, ok


@kernel("gather_nd", family="tensor", exact=True)
def gather_nd(call):
    x = call.tensor("x")
    idx = call.tensor("indices")
    bd = call.int("batch_dims")
    L = idx.shape[-1]
    if bd < 0 or bd + L > x.ndim or tuple(idx.shape[:bd]) != tuple(x.shape[:bd]):
        raise ValueError(f"gather_nd: indices {list(idx.shape)} with batch_dims={bd} do not fit x "
                         f"{list(x.shape)}")
    out_shape = list(idx.shape[:-1]) + list(x.shape[bd + L:])
    Bp = math.prod(x.shape[:bd])
    S = math.prod(x.shape[bd:bd + L])
    Q = math.prod(x.shape[bd + L:])
    lin, _ = _nd_linear(call, idx, x.shape[bd:], "gather_nd")
    xr = x.reshape(Bp, S, Q)
    lin = lin.reshape(Bp, -1)
    out = xr[torch.arange(Bp).reshape(Bp, 1), lin]
    return out.reshape(out_shape)


# ----------------------------------------------------------------------------- scatters


def _apply(call, data: torch.Tensor, lin: torch.Tensor, upd: torch.Tensor, ok, op: str):
    """Scatter flat ``upd`` into flat positions ``lin`` of ``data`` by ``mode``."""
    mode = call.str("mode")
    if mode not in _MODES:
        raise ValueError(f"{op}: input mode={mode!r} is not supported; expected one of {_MODES}")
    shape = data.shape
    lin = lin.reshape(-1)
    upd = upd.reshape(-1)
    if upd.numel() != lin.numel():
        raise ValueError(f"{op}: input updates has {upd.numel()} elements; the indices address "
                         f"{lin.numel()}")
    if ok is not None:
        keep = ok.reshape(-1)
        lin, upd = lin[keep], upd[keep]
    if mode in ("add", "sub"):
        acc = call.accumulate if data.is_floating_point() else data.dtype
        out = data.reshape(-1).to(acc, copy=True)
        u = upd.to(acc)
        out.index_add_(0, lin, -u if mode == "sub" else u)
        return out.reshape(shape)
    out = data.reshape(-1).clone()
    upd = upd.to(out.dtype)
    if mode == "update":
        order = torch.arange(lin.numel())
        last = torch.full((out.numel(),), -1, dtype=torch.long).scatter_reduce(0, lin, order, "amax")
        win = last[lin] == order  # the last update to each position wins
        out[lin[win]] = upd[win]
    elif mode == "mul":
        out.scatter_reduce_(0, lin, upd, "prod", include_self=True)
    elif mode == "max":
        out.scatter_reduce_(0, lin, upd, "amax", include_self=True)
    elif mode == "min":
        out.scatter_reduce_(0, lin, upd, "amin", include_self=True)
    else:  # div: data / u1 / u2 ... == data / (u1 * u2 ...)
        den = torch.ones_like(out).scatter_reduce_(0, lin, upd, "prod", include_self=True)
        if out.is_floating_point():
            out = out / den
        else:
            out = torch.div(out, den, rounding_mode="trunc")
    return out.reshape(shape)


def _grid_offsets(shape, strides, skip: int):
    """Sum over dims d != skip of arange(shape[d]) * strides[d], broadcast to ``shape``."""
    total = torch.zeros([1] * len(shape), dtype=torch.long)
    for d, (n, s) in enumerate(zip(shape, strides)):
        if d == skip:
            continue
        view = [1] * len(shape)
        view[d] = n
        total = total + (torch.arange(n) * s).reshape(view)
    return total


def _strides(shape):
    return [math.prod(shape[d + 1:]) for d in range(len(shape))]


@kernel("scatter", family="tensor")
def scatter(call):
    data = call.tensor("data")
    idx = call.tensor("indices").reshape(-1)
    upd = call.tensor("updates")
    axis = _axis(call.int("axis"), data.ndim, "scatter")
    want = list(data.shape[:axis]) + [idx.numel()] + list(data.shape[axis + 1:])
    if list(upd.shape) != want:
        raise ValueError(f"scatter: input updates has shape {list(upd.shape)}; expected {want}")
    idx, ok = _fix_indices(call, idx, data.shape[axis], "scatter", drop=True)
    st = _strides(data.shape)
    view = [1] * data.ndim
    view[axis] = idx.numel()
    lin = _grid_offsets(upd.shape, st, axis) + (idx * st[axis]).reshape(view)
    okb = ok.reshape(view).expand(upd.shape) if ok is not None else None
    return _apply(call, data, lin.expand(upd.shape), upd, okb, "scatter")


@kernel("scatter_along_axis", family="tensor")
def scatter_along_axis(call):
    data = call.tensor("data")
    idx = call.tensor("indices")
    upd = call.tensor("updates")
    axis = _axis(call.int("axis"), data.ndim, "scatter_along_axis")
    if idx.shape != upd.shape or idx.ndim != data.ndim:
        raise ValueError(f"scatter_along_axis: indices {list(idx.shape)} and updates {list(upd.shape)} must "
                         f"have the same shape and the rank of data ({data.ndim})")
    idx, ok = _fix_indices(call, idx, data.shape[axis], "scatter_along_axis", drop=True)
    st = _strides(data.shape)
    lin = _grid_offsets(idx.shape, st, axis) + idx * st[axis]
    return _apply(call, data, lin, upd, ok, "scatter_along_axis")


@kernel("scatter_nd", family="tensor")
def scatter_nd(call):
    data = call.tensor("data")
    idx = call.tensor("indices")
    upd = call.tensor("updates")
    L = idx.shape[-1]
    want = list(idx.shape[:-1]) + list(data.shape[L:])
    if L > data.ndim or list(upd.shape) != want:
        raise ValueError(f"scatter_nd: input updates has shape {list(upd.shape)}; expected {want} "
                         f"(indices {list(idx.shape)}, data {list(data.shape)})")
    Q = math.prod(data.shape[L:])
    slot, ok = _nd_linear(call, idx, data.shape, "scatter_nd", drop=True)
    lin = slot.reshape(-1, 1) * Q + torch.arange(Q).reshape(1, Q)
    okb = ok.reshape(-1, 1).expand(-1, Q) if ok is not None else None
    return _apply(call, data, lin, upd.reshape(-1, Q), okb, "scatter_nd")
