"""Resize-family kernels against torch and numpy references written from the MIL docstrings.

What torch produces (coremltools 9): ``F.interpolate`` / ``nn.Upsample`` nearest ->
``upsample_nearest_neighbor`` (``size=`` becomes the scale ``(out + 1e-4) / in``);
bilinear / linear -> ``upsample_bilinear``; ``F.grid_sample`` -> ``resample``;
``F.affine_grid`` + ``F.grid_sample`` -> ``affine``. ``resize_bilinear``,
``resize_nearest_neighbor``, ``crop_resize``, ``crop`` and the iOS17 ``resize``
are not produced by the torch frontend for plain modules and are tested through
the MIL builder. The torch dialect ops ``torch_upsample_*`` are always rewritten
to core ops (or the conversion fails) before an ML Program is serialised.
"""

from __future__ import annotations

import warnings
from functools import partial

import coremltools as ct
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from opcheck import FakeOpCall, Fn, check_mil_outputs, check_torch_op, op_types

from coreml_lab.emulator import EmulatedModel
from coreml_lab.emulator.ops import resample as resample_ops
from coreml_lab.emulator.ops import resize as resize_ops

# FP32 atol 1e-5 and a shape check on every output; FP16 atol 1e-2 * max|want|
check_mil = partial(check_mil_outputs, atol=1e-5, check_shape=True)


# -- helpers -------------------------------------------------------------------------------

def _img(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- numpy references from the docstrings ----------------------------------------------------

def np_grid(mode, x_in, x_out, start=0.0, end=None):
    """Docstring grid over [start, end] (default [0, Xin-1]); with a box, Xin - 1 = end - start."""
    if end is None:
        end = x_in - 1.0
    length = end - start
    ext = abs(length)
    X = ext + 1.0
    pts = []
    for i in range(x_out):
        if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
            if x_out == 1:
                p = ext / 2 if mode == "ALIGN_CORNERS" else 0.0
            else:
                p = i * ext / (x_out - 1)
        elif mode == "DEFAULT":
            p = i * (X - X / x_out) / (x_out - 1) if x_out > 1 else 0.0
        elif mode == "OFFSET_CORNERS":
            delta = max(1.0, ext) / x_out
            p = 0.5 * delta + i * delta
        else:  # UNALIGN_CORNERS
            sp = X / x_out
            p = i * sp + 0.5 * sp - 0.5
        p = min(ext, max(0.0, p))
        pts.append(start + (p if length >= 0 else -p))
    return np.array(pts)


def nearest_index(mode, x_in, x_out):
    """floor(p + 1/2) of the docstring grid point, in exact rational arithmetic."""
    from fractions import Fraction as Fr
    X, ext = Fr(x_in), Fr(x_in - 1)
    out = []
    for i in range(x_out):
        if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
            p = (ext / 2 if mode == "ALIGN_CORNERS" else Fr(0)) if x_out == 1 else i * ext / (x_out - 1)
        elif mode == "DEFAULT":
            p = i * (X - X / x_out) / (x_out - 1) if x_out > 1 else Fr(0)
        elif mode == "OFFSET_CORNERS":
            delta = max(Fr(1), ext) / x_out
            p = delta / 2 + i * delta
        else:
            sp = X / x_out
            p = i * sp + sp / 2 - Fr(1, 2)
        p = min(ext, max(Fr(0), p))
        out.append(min(int(np.floor(p + Fr(1, 2))), x_in - 1))
    return np.array(out)


def np_bilinear_at(img, y, x, pad=None):
    """img [..., H, W] sampled at (y, x); outside [0, H-1] x [0, W-1] -> pad (or clamp if pad is None)."""
    H, W = img.shape[-2:]
    if pad is not None and not (0 <= y <= H - 1 and 0 <= x <= W - 1):
        return np.full(img.shape[:-2], pad)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * ((1 - fx) * img[..., y0, x0] + fx * img[..., y0, x1])
            + fy * ((1 - fx) * img[..., y1, x0] + fx * img[..., y1, x1]))


def np_resize_bilinear(x, h_out, w_out, mode):
    gh = np_grid(mode, x.shape[-2], h_out)
    gw = np_grid(mode, x.shape[-1], w_out)
    out = np.zeros(x.shape[:-2] + (h_out, w_out))
    for i, y in enumerate(gh):
        for j, xx in enumerate(gw):
            out[..., i, j] = np_bilinear_at(x.astype(np.float64), y, xx)
    return out


# -- torch: upsample_nearest_neighbor ---------------------------------------------------------

