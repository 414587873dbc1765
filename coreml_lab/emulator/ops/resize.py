"""Image resizing: upsample / resize (nearest and bilinear), the N-d resize, crop and crop_resize.

Semantics: coremltools ``ops/defs/iOS15/image_resizing.py`` with the iOS16
(``upsample_bilinear.half_pixel_centers``, ``crop_resize.pad_value``) and iOS17
(``crop_resize`` with ``boxes`` / ``box_indices``, the N-d ``resize`` op) revisions.

Sampling grids follow the docstring formulas exactly (see :func:`_grid`): every
output index ``i`` maps to a continuous input coordinate, clamped to
``[0, Xin - 1]``; bilinear ops interpolate linearly between ``floor(p)`` and
``floor(p) + 1`` along each resized axis (separably, last axis first). Coordinate
and weight arithmetic is done in float64 (devices compute coordinates in at least
FP32); the blend ``a * (1 - w) + b * w`` runs in the op's compute dtype.

Points the docstrings leave open, and the choice made here:

* ``upsample_nearest_neighbor`` picks ``floor(i * Xin / Xout)``: the scale is
  recomputed from the sizes, like ``upsample_bilinear`` (whose docstring says so).
  The torch frontend encodes ``size=`` as scale ``(out + 1e-4) / in``; taking
  ``floor(i / scale)`` literally would be off by one at every exact ratio point.
* ``resize_nearest_neighbor`` picks ``floor((i + 0.5) * Xin / Xout)`` (TF
  ``half_pixel_centers=True``, which the TF frontend maps onto this op).
* iOS17 ``resize`` with ``NEAREST_NEIGHBOR`` rounds the sampling mode's grid
  point half-up (``floor(p + 0.5)``); with ``UNALIGN_CORNERS`` that equals
  ``resize_nearest_neighbor``; it matches coremltools' device test for DEFAULT.
* ``crop_resize`` applies the sampling mode to each box ``[start, end]`` as if
  the box were the ``[0, Xin - 1]`` interval (``Xin - 1 = end - start``); an
  inverted box samples backwards. Samples outside ``[0, H-1] x [0, W-1]`` take
  ``pad_value`` (0 before iOS16), like TF ``crop_and_resize`` extrapolation.

Sampling at arbitrary coordinates (``resample``, ``affine``) lives in :mod:`.resample`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import kernel

_SAMPLING_MODES = ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS")
_BOX_MODES = ("CORNERS_HEIGHT_FIRST", "CORNERS_WIDTH_FIRST", "CENTER_SIZE_HEIGHT_FIRST", "CENTER_SIZE_WIDTH_FIRST")
_F64 = torch.float64


def _choice(call, name: str, allowed, lower: bool = False) -> str:
    v = call.str(name)
    key = v.lower() if lower else v
    if key not in allowed:
        raise ValueError(
            f"{call.op.op_type} input {name!r} is {v!r}; expected one of {', '.join(allowed)}"
        )
    return key


def _declared_dim(call, x: torch.Tensor, axis: int, fallback: int) -> int:
    """Output dim ``axis`` as the op's type inference declared it, when that is concrete and the
    declared input dim matches the runtime one (flexible shapes); else ``fallback``."""
    out_shape = getattr(call.op.outputs[0], "shape", None)
    in_var = call.op.inputs.get("x")
    in_shape = getattr(in_var, "shape", None)
    if out_shape and in_shape and len(out_shape) == x.ndim and len(in_shape) == x.ndim:
        d, d_in = out_shape[axis], in_shape[axis]
        if isinstance(d, (int, np.integer)) and isinstance(d_in, (int, np.integer)) and int(d_in) == x.shape[axis]:
            return int(d)
    return fallback


# -- sampling grids ------------------------------------------------------------------------

def _grid(mode: str, extent, n: int) -> torch.Tensor:
    """``n`` sample positions in ``[0, extent]`` for a sampling mode (float64).

    ``extent`` is ``Xin - 1`` in the docstring's notation (the interval ``[0, Xin-1]``):
    a number (result ``[n]``) or a float64 tensor of extents (result ``[*extent.shape, n]``).
    """
    scalar = not isinstance(extent, torch.Tensor)
    ext = torch.as_tensor(extent, dtype=_F64).unsqueeze(-1)  # [..., 1]
    i = torch.arange(n, dtype=_F64)
    x_in = ext + 1.0
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n == 1:
            p = ext / 2.0 if mode == "ALIGN_CORNERS" else torch.zeros_like(ext)
        else:
            p = i * (ext / (n - 1))
    elif mode == "DEFAULT":
        p = i * ((x_in - x_in / n) / (n - 1)) if n > 1 else torch.zeros_like(ext)
    elif mode == "OFFSET_CORNERS":
        delta = ext.clamp(min=1.0) / n
        p = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        s = x_in / n
        p = i * s + 0.5 * s - 0.5
    else:  # pragma: no cover - callers validate
        raise ValueError(mode)
    p = torch.minimum(p.clamp(min=0.0), ext.clamp(min=0.0))
    return p.reshape(n) if scalar else p


def _lerp_axis(x: torch.Tensor, dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at in-range positions ``pos`` (1-d, float64)."""
    size = x.shape[dim]
    fl = torch.floor(pos)
    i0 = fl.long().clamp(0, size - 1)
    i1 = (i0 + 1).clamp(max=size - 1)
    frac = pos - fl
    view = [1] * x.ndim
    view[dim] = -1
    w1 = frac.to(x.dtype).reshape(view)
    w0 = (1.0 - frac).to(x.dtype).reshape(view)
    return x.index_select(dim, i0) * w0 + x.index_select(dim, i1) * w1


