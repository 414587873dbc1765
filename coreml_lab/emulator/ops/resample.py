"""Image resampling: ``resample`` at given coordinates and ``affine`` on a transformed grid (family "resize").

Semantics: coremltools ``ops/defs/iOS15/image_resizing.py`` (``resample``, ``affine``) with the
iOS16 revision (fp16 ``resample`` coordinates). Coordinates become pixel positions in float64;
the bilinear blend runs in the op's compute dtype, as for the resizing ops of :mod:`.resize`.

Points the docstrings leave open, and the choice made here:

* nearest sampling rounds half-up (coremltools' device test for ``resample`` needs
  ``6.5 -> 7``);
* padding modes act on the integer neighbour indices (``reflection`` mirrors about the
  edge pixels, ``symmetric`` repeats them).
"""

from __future__ import annotations

import torch

from ..registry import kernel
from .resize import _F64, _choice, _float_input

_PADDING_MODES = ("constant", "border", "reflection", "symmetric")
_COORD_MODES = ("unnormalized", "normalized_minus_one_to_one", "normalized_zero_to_one")


def _pad_index(idx: torch.Tensor, n: int, mode: str):
    """Map integer indices into ``[0, n)`` for a padding mode; returns (index, valid mask or None)."""
    if mode == "constant":
        valid = (idx >= 0) & (idx < n)
        return idx.clamp(0, n - 1), valid
    if mode == "border" or n == 1:
        return idx.clamp(0, n - 1), None
    if mode == "reflection":  # mirror about the edge pixels: |1,2,3| -> 2,3,2,1,2,3,2,1,2
        period = 2 * (n - 1)
        m = torch.remainder(idx, period)
        return torch.where(m >= n, period - m, m), None
    # symmetric: edge pixels repeated: |1,2,3| -> 3,2,1,1,2,3,3,2,1
    period = 2 * n
    m = torch.remainder(idx, period)
    return torch.where(m >= n, period - 1 - m, m), None


def _to_pixels(c: torch.Tensor, n: int, coord_mode: str, align: bool) -> torch.Tensor:
    if coord_mode == "unnormalized":
        return c
    if coord_mode == "normalized_minus_one_to_one":
        return (c + 1.0) * 0.5 * (n - 1) if align else ((c + 1.0) * n - 1.0) * 0.5
    return c * (n - 1) if align else c * n - 0.5  # normalized_zero_to_one


def _sample(x: torch.Tensor, px: torch.Tensor, py: torch.Tensor, sampling: str, padding: str,
            pad_value: float) -> torch.Tensor:
    """Sample x [B, C, H, W] at pixel positions px, py [B, Ho, Wo] (float64) -> [B, C, Ho, Wo]."""
    b, c, h, w = x.shape
    ho, wo = px.shape[1], px.shape[2]
    flat = x.reshape(b, c, h * w)
    pad = torch.tensor(pad_value, dtype=x.dtype)

    def fetch(iy, ix):
        iy, vy = _pad_index(iy, h, padding)
        ix, vx = _pad_index(ix, w, padding)
        lin = (iy * w + ix).reshape(b, 1, ho * wo).expand(b, c, ho * wo)
        v = torch.gather(flat, 2, lin).reshape(b, c, ho, wo)
        if vy is not None:
            v = torch.where((vy & vx)[:, None], v, pad)
        return v

    if sampling == "nearest":
        return fetch(torch.floor(py + 0.5).long(), torch.floor(px + 0.5).long())
    fx, fy = torch.floor(px), torch.floor(py)
    ix0, iy0 = fx.long(), fy.long()
    wx1 = (px - fx).to(x.dtype)[:, None]
    wx0 = (1.0 - (px - fx)).to(x.dtype)[:, None]
    wy1 = (py - fy).to(x.dtype)[:, None]
    wy0 = (1.0 - (py - fy)).to(x.dtype)[:, None]
    top = fetch(iy0, ix0) * wx0 + fetch(iy0, ix0 + 1) * wx1
    bot = fetch(iy0 + 1, ix0) * wx0 + fetch(iy0 + 1, ix0 + 1) * wx1
    return top * wy0 + bot * wy1


def _resample_params(call):
    sampling = _choice(call, "sampling_mode", ("bilinear", "nearest"), lower=True)
    padding = _choice(call, "padding_mode", _PADDING_MODES, lower=True)
    coord_mode = _choice(call, "coordinates_mode", _COORD_MODES, lower=True)
    return sampling, padding, coord_mode, call.float("padding_value"), call.bool("align_corners")


@kernel("resample", family="resize")
def resample(call):
    x = _float_input(call)
    if x.ndim != 4:
        raise ValueError(f"resample input 'x' must be rank 4, got shape {tuple(x.shape)}")
    coords = call.raw("coordinates").to(_F64)
    if coords.ndim != 4 or coords.shape[-1] != 2 or coords.shape[0] != x.shape[0]:
        raise ValueError(
            f"resample input 'coordinates' must have shape [B, H2, W2, 2] with B={x.shape[0]}, "
            f"got {tuple(coords.shape)}"
        )
    sampling, padding, coord_mode, pad_value, align = _resample_params(call)
    h, w = x.shape[-2], x.shape[-1]
    px = _to_pixels(coords[..., 0], w, coord_mode, align)
    py = _to_pixels(coords[..., 1], h, coord_mode, align)
    return _sample(x, px, py, sampling, padding, pad_value)


def _norm_grid(n: int, align: bool) -> torch.Tensor:
    """Output pixel centres in [-1, 1] coordinates (as torch's affine_grid lays them out)."""
    if n <= 1:
        return torch.zeros(max(n, 0), dtype=_F64)
    i = torch.arange(n, dtype=_F64)
    return -1.0 + 2.0 * i / (n - 1) if align else (2.0 * i + 1.0) / n - 1.0


@kernel("affine", family="resize")
def affine(call):
    x = _float_input(call)
    if x.ndim != 4:
        raise ValueError(f"affine input 'x' must be rank 4, got shape {tuple(x.shape)}")
    m = call.raw("transform_matrix").to(_F64)
    if m.ndim != 2 or m.shape[-1] != 6 or m.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"affine input 'transform_matrix' must have shape [1 or B, 6] with B={x.shape[0]}, got {tuple(m.shape)}"
        )
    sampling, padding, coord_mode, pad_value, align = _resample_params(call)
    if coord_mode != "normalized_minus_one_to_one":
        raise ValueError(f"affine input 'coordinates_mode' is {coord_mode!r}; expected 'normalized_minus_one_to_one'")
    ho, wo = call.int("output_height"), call.int("output_width")
    b, _, h, w = x.shape
    gy = _norm_grid(ho, align)[:, None]  # [Ho, 1]
    gx = _norm_grid(wo, align)[None, :]  # [1, Wo]
    m = m.expand(b, 6)
    a0, a1, a2, b0, b1, b2 = (m[:, k].reshape(b, 1, 1) for k in range(6))
    xs = a0 * gx + a1 * gy + a2  # [B, Ho, Wo], normalized input coordinates
    ys = b0 * gx + b1 * gy + b2
    px = _to_pixels(xs, w, coord_mode, align)
    py = _to_pixels(ys, h, coord_mode, align)
    return _sample(x, px, py, sampling, padding, pad_value)