@pytest.mark.parametrize("kwargs, shape, target", [
    (dict(scale_factor=2), (1, 2, 3, 4), "iOS15"),
    (dict(scale_factor=(2, 3)), (2, 1, 3, 4), "iOS17"),
    (dict(size=(6, 7)), (1, 2, 4, 5), "iOS15"),       # non-integer ratios, scale (out + 1e-4) / in
    (dict(size=(9, 10)), (1, 1, 6, 4), "iOS17"),
    (dict(scale_factor=1.5), (1, 2, 4, 6), "iOS17"),  # fractional scale, exact output sizes
    (dict(scale_factor=0.5), (1, 2, 8, 6), "iOS15"),  # downsampling
    (dict(size=(3, 2)), (1, 2, 7, 5), "iOS17"),
])
def test_torch_upsample_nearest(kwargs, shape, target):
    torch.manual_seed(0)
    check_torch_op(Fn(lambda x: F.interpolate(x, mode="nearest", **kwargs)), [torch.randn(*shape)],
                   ["upsample_nearest_neighbor"], target=target, rtol=0, atol=0)


def test_torch_nn_upsample_nearest_1d():
    torch.manual_seed(0)
    check_torch_op(nn.Upsample(scale_factor=3, mode="nearest"), [torch.randn(1, 3, 5)],
                   ["upsample_nearest_neighbor"], rtol=0, atol=0)


class DynamicUpsample(nn.Module):
    def forward(self, x):
        a = F.interpolate(x, scale_factor=2, mode="nearest", recompute_scale_factor=True)
        b = F.interpolate(x, scale_factor=2, mode="bilinear", recompute_scale_factor=True)
        return a - b


def test_torch_dynamic_shape_upsample_lowers_torch_dialect_ops():
    """With flexible H/W the frontend emits torch_upsample_* dialect ops; its torch pass rewrites them
    to core upsample ops (or fails the conversion), so no ML Program carries them. The declared
    output dims are symbolic here: the kernels size the output from the scale factors."""
    x = torch.randn(1, 3, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(torch.jit.trace(DynamicUpsample().eval(), x), convert_to="mlprogram",
                        inputs=[ct.TensorType(name="x0", shape=(1, 3, ct.RangeDim(4, 16), ct.RangeDim(4, 16)))],
                        minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT32)
    ops = op_types(ml)
    assert {"upsample_nearest_neighbor", "upsample_bilinear"} <= ops
    assert not any(o.startswith("torch_") for o in ops)
    for shape in ((1, 3, 7, 9), (1, 3, 16, 4)):
        xx = torch.randn(*shape)
        got = next(iter(EmulatedModel(ml).predict({"x0": xx.numpy()}).values()))
        np.testing.assert_allclose(got, DynamicUpsample()(xx).numpy(), rtol=1e-5, atol=1e-5)


# -- torch: upsample_bilinear ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs, shape, target", [
    (dict(scale_factor=2, align_corners=False), (1, 2, 3, 4), "iOS15"),
    (dict(scale_factor=2, align_corners=True), (1, 2, 3, 4), "iOS17"),
    (dict(size=(7, 5), align_corners=True), (1, 2, 4, 3), "iOS15"),
    (dict(size=(7, 5), align_corners=False), (1, 2, 4, 3), "iOS17"),
    (dict(size=(3, 2), align_corners=False), (1, 2, 8, 7), "iOS17"),   # downsampling
    (dict(size=(3, 2), align_corners=True), (1, 2, 8, 7), "iOS15"),
    (dict(scale_factor=(1.5, 2.5), align_corners=True), (2, 1, 4, 4), "iOS17"),
    (dict(scale_factor=(0.5, 1.5), align_corners=False), (1, 1, 6, 4), "iOS16"),
])
def test_torch_upsample_bilinear(kwargs, shape, target):
    torch.manual_seed(0)
    check_torch_op(Fn(lambda x: F.interpolate(x, mode="bilinear", **kwargs)), [torch.randn(*shape)],
                   ["upsample_bilinear"], target=target)


@pytest.mark.parametrize("align_corners", [True, False])
def test_torch_nn_upsample_bilinear_and_linear_1d(align_corners):
    torch.manual_seed(0)
    check_torch_op(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners),
                   [torch.randn(1, 2, 3, 5)], ["upsample_bilinear"])
    check_torch_op(Fn(lambda x: F.interpolate(x, size=9, mode="linear", align_corners=align_corners)),
                   [torch.randn(1, 2, 4)], ["upsample_bilinear"], target="iOS15")