def _bilinear_hw(x: torch.Tensor, ph: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    # last axis first, like torch's CPU upsample_bilinear2d
    return _lerp_axis(_lerp_axis(x, x.ndim - 1, pw), x.ndim - 2, ph)


def _float_input(call, name: str = "x") -> torch.Tensor:
    x = call.tensor(name)
    if not x.is_floating_point():
        raise TypeError(f"{call.op.op_type} input {name!r} must be fp16/fp32, got {x.dtype}")
    return x


def _rank_at_least(call, x: torch.Tensor, n: int) -> None:
    if x.ndim < n:
        raise ValueError(f"{call.op.op_type} input 'x' must have rank >= {n}, got shape {tuple(x.shape)}")


# -- upsample / resize ---------------------------------------------------------------------

def _scaled_size(call, x: torch.Tensor, axis: int, name: str) -> int:
    scale = call.value(name)
    computed = int(np.floor(np.float32(scale) * np.float32(x.shape[axis])))
    return _declared_dim(call, x, axis, computed)


@kernel("upsample_nearest_neighbor", family="resize", exact=True)
def upsample_nearest_neighbor(call):
    x = call.tensor("x")
    _rank_at_least(call, x, 3)
    h_in, w_in = x.shape[-2], x.shape[-1]
    h_out = _scaled_size(call, x, -2, "scale_factor_height")
    w_out = _scaled_size(call, x, -1, "scale_factor_width")
    ih = ((torch.arange(h_out) * h_in) // h_out).clamp(max=h_in - 1)
    iw = ((torch.arange(w_out) * w_in) // w_out).clamp(max=w_in - 1)
    return x.index_select(-2, ih).index_select(-1, iw)


@kernel("resize_nearest_neighbor", family="resize", exact=True)
def resize_nearest_neighbor(call):
    x = call.tensor("x")
    _rank_at_least(call, x, 3)
    h_out = call.int("target_size_height")
    w_out = call.int("target_size_width")
    h_in, w_in = x.shape[-2], x.shape[-1]
    # floor((i + 0.5) * Xin / Xout) in exact integer arithmetic
    ih = (((2 * torch.arange(h_out) + 1) * h_in) // (2 * h_out)).clamp(max=h_in - 1)
    iw = (((2 * torch.arange(w_out) + 1) * w_in) // (2 * w_out)).clamp(max=w_in - 1)
    return x.index_select(-2, ih).index_select(-1, iw)


@kernel("upsample_bilinear", family="resize")
def upsample_bilinear(call):
    x = _float_input(call)
    _rank_at_least(call, x, 3)
    h_in, w_in = x.shape[-2], x.shape[-1]
    h_out = _scaled_size(call, x, -2, "scale_factor_height")
    w_out = _scaled_size(call, x, -1, "scale_factor_width")
    align = call.bool("align_corners")
    half_pixel = call.bool("half_pixel_centers", not align)  # iOS16+: documented "defaults to !align_corners", not declared
    if align:
        mode = "STRICT_ALIGN_CORNERS"
    elif half_pixel:
        mode = "UNALIGN_CORNERS"
    else:
        mode = "DEFAULT"  # grid i * Xin / Xout (TF align_corners=False, half_pixel_centers=False)
    return _bilinear_hw(x, _grid(mode, h_in - 1, h_out), _grid(mode, w_in - 1, w_out))


@kernel("resize_bilinear", family="resize")
def resize_bilinear(call):
    x = _float_input(call)
    _rank_at_least(call, x, 3)
    h_out = call.int("target_size_height")
    w_out = call.int("target_size_width")
    mode = _choice(call, "sampling_mode", _SAMPLING_MODES)
    h_in, w_in = x.shape[-2], x.shape[-1]
    return _bilinear_hw(x, _grid(mode, h_in - 1, h_out), _grid(mode, w_in - 1, w_out))


@kernel("resize", family="resize")
def resize(call):
    """iOS17 ``resize``: the rightmost ``resized_dims`` dims take their size from ``shape``."""
    x = call.tensor("x")
    shape = call.ints("shape")
    k = call.int("resized_dims")
    interp = _choice(call, "interpolation_mode", ("LINEAR", "NEAREST_NEIGHBOR"))
    mode = _choice(call, "sampling_mode", _SAMPLING_MODES)
    if k > len(shape) or len(shape) > x.ndim:
        raise ValueError(
            f"resize: need resized_dims ({k}) <= size(shape) ({len(shape)}) <= rank(x) ({x.ndim})"
        )
    targets = []
    for j in range(k):
        t = shape[len(shape) - k + j]
        axis = x.ndim - k + j
        targets.append((axis, x.shape[axis] if t == 0 else t))
    if interp == "NEAREST_NEIGHBOR":
        y = x
        for axis, n in targets:
            size = x.shape[axis]
            # +1e-9: grid points that are exact ties in rational arithmetic (e.g. 7.5 * 6/9 - 0.5)
            # can land a hair below x.5 in float64; round them up as exact arithmetic would
            idx = torch.floor(_grid(mode, size - 1, n) + (0.5 + 1e-9)).long().clamp(0, size - 1)
            y = y.index_select(axis, idx)
        return y
    integer = not x.is_floating_point()
    y = x.to(torch.float32) if integer else x
    for axis, n in reversed(targets):  # last axis first
        y = _lerp_axis(y, axis, _grid(mode, x.shape[axis] - 1, n))
    if integer:
        y = torch.round(y).to(x.dtype)
    return y


@kernel("crop", family="resize", exact=True)
def crop(call):
    x = call.tensor("x")
    _rank_at_least(call, x, 3)
    ch = call.ints("crop_height")
    cw = call.ints("crop_width")
    if len(ch) != 2 or len(cw) != 2:
        raise ValueError(f"crop: crop_height and crop_width need 2 values each, got {ch} and {cw}")
    h, w = x.shape[-2], x.shape[-1]
    return x[..., ch[0]:h - ch[1], cw[0]:w - cw[1]]


# -- crop_resize ---------------------------------------------------------------------------

def _box_grid(mode: str, start: torch.Tensor, end: torch.Tensor, n: int) -> torch.Tensor:
    """Sample positions [N, n] inside boxes ``[start, end]`` (float64, pixel units); an inverted
    box (end < start) samples the same grid backwards from ``start``."""
    length = end - start
    g = _grid(mode, length.abs(), n)  # [N, n]
    return start[:, None] + torch.where(length[:, None] >= 0, g, -g)


def _gather_hw(xb: torch.Tensor, ih: torch.Tensor, iw: torch.Tensor) -> torch.Tensor:
    """xb [N, C, H, W]; ih [N, th]; iw [N, tw] -> [N, C, th, tw]."""
    n, c, h, w = xb.shape
    rows = torch.gather(xb, 2, ih[:, None, :, None].expand(n, c, ih.shape[1], w))
    return torch.gather(rows, 3, iw[:, None, None, :].expand(n, c, ih.shape[1], iw.shape[1]))


def _crop_resize_core(call, x, boxes64, bidx, th, tw, pad_value):
    h, w = x.shape[-2], x.shape[-1]
    mode = _choice(call, "sampling_mode", _SAMPLING_MODES)
    box_mode = _choice(call, "box_coordinate_mode", _BOX_MODES)
    b = boxes64 * float(call.float("spatial_scale"))
    if box_mode == "CORNERS_HEIGHT_FIRST":
        h0, w0, h1, w1 = b.unbind(1)
    elif box_mode == "CORNERS_WIDTH_FIRST":
        w0, h0, w1, h1 = b.unbind(1)
    else:
        if box_mode == "CENTER_SIZE_HEIGHT_FIRST":
            hc, wc, bh, bw = b.unbind(1)
        else:
            wc, hc, bw, bh = b.unbind(1)
        h0, h1 = hc - bh / 2, hc + bh / 2
        w0, w1 = wc - bw / 2, wc + bw / 2
    if call.bool("normalized_coordinates"):
        h0, h1 = h0 * (h - 1), h1 * (h - 1)
        w0, w1 = w0 * (w - 1), w1 * (w - 1)
    ph = _box_grid(mode, h0, h1, th)  # [N, th]
    pw = _box_grid(mode, w0, w1, tw)  # [N, tw]
    xb = x.index_select(0, bidx)  # [N, C, H, W]
    fh, fw = torch.floor(ph), torch.floor(pw)
    ih0, iw0 = fh.long().clamp(0, h - 1), fw.long().clamp(0, w - 1)
    ih1, iw1 = (ih0 + 1).clamp(max=h - 1), (iw0 + 1).clamp(max=w - 1)
    dt = x.dtype
    wy1 = (ph - fh).to(dt)[:, None, :, None]
    wy0 = (1.0 - (ph - fh)).to(dt)[:, None, :, None]
    wx1 = (pw - fw).to(dt)[:, None, None, :]
    wx0 = (1.0 - (pw - fw)).to(dt)[:, None, None, :]
    top = _gather_hw(xb, ih0, iw0) * wx0 + _gather_hw(xb, ih0, iw1) * wx1
    bot = _gather_hw(xb, ih1, iw0) * wx0 + _gather_hw(xb, ih1, iw1) * wx1
    out = top * wy0 + bot * wy1
    inside = ((ph >= 0) & (ph <= h - 1))[:, None, :, None] & ((pw >= 0) & (pw <= w - 1))[:, None, None, :]
    return torch.where(inside, out, torch.tensor(pad_value, dtype=dt))


@kernel("crop_resize", family="resize")
def crop_resize(call):
    x = _float_input(call)
    if x.ndim != 4:
        raise ValueError(f"crop_resize input 'x' must be rank 4, got shape {tuple(x.shape)}")
    th = call.int("target_height")
    tw = call.int("target_width")
    pad_value = call.float("pad_value")
    bsz = x.shape[0]
    if call.has("boxes"):  # iOS17: boxes [N, 4], box_indices [N] -> [N, C, th, tw]
        boxes = call.raw("boxes").to(_F64).reshape(-1, 4)
        if call.has("box_indices"):
            bidx = call.raw("box_indices").to(torch.int64).reshape(-1)
        else:  # the declared default [0, 1, ..., N - 1]
            bidx = torch.as_tensor(call.ints("box_indices"), dtype=torch.int64)
        if bidx.numel() and (int(bidx.min()) < 0 or int(bidx.max()) >= bsz):
            raise ValueError(f"crop_resize input 'box_indices' must lie in [0, {bsz}), got {bidx.tolist()}")
        return _crop_resize_core(call, x, boxes, bidx, th, tw, pad_value)
    # iOS15/16: roi [N, 1, 4 or 5, 1, 1]
    roi = call.raw("roi").to(_F64)
    n, k = roi.shape[0], roi.shape[2]
    roi = roi.reshape(n, k)
    if k == 5:  # [batch index, box]: one crop per roi -> [N, 1, C, th, tw]
        bidx = roi[:, 0].round().long()
        if n and (int(bidx.min()) < 0 or int(bidx.max()) >= bsz):
            raise ValueError(f"crop_resize roi batch indices must lie in [0, {bsz}), got {bidx.tolist()}")
        return _crop_resize_core(call, x, roi[:, 1:], bidx, th, tw, pad_value).unsqueeze(1)
    if k != 4:
        raise ValueError(
            f"crop_resize input 'roi' must have shape [N, 1, 4|5, 1, 1], got {tuple(call.raw('roi').shape)}"
        )
    # every box on every image -> [N, B, C, th, tw]
    boxes = roi.repeat_interleave(bsz, dim=0)
    bidx = torch.arange(bsz).repeat(n)
    out = _crop_resize_core(call, x, boxes, bidx, th, tw, pad_value)
    return out.reshape(n, bsz, *out.shape[1:])