def test_upsample_bilinear_fp16_input_rounding_is_visible():
    """FP16 profiles interpolate FP16-rounded inputs: close to, but not equal to, the FP64 reference."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 5) * 100
    ml = check_torch_op(Fn(lambda v: F.interpolate(v, scale_factor=2, mode="bilinear")), [x],
                        ["upsample_bilinear"], check_fp16=False, atol=1e-4)  # inputs ~100: fp32 ulp
    assert ml is not None
    from opcheck import convert_torch, feeds
    ml16 = convert_torch(Fn(lambda v: F.interpolate(v, scale_factor=2, mode="bilinear")), [x], "fp16")
    got = next(iter(EmulatedModel(ml16, "CPU_AND_NE").predict(feeds([x])).values()))
    want = F.interpolate(x.double(), scale_factor=2, mode="bilinear").numpy()
    err = np.max(np.abs(got.astype(np.float64) - want))
    assert got.dtype == np.float16 and 0 < err < 0.5


# -- torch: resample / affine ---------------------------------------------------------------

def _grid_away_from_half(rng, n, ho, wo, h, w, align):
    """Normalized grid whose pixel positions stay >= 0.2 px from any x.5 (nearest stays unambiguous
    under FP16 rounding of the coordinates); some points fall outside the image."""
    px = rng.integers(-2, w + 2, size=(n, ho, wo)) + rng.uniform(-0.3, 0.3, size=(n, ho, wo))
    py = rng.integers(-2, h + 2, size=(n, ho, wo)) + rng.uniform(-0.3, 0.3, size=(n, ho, wo))
    if align:
        gx, gy = px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1
    else:
        gx, gy = (2 * px + 1) / w - 1, (2 * py + 1) / h - 1
    return torch.tensor(np.stack([gx, gy], -1), dtype=torch.float32)


@pytest.mark.parametrize("mode, padding_mode, align_corners, target", [
    ("bilinear", "zeros", False, "iOS15"),
    ("bilinear", "zeros", True, "iOS17"),
    ("bilinear", "border", False, "iOS16"),
    ("bilinear", "reflection", True, "iOS17"),
    ("bilinear", "reflection", False, "iOS17"),  # -> MIL padding_mode "symmetric"
    ("nearest", "zeros", True, "iOS15"),
    ("nearest", "border", False, "iOS17"),
    ("nearest", "reflection", False, "iOS17"),
])
def test_torch_grid_sample(mode, padding_mode, align_corners, target):
    rng = np.random.default_rng(1)
    x = torch.tensor(_img(2, 3, 4, 5))
    g = _grid_away_from_half(rng, 2, 3, 4, 4, 5, align_corners)
    ml = check_torch_op(
        Fn(lambda a, b: F.grid_sample(a, b, mode=mode, padding_mode=padding_mode, align_corners=align_corners)),
        [x, g], ["resample"], target=target)
    (op,) = [o for o in ml._mil_program.functions["main"].operations if o.op_type == "resample"]
    want_pad = {"zeros": "constant", "border": "border"}.get(
        padding_mode, "reflection" if align_corners else "symmetric")
    assert op.padding_mode.val == want_pad


class AffineSample(nn.Module):
    def __init__(self, out_size, align_corners):
        super().__init__()
        self.register_buffer("theta", torch.tensor([[[0.9, 0.2, 0.1], [-0.15, 1.2, -0.05]],
                                                    [[1.3, -0.4, 0.3], [0.25, 0.8, 0.2]]]))
        self.out_size, self.align = out_size, align_corners

    def forward(self, x):
        grid = F.affine_grid(self.theta, self.out_size, align_corners=self.align)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=self.align)


@pytest.mark.parametrize("align_corners, out_size, target", [
    (True, (2, 3, 3, 4), "iOS15"),
    (False, (2, 3, 5, 3), "iOS17"),
])
def test_torch_affine_grid_sample(align_corners, out_size, target):
    check_torch_op(AffineSample(out_size, align_corners), [torch.tensor(_img(2, 3, 4, 5))], ["affine"],
                   target=target)


# -- MIL builder: resize_bilinear / upsample_bilinear / resize_nearest_neighbor ---------------

MODES = ["STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS"]


def test_grid_reference_matches_docstring_examples():
    """The numpy reference reproduces the grid tables printed in the resize_bilinear docstring."""
    ex5 = {"UNALIGN_CORNERS": [0, .1, .5, .9, 1], "ALIGN_CORNERS": [0, .25, .5, .75, 1],
           "DEFAULT": [0, .4, .8, 1, 1], "OFFSET_CORNERS": [.1, .3, .5, .7, .9]}
    ex6 = {"UNALIGN_CORNERS": [0, 0, 1 / 3, 2 / 3, 1, 1], "ALIGN_CORNERS": [0, .2, .4, .6, .8, 1],
           "DEFAULT": [0, 1 / 3, 2 / 3, 1, 1, 1], "OFFSET_CORNERS": [1 / 12, .25, 5 / 12, 7 / 12, .75, 11 / 12]}
    for table, n in ((ex5, 5), (ex6, 6)):
        for mode, want in table.items():
            np.testing.assert_allclose(np_grid(mode, 2, n), want, atol=1e-12, err_msg=mode)
            np.testing.assert_allclose(resize_ops._grid(mode, 1.0, n).numpy(), want, atol=1e-12, err_msg=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hw_out, target", [((7, 3), ct.target.iOS15), ((1, 5), ct.target.iOS17)])
def test_mil_resize_bilinear(mode, hw_out, target):
    x = _img(2, 3, 4, 6)
    want = np_resize_bilinear(x, *hw_out, mode)
    check_mil(lambda v: mb.resize_bilinear(x=v, target_size_height=hw_out[0], target_size_width=hw_out[1],
                                           sampling_mode=mode),
              {"x": x}, [want], target, "resize_bilinear", fp16=target >= ct.target.iOS16)


@pytest.mark.parametrize("align, half_pixel, mode", [
    (True, None, "STRICT_ALIGN_CORNERS"),
    (False, None, "UNALIGN_CORNERS"),
    (False, True, "UNALIGN_CORNERS"),
    (False, False, "DEFAULT"),
])
def test_mil_upsample_bilinear_half_pixel_centers_ios16(align, half_pixel, mode):
    x = _img(1, 2, 3, 4)
    want = np_resize_bilinear(x, 6, 10, mode)  # scale 2 and 2.5
    kw = {} if half_pixel is None else dict(half_pixel_centers=half_pixel)
    check_mil(lambda v: mb.upsample_bilinear(x=v, scale_factor_height=2.0, scale_factor_width=2.5,
                                             align_corners=align, **kw),
              {"x": x}, [want], ct.target.iOS16, "upsample_bilinear")


def test_mil_upsample_bilinear_rank3_and_defaults():
    """Default align_corners=True; rank-3 input; scale 1 on one axis is the identity."""
    x = _img(3, 4, 5)
    want = np_resize_bilinear(x, 4, 15, "STRICT_ALIGN_CORNERS")
    check_mil(lambda v: mb.upsample_bilinear(x=v, scale_factor_width=3), {"x": x}, [want],
              ct.target.iOS15, "upsample_bilinear", fp16=False)
    np.testing.assert_allclose(want[..., ::7], x[..., [0, 2, 4]], atol=1e-6)


@pytest.mark.parametrize("hw_out", [(5, 3), (2, 9), (1, 1)])
def test_mil_resize_nearest_neighbor(hw_out):
    x = _img(2, 3, 4, 6)
    ih = [min(int(np.floor((i + 0.5) * 4 / hw_out[0])), 3) for i in range(hw_out[0])]
    iw = [min(int(np.floor((j + 0.5) * 6 / hw_out[1])), 5) for j in range(hw_out[1])]
    want = x[..., ih, :][..., iw]
    check_mil(lambda v: mb.resize_nearest_neighbor(x=v, target_size_height=hw_out[0], target_size_width=hw_out[1]),
              {"x": x}, [want], ct.target.iOS15, "resize_nearest_neighbor", rtol=0, atol=0, fp16=False)


def test_mil_upsample_nearest_fractional_scales():
    """coremltools' device test values for fractional nearest scales (iOS15 test_image_resizing)."""
    x = np.array([1.5, -2.5, 3.5], dtype=np.float32).reshape(1, 1, 1, 3)
    want = [x, np.array([1.5, -2.5] * 3, np.float32).reshape(1, 1, 3, 2),
            np.array([1.5, -2.5, 3.5] * 2, np.float32).reshape(1, 1, 2, 3)]
    check_mil(lambda v: [mb.upsample_nearest_neighbor(x=v, scale_factor_height=1.0, scale_factor_width=1.0),
                         mb.upsample_nearest_neighbor(x=v, scale_factor_height=3.17, scale_factor_width=0.67),
                         mb.upsample_nearest_neighbor(x=v, scale_factor_height=2.0, scale_factor_width=1.12)],
              {"x": x}, want, ct.target.iOS15, "upsample_nearest_neighbor", rtol=0, atol=0, fp16=False)


# -- MIL builder: iOS17 resize ----------------------------------------------------------------

def test_mil_resize_device_examples():
    """coremltools' device test values for iOS17 resize (NEAREST_NEIGHBOR and LINEAR, DEFAULT mode)."""
    xn = np.array([-6.174, 9.371], dtype=np.float32).reshape(1, 1, 1, 2, 1)
    want_n = np.array([-6.174, -6.174, 9.371, 9.371, 9.371, 9.371], np.float32).reshape(1, 1, 1, 3, 2)
    check_mil(lambda v: mb.resize(x=v, shape=[1, 1, 3, 2], resized_dims=np.uint32(2),
                                  interpolation_mode="NEAREST_NEIGHBOR", sampling_mode="DEFAULT"),
              {"x": xn}, [want_n], ct.target.iOS17, "resize", rtol=0, atol=0, fp16=False)
    xl = np.array([0, 1], dtype=np.float32).reshape(1, 1, 2)
    check_mil(lambda v: mb.resize(x=v, shape=[1, 1, 5], resized_dims=np.uint32(2), interpolation_mode="LINEAR"),
              {"x": xl}, [np.array([0, .4, .8, 1, 1], np.float32).reshape(1, 1, 5)], ct.target.iOS17, "resize",
              fp16=False)


@pytest.mark.parametrize("mode", MODES)
def test_mil_resize_linear_matches_resize_bilinear(mode):
    x = _img(2, 3, 4, 6)
    want = np_resize_bilinear(x, 5, 4, mode)
    check_mil(lambda v: mb.resize(x=v, shape=[0, 5, 4], resized_dims=np.uint32(2), interpolation_mode="LINEAR",
                                  sampling_mode=mode),
              {"x": x}, [want], ct.target.iOS17, "resize")


@pytest.mark.parametrize("mode", ["DEFAULT", "UNALIGN_CORNERS", "ALIGN_CORNERS"])
def test_mil_resize_nearest_modes_and_three_dims(mode):
    x = _img(2, 3, 4, 6)
    sizes = (5, 2, 9)  # dims 1, 2, 3 resized; shape has a leading entry that is ignored
    want = x
    for axis, n in zip((1, 2, 3), sizes):
        want = np.take(want, nearest_index(mode, x.shape[axis], n), axis=axis)
    check_mil(lambda v: mb.resize(x=v, shape=[7, *sizes], resized_dims=np.uint32(3),
                                  interpolation_mode="NEAREST_NEIGHBOR", sampling_mode=mode),
              {"x": x}, [want], ct.target.iOS17, "resize", rtol=0, atol=0)
    if mode == "UNALIGN_CORNERS":  # the same picks as resize_nearest_neighbor (half-pixel centres)
        for x_in, n in ((3, 5), (4, 2), (6, 9)):
            half_pixel = [min(((2 * i + 1) * x_in) // (2 * n), x_in - 1) for i in range(n)]
            np.testing.assert_array_equal(nearest_index(mode, x_in, n), half_pixel)


def test_mil_resize_dynamic_shape_and_int32():
    x = _img(1, 2, 3)
    shape = np.array([4, 5], dtype=np.int32)
    want = np_resize_bilinear(x[None], 4, 5, "ALIGN_CORNERS")[0]
    check_mil(lambda v, s: mb.resize(x=v, shape=s, resized_dims=np.uint32(2), sampling_mode="ALIGN_CORNERS"),
              {"x": x, "shape": shape}, [want], ct.target.iOS17, "resize", fp16=False)
    xi = np.arange(12, dtype=np.int32).reshape(1, 3, 4)
    idx = nearest_index("DEFAULT", 4, 7)
    check_mil(lambda v: mb.resize(x=v, shape=[7], resized_dims=np.uint32(1), interpolation_mode="NEAREST_NEIGHBOR"),
              {"x": xi}, [xi[..., idx]], ct.target.iOS17, "resize", rtol=0, atol=0, fp16=False)


# -- MIL builder: crop ----------------------------------------------------------------------

@pytest.mark.parametrize("ch, cw, target", [([0, 1], [1, 1], ct.target.iOS15), ([2, 0], [0, 3], ct.target.iOS17)])
def test_mil_crop(ch, cw, target):
    x = _img(2, 3, 5, 6)
    want = x[..., ch[0]:5 - ch[1], cw[0]:6 - cw[1]]
    check_mil(lambda v: mb.crop(x=v, crop_height=ch, crop_width=cw), {"x": x}, [want], target, "crop",
              rtol=0, atol=0)


# -- MIL builder: crop_resize -----------------------------------------------------------------

def np_crop_resize(x, boxes, bidx, th, tw, mode, box_mode, normalized, spatial_scale, pad):
    """[N, C, th, tw] from boxes [N, 4] on images bidx."""
    H, W = x.shape[-2:]
    out = np.zeros((len(boxes), x.shape[1], th, tw))
    for n, (box, b) in enumerate(zip(boxes.astype(np.float64) * spatial_scale, bidx)):
        if box_mode == "CORNERS_HEIGHT_FIRST":
            h0, w0, h1, w1 = box
        elif box_mode == "CORNERS_WIDTH_FIRST":
            w0, h0, w1, h1 = box
        elif box_mode == "CENTER_SIZE_HEIGHT_FIRST":
            hc, wc, bh, bw = box
            h0, h1, w0, w1 = hc - bh / 2, hc + bh / 2, wc - bw / 2, wc + bw / 2
        else:
            wc, hc, bw, bh = box
            h0, h1, w0, w1 = hc - bh / 2, hc + bh / 2, wc - bw / 2, wc + bw / 2
        if normalized:
            h0, h1, w0, w1 = h0 * (H - 1), h1 * (H - 1), w0 * (W - 1), w1 * (W - 1)
        for i, y in enumerate(np_grid(mode, None, th, h0, h1)):
            for j, xx in enumerate(np_grid(mode, None, tw, w0, w1)):
                out[n, :, i, j] = np_bilinear_at(x[b].astype(np.float64), y, xx, pad=pad)
    return out


def test_mil_crop_resize_device_examples_ios15_and_ios17():
    """coremltools' device test values (iOS14 and iOS17 test_image_resizing)."""
    x = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    roi = np.array([1, 1, 2, 2], np.float32).reshape(1, 1, 4, 1, 1)
    cases = [
        (roi, 2, False, [6, 7, 10, 11]),
        (roi, 1, False, [8.5]),
        (np.array([0, 0, 0, 1 / 3, 1 / 3], np.float32).reshape(1, 1, 5, 1, 1), 2, True, [1, 2, 5, 6]),
        (np.array([2, 2, 1, 1], np.float32).reshape(1, 1, 4, 1, 1), 2, False, [11, 10, 7, 6]),
    ]
    for r, t, norm, want in cases:
        check_mil(lambda v: mb.crop_resize(x=v, roi=r, target_height=t, target_width=t, normalized_coordinates=norm,
                                           sampling_mode="ALIGN_CORNERS"),
                  {"x": x}, [np.array(want, np.float32).reshape(1, 1, 1, t, t)], ct.target.iOS15, "crop_resize",
                  fp16=False)
    boxes = np.array([[0.1, 0.3, 1.3, 1.0], [0.5, 1.8, 1.0, 0.3], [0.0, 0.4, 0.6, 0.7]], np.float32)
    want = np.array([3.1, 5.2, 10, 10, 10, 7.9, 10, 13.9, 2.2, 3.1, 9.4, 10.3], np.float32).reshape(3, 1, 2, 2)
    check_mil(lambda v: mb.crop_resize(x=v, boxes=boxes, box_indices=np.zeros(3, np.int32), target_height=2,
                                       target_width=2, normalized_coordinates=True, sampling_mode="ALIGN_CORNERS",
                                       pad_value=10.0),
              {"x": x}, [want], ct.target.iOS17, "crop_resize")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("box_mode", ["CORNERS_HEIGHT_FIRST", "CENTER_SIZE_WIDTH_FIRST"])
def test_mil_crop_resize_ios17_modes(mode, box_mode):
    x = _img(2, 3, 6, 7)
    if box_mode == "CORNERS_HEIGHT_FIRST":
        boxes = np.array([[0.5, 1.0, 4.2, 5.5], [4.0, 5.0, 1.0, 0.5], [1.0, 2.0, 1.5, 6.0]], np.float32)
    else:
        boxes = np.array([[3.0, 2.5, 4.0, 3.0], [2.0, 4.0, 1.0, 2.2], [5.5, 1.0, 3.0, 2.0]], np.float32)
    bidx = np.array([1, 0, 1], np.int32)
    want = np_crop_resize(x, boxes, bidx, 3, 4, mode, box_mode, False, 1.0, -2.0)
    check_mil(lambda v: mb.crop_resize(x=v, boxes=boxes, box_indices=bidx, target_height=3, target_width=4,
                                       box_coordinate_mode=box_mode, sampling_mode=mode, pad_value=-2.0),
              {"x": x}, [want], ct.target.iOS17, "crop_resize")


def test_mil_crop_resize_ios17_dynamic_boxes_default_indices_spatial_scale():
    x = _img(2, 2, 5, 5)
    boxes = np.array([[0.0, 0.0, 8.0, 6.0], [2.0, 2.0, 10.0, 4.0]], np.float32)  # scaled by 0.5
    want = np_crop_resize(x, boxes, [0, 1], 3, 3, "OFFSET_CORNERS", "CORNERS_WIDTH_FIRST", False, 0.5, 0.0)
    check_mil(lambda v, b: mb.crop_resize(x=v, boxes=b, target_height=3, target_width=3, spatial_scale=0.5,
                                          box_coordinate_mode="CORNERS_WIDTH_FIRST", sampling_mode="OFFSET_CORNERS"),
              {"x": x, "boxes": boxes}, [want], ct.target.iOS17, "crop_resize")


@pytest.mark.parametrize("target", [ct.target.iOS15, ct.target.iOS16])
def test_mil_crop_resize_roi_ios15_ios16(target):
    """roi [N,1,4,1,1]: every box on every image -> [N, B, C, h, w]; roi [N,1,5,1,1]: indexed -> [N, 1, C, h, w]."""
    x = _img(2, 3, 5, 6)
    boxes = np.array([[0.1, 0.2, 0.9, 0.7], [0.5, 0.0, 1.2, 1.0]], np.float32)  # normalized; 2nd leaves the image
    pad = 1.5 if target == ct.target.iOS16 else 0.0
    kw = dict(pad_value=pad) if target == ct.target.iOS16 else {}
    roi4 = boxes.reshape(2, 1, 4, 1, 1)
    want4 = np.stack([np_crop_resize(x, np.repeat(boxes[n:n + 1], 2, 0), [0, 1], 4, 3, "DEFAULT",
                                     "CORNERS_HEIGHT_FIRST", True, 1.0, pad) for n in range(2)])
    roi5 = np.concatenate([np.array([[1], [0]], np.float32), boxes], 1).reshape(2, 1, 5, 1, 1)
    want5 = np_crop_resize(x, boxes, [1, 0], 4, 3, "DEFAULT", "CORNERS_HEIGHT_FIRST", True, 1.0, pad)[:, None]
    for roi, want in ((roi4, want4), (roi5, want5)):
        check_mil(lambda v, r: mb.crop_resize(x=v, roi=r, target_height=4, target_width=3,
                                              normalized_coordinates=True, **kw),
                  {"x": x, "roi": roi}, [want], target, "crop_resize", fp16=target >= ct.target.iOS16)


# -- MIL builder: resample / affine -----------------------------------------------------------

def test_mil_resample_device_examples():
    """coremltools' device test values (iOS15 test_image_resizing) for the four mode combinations."""
    x = np.array([11.0, 22.0, 33.0, 44.0], dtype=np.float32).reshape(1, 1, 2, 2)
    c = np.array([-1.0, -2.0, -3.7, -1.0, 0.0, 0.0, 3.5, 1.2], np.float32).reshape(1, 2, 2, 2)
    cases = [
        (("bilinear", "constant", 6.17, "normalized_minus_one_to_one", True), [8.585, 6.17, 27.5, 6.17]),
        (("nearest", "border", -1.0, "unnormalized", False), [11, 11, 11, 44]),
        (("bilinear", "reflection", -1.0, "normalized_zero_to_one", True), [22, 36.3, 11, 34.1]),
        (("nearest", "symmetric", -1.0, "normalized_zero_to_one", False), [22, 33, 11, 33]),
    ]
    for (sm, pm, pv, cm, ac), want in cases:
        check_mil(lambda v, cc: mb.resample(x=v, coordinates=cc, sampling_mode=sm, padding_mode=pm, padding_value=pv,
                                            coordinates_mode=cm, align_corners=ac),
                  {"x": x, "c": c}, [np.array(want, np.float32).reshape(1, 1, 2, 2)], ct.target.iOS15, "resample",
                  fp16=False)
    ci = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int32).reshape(1, 2, 2, 2)  # int32 coordinates
    check_mil(lambda v, cc: mb.resample(x=v, coordinates=cc, sampling_mode="bilinear", padding_mode="constant",
                                        padding_value=6.17, coordinates_mode="normalized_minus_one_to_one",
                                        align_corners=True),
              {"x": x, "c": ci}, [np.array([27.5, 44, 27.5, 44], np.float32).reshape(1, 1, 2, 2)],
              ct.target.iOS15, "resample", fp16=False)


def _np_pad_index(i, n, mode):
    if mode == "border" or n == 1:
        return min(max(i, 0), n - 1)
    if mode == "reflection":
        period = 2 * (n - 1)
        m = i % period
        return period - m if m >= n else m
    m = i % (2 * n)
    return 2 * n - 1 - m if m >= n else m


def np_resample(x, px, py, sampling, padding, pad):
    B, C, H, W = x.shape
    out = np.zeros((B, C) + px.shape[1:])

    def val(b, iy, ix):
        if padding == "constant" and not (0 <= iy < H and 0 <= ix < W):
            return np.full(C, pad)
        if padding == "constant":
            return x[b, :, iy, ix]
        return x[b, :, _np_pad_index(iy, H, padding), _np_pad_index(ix, W, padding)]

    for b in range(B):
        for i in range(px.shape[1]):
            for j in range(px.shape[2]):
                X, Y = px[b, i, j], py[b, i, j]
                if sampling == "nearest":
                    out[b, :, i, j] = val(b, int(np.floor(Y + 0.5)), int(np.floor(X + 0.5)))
                    continue
                x0, y0 = int(np.floor(X)), int(np.floor(Y))
                fx, fy = X - x0, Y - y0
                out[b, :, i, j] = ((1 - fy) * ((1 - fx) * val(b, y0, x0) + fx * val(b, y0, x0 + 1))
                                   + fy * ((1 - fx) * val(b, y0 + 1, x0) + fx * val(b, y0 + 1, x0 + 1)))
    return out


@pytest.mark.parametrize("sampling", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", ["constant", "border", "reflection", "symmetric"])
def test_mil_resample_unnormalized_padding_modes(sampling, padding):
    rng = np.random.default_rng(2)
    x = _img(2, 3, 4, 5)
    px = rng.integers(-7, 12, size=(2, 3, 4)) + rng.uniform(-0.3, 0.3, size=(2, 3, 4))
    py = rng.integers(-6, 10, size=(2, 3, 4)) + rng.uniform(-0.3, 0.3, size=(2, 3, 4))
    coords = np.stack([px, py], -1).astype(np.float32)
    want = np_resample(x, coords[..., 0].astype(np.float64), coords[..., 1].astype(np.float64), sampling, padding, 0.7)
    check_mil(lambda v, c: mb.resample(x=v, coordinates=c, sampling_mode=sampling, padding_mode=padding,
                                       padding_value=0.7, coordinates_mode="unnormalized", align_corners=False),
              {"x": x, "c": coords}, [want], ct.target.iOS17, "resample")


@pytest.mark.parametrize("align", [True, False])
def test_mil_affine_matches_numpy(align):
    x = _img(2, 2, 4, 5)
    m = np.array([[0.8, -0.3, 0.1, 0.2, 1.1, -0.2], [1.2, 0.1, -0.3, -0.4, 0.9, 0.25]], np.float32)
    ho, wo = 3, 6
    gx = np.linspace(-1, 1, wo) if align else (2 * np.arange(wo) + 1) / wo - 1
    gy = np.linspace(-1, 1, ho) if align else (2 * np.arange(ho) + 1) / ho - 1
    GX, GY = np.meshgrid(gx, gy)
    m64 = m.astype(np.float64)
    xs = m64[:, 0, None, None] * GX + m64[:, 1, None, None] * GY + m64[:, 2, None, None]
    ys = m64[:, 3, None, None] * GX + m64[:, 4, None, None] * GY + m64[:, 5, None, None]
    to_px = (lambda c, n: (c + 1) / 2 * (n - 1)) if align else (lambda c, n: ((c + 1) * n - 1) / 2)
    want = np_resample(x, to_px(xs, 5), to_px(ys, 4), "bilinear", "constant", 0.0)
    check_mil(lambda v, t: mb.affine(x=v, transform_matrix=t, output_height=ho, output_width=wo,
                                     sampling_mode="bilinear", padding_mode="constant", padding_value=0.0,
                                     coordinates_mode="normalized_minus_one_to_one", align_corners=align),
              {"x": x, "t": m}, [want], ct.target.iOS17, "affine")


# -- validation ------------------------------------------------------------------------------

def test_bad_modes_raise_value_error_naming_input():
    with pytest.raises(ValueError, match="resize_bilinear input 'sampling_mode' is 'BILINEAR'.*UNALIGN_CORNERS"):
        resize_ops._choice(FakeOpCall("resize_bilinear", sampling_mode="BILINEAR"), "sampling_mode",
                           resize_ops._SAMPLING_MODES)
    with pytest.raises(ValueError, match="resample input 'padding_mode' is 'wrap'"):
        resize_ops._choice(FakeOpCall("resample", padding_mode="wrap"), "padding_mode",
                           resample_ops._PADDING_MODES, lower=True)
    assert resize_ops._choice(FakeOpCall("affine", sampling_mode="Bilinear"), "sampling_mode",
                              ("bilinear", "nearest"), lower=True) == "bilinear"
