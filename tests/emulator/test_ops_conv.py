"""Emulator kernels of the conv family: conv, conv_transpose, conv_quantized."""

from __future__ import annotations

import math

import coremltools as ct
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from opcheck import (
    check_torch_op,
    convert_program,
    fp16_accumulation_runs,
    mil_ops,
    op_types,
    predict_one,
    require_kernels,
)

from coreml_lab.emulator import EmulatedModel

# ----------------------------------------------------------------------------- numpy references


def np_conv(x, w, b, strides, pads, dilations, groups):
    """Direct N-d convolution in float64; ``pads`` = [(before, after)] per spatial dim."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    nd = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in pads])
    ks = w.shape[2:]
    outs = [(xp.shape[2 + i] - (ks[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)]
    n, c = x.shape[:2]
    oc = w.shape[0]
    icg, ocg = c // groups, oc // groups
    out = np.zeros((n, oc, *outs))
    for kidx in np.ndindex(*ks):
        sl = tuple(slice(k * d, k * d + (o - 1) * s + 1, s) for k, d, o, s in zip(kidx, dilations, outs, strides))
        patch = xp[(slice(None), slice(None)) + sl]
        for g in range(groups):
            wk = w[(slice(g * ocg, (g + 1) * ocg), slice(None)) + kidx]
            out[:, g * ocg:(g + 1) * ocg] += np.einsum("nc...,oc->no...", patch[:, g * icg:(g + 1) * icg], wk)
    if b is not None:
        out += b.reshape(1, -1, *([1] * nd))
    return out


def np_conv_transpose(x, w, b, strides, dilations, groups, crop_start, out_sizes):
    """Transposed convolution by scattering every input element (float64), then crop / zero-extend."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    nd = x.ndim - 2
    n, cin = x.shape[:2]
    ks = w.shape[2:]
    ocg = w.shape[1]
    icg = cin // groups
    full = [(d - 1) * s + (k - 1) * dl + 1 for d, s, k, dl in zip(x.shape[2:], strides, ks, dilations)]
    y = np.zeros((n, ocg * groups, *full))
    for kidx in np.ndindex(*ks):
        sl = tuple(slice(k * dl, k * dl + (d - 1) * s + 1, s)
                   for k, dl, d, s in zip(kidx, dilations, x.shape[2:], strides))
        for g in range(groups):
            wk = w[(slice(g * icg, (g + 1) * icg), slice(None)) + kidx]
            y[(slice(None), slice(g * ocg, (g + 1) * ocg)) + sl] += np.einsum(
                "nc...,co->no...", x[:, g * icg:(g + 1) * icg], wk)
    out = np.zeros((n, ocg * groups, *out_sizes))
    src = tuple(slice(st, min(st + o, f)) for st, o, f in zip(crop_start, out_sizes, full))
    dst = tuple(slice(0, min(st + o, f) - st) for st, o, f in zip(crop_start, out_sizes, full))
    out[(slice(None), slice(None)) + dst] = y[(slice(None), slice(None)) + src]
    if b is not None:
        out += b.reshape(1, -1, *([1] * nd))
    return out


# ----------------------------------------------------------------------------- conv from torch


CONV_CASES = [
    # (module factory, input shape)
    (lambda: torch.nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    (lambda: torch.nn.Conv1d(4, 6, 3, groups=2, dilation=2, bias=False), (1, 4, 12)),
    (lambda: torch.nn.Conv1d(4, 6, 4, padding="same"), (1, 4, 10)),                     # even kernel: extra pad after
    (lambda: torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), (1, 3, 9, 10)),
    (lambda: torch.nn.Conv2d(4, 4, 3, groups=4, dilation=2, padding=(1, 2)), (2, 4, 9, 9)),  # depthwise
    (lambda: torch.nn.Conv2d(4, 6, (2, 4), padding="same", dilation=(1, 3)), (1, 4, 8, 9)),
    (lambda: torch.nn.Conv2d(4, 6, (3, 1), stride=(1, 3), groups=2), (1, 4, 7, 10)),
    (lambda: torch.nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1), (1, 2, 5, 6, 7)),
    (lambda: torch.nn.Conv3d(4, 4, (2, 3, 2), padding="same", groups=2), (1, 4, 4, 5, 6)),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_torch(case):
    torch.manual_seed(case)
    factory, shape = CONV_CASES[case]
    check_torch_op(factory(), [torch.randn(*shape)], ["conv"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_conv_targets(target):
    torch.manual_seed(10)
    check_torch_op(torch.nn.Conv2d(3, 5, 3, padding=1, stride=2), [torch.randn(1, 3, 8, 8)], ["conv"], target=target)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_conv_padding_mode(mode):
    require_kernels("pad")
    torch.manual_seed(11)
    check_torch_op(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), [torch.randn(1, 3, 6, 7)], ["conv", "pad"])


class DynamicConv(torch.nn.Module):
    def forward(self, x, w):
        return F.conv2d(x, w, stride=2, padding=1, groups=2)


def test_conv_dynamic_weight():
    torch.manual_seed(12)
    ml = check_torch_op(DynamicConv(), [torch.randn(1, 4, 8, 8), torch.randn(6, 2, 3, 3)], ["conv"])
    (op,) = mil_ops(ml, "conv")
    assert op.weight.op is None or op.weight.op.op_type != "const"


# ----------------------------------------------------------------------------- conv from MIL: pad types


def _conv_prog(x_shape, w, target, **kw):
    @mb.program(input_specs=[mb.TensorSpec(shape=x_shape)], opset_version=target)
    def prog(x):
        return mb.conv(x=x, weight=w, **kw)
    return convert_program(prog, target)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_same_vs_same_lower(nd):
    """same puts the odd extra pad after (torch padding='same'); same_lower before (the flipped problem)."""
    rng = np.random.default_rng(nd)
    x = rng.standard_normal((1, 2, 5, 6, 7)[:2 + nd]).astype(np.float32)
    w = rng.standard_normal((3, 2, 4, 2, 4)[:2 + nd]).astype(np.float32)  # even kernels
    flip = tuple(range(2, 2 + nd))
    same = predict_one(_conv_prog(x.shape, w, ct.target.iOS17, pad_type="same"), {"x": x})
    lower = predict_one(_conv_prog(x.shape, w, ct.target.iOS17, pad_type="same_lower"), {"x": x})
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    tx, tw = torch.from_numpy(x).double(), torch.from_numpy(w).double()
    want_same = fn(tx, tw, padding="same").numpy()
    want_lower = fn(tx.flip(flip), tw.flip(flip), padding="same").flip(flip).numpy()
    assert same.shape == x.shape[:1] + (3,) + x.shape[2:]
    np.testing.assert_allclose(same, want_same, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lower, want_lower, rtol=1e-5, atol=1e-5)
    assert not np.allclose(same, lower)


@pytest.mark.parametrize("pad_type, target", [("same", ct.target.iOS15), ("same", ct.target.iOS17),
                                               ("same_lower", ct.target.iOS17), ("custom", ct.target.iOS15),
                                               ("valid", ct.target.iOS17)])
def test_conv_pad_types_strided(pad_type, target):
    """Strided 2-d conv, dilation, groups and bias against a numpy reference from the docstring."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 9, 10)).astype(np.float32)
    w = rng.standard_normal((6, 2, 2, 3)).astype(np.float32)
    b = rng.standard_normal((6,)).astype(np.float32)
    strides, dilations = [2, 3], [2, 1]
    kw = dict(bias=b, strides=strides, dilations=dilations, groups=2, pad_type=pad_type)
    if pad_type == "custom":
        kw["pad"] = [1, 0, 2, 3]
        pads = [(1, 0), (2, 3)]
    elif pad_type == "valid":
        pads = [(0, 0), (0, 0)]
    else:
        pads = []
        for d, k, s, dl in zip(x.shape[2:], w.shape[2:], strides, dilations):
            total = max(0, (math.ceil(d / s) - 1) * s + (k - 1) * dl + 1 - d)
            lo, hi = total // 2, total - total // 2
            pads.append((lo, hi) if pad_type == "same" else (hi, lo))
    got = predict_one(_conv_prog(x.shape, w, target, **kw), {"x": x})
    want = np_conv(x, w, b, strides, pads, dilations, 2)
    if pad_type.startswith("same"):
        assert got.shape[2:] == tuple(math.ceil(d / s) for d, s in zip(x.shape[2:], strides))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- conv_transpose from torch


CONVT_CASES = [
    (lambda: torch.nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 7), []),
    (lambda: torch.nn.ConvTranspose1d(4, 6, 4, stride=3, padding=2, groups=2, dilation=2), (1, 4, 6), []),
    (lambda: torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), (1, 4, 5, 6), []),
    (lambda: torch.nn.ConvTranspose2d(4, 4, (2, 3), stride=(1, 2), padding=(0, 1), groups=4, bias=False),
     (1, 4, 5, 5), []),
    (lambda: torch.nn.ConvTranspose3d(2, 4, 3, stride=2, padding=1), (1, 2, 3, 4, 4), []),
    (lambda: torch.nn.ConvTranspose3d(4, 2, 2, stride=(1, 2, 1), groups=2), (1, 4, 3, 3, 4), []),
    # output_padding: converted to conv_transpose + a crop (slice_by_index for 1-d, crop for 2-d)
    (lambda: torch.nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), (1, 3, 6),
     ["slice_by_index"]),
    (lambda: torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=2, output_padding=(1, 0)), (1, 3, 5, 6),
     ["crop"]),
]


@pytest.mark.parametrize("case", range(len(CONVT_CASES)))
def test_conv_transpose_torch(case):
    factory, shape, other_ops = CONVT_CASES[case]
    require_kernels(*other_ops)
    torch.manual_seed(case)
    check_torch_op(factory(), [torch.randn(*shape)], ["conv_transpose"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_conv_transpose_targets(target):
    torch.manual_seed(20)
    check_torch_op(torch.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1), [torch.randn(1, 3, 4, 4)],
                   ["conv_transpose"], target=target)


@pytest.mark.parametrize("pad_type, output_shape", [
    ("valid", None), ("custom", None), ("same", None), ("same", (1, 4, 9, 12)), ("valid", (1, 4, 12, 15)),
    ("custom", (1, 4, 10, 10)),
])
def test_conv_transpose_mil(pad_type, output_shape):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 2, 3, 4)).astype(np.float32)  # [C_in, C_out / groups, K]
    b = rng.standard_normal((4,)).astype(np.float32)
    strides, dilations, groups = [2, 2], [1, 1], 2
    kw = dict(weight=w, bias=b, strides=strides, dilations=dilations, groups=groups, pad_type=pad_type)
    pad = [1, 2, 0, 1]
    if pad_type == "custom":
        kw["pad"] = pad
    if output_shape is not None:
        kw["output_shape"] = list(output_shape)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.conv_transpose(x=x, **kw)

    ml = convert_program(prog, ct.target.iOS17)
    declared = tuple(ml._mil_program.functions["main"].outputs[0].shape)
    got = predict_one(ml, {"x": x})
    assert got.shape == declared
    full = [(d - 1) * s + k for d, s, k in zip(x.shape[2:], strides, w.shape[2:])]
    if output_shape is not None:
        outs = list(output_shape[2:])
    elif pad_type == "valid":
        outs = full
    elif pad_type == "custom":
        outs = [full[0] - pad[0] - pad[1], full[1] - pad[2] - pad[3]]
    else:
        outs = [d * s for d, s in zip(x.shape[2:], strides)]
    if pad_type == "custom":
        starts = [pad[0], pad[2]]
    elif pad_type == "same":
        starts = [max(f - o, 0) // 2 for f, o in zip(full, outs)]
    else:
        starts = [0, 0]
    want = np_conv_transpose(x, w, b, strides, dilations, groups, starts, outs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- conv_quantized


@pytest.mark.parametrize("per_channel", [False, True])
def test_conv_quantized_linear(per_channel):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 3, 7, 7)).astype(np.float32)
    wq = rng.integers(0, 256, size=(4, 3, 3, 3)).astype(np.uint8)
    if per_channel:
        scale = np.array([0.01, 0.02, 0.005, 0.03], dtype=np.float32)
        qbias = np.array([-1.0, -2.5, 0.5, -3.0], dtype=np.float32)
    else:
        scale, qbias = np.float32(0.01), np.float32(-1.2)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.conv_quantized(x=x, weight=wq, quantization_type="linear", nbits=8, quant_scale=scale,
                                 quant_bias=qbias, strides=[2, 2], pad_type="same")

    ml = convert_program(prog, ct.target.iOS17)
    assert "conv_quantized" in op_types(ml)
    got = predict_one(ml, {"x": x})
    bshape = (-1, 1, 1, 1)
    w = wq.astype(np.float64) * np.reshape(scale, bshape if per_channel else ()) + np.reshape(
        qbias, bshape if per_channel else ())
    want = np_conv(x, w, None, [2, 2], [(1, 1), (1, 1)], [1, 1], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- FP16 accumulation


@pytest.mark.parametrize("factory, shape", [
    (lambda: torch.nn.Conv2d(64, 8, 3, padding=1), (1, 64, 8, 8)),
    (lambda: torch.nn.Conv1d(64, 8, 5, stride=2, padding=2), (1, 64, 20)),
    (lambda: torch.nn.Conv3d(16, 4, 3, padding=(1, 0, 1)), (1, 16, 4, 5, 5)),   # module's own FP16 3-d path
    (lambda: torch.nn.ConvTranspose2d(64, 4, 3, stride=2, padding=1), (1, 64, 5, 5)),
    (lambda: torch.nn.Conv2d(64, 8, (2, 3), padding="same", groups=2), (1, 64, 6, 6)),  # asymmetric pad
])
def test_conv_fp16_accumulation(factory, shape):
    torch.manual_seed(30)
    m = factory()
    x = torch.randn(*shape) + 0.5
    want, acc32, acc16, scale = fp16_accumulation_runs(m, [x])
    assert not np.array_equal(acc16, acc32), "FP16 accumulation changed nothing"
    assert np.max(np.abs(acc16 - want)) > np.max(np.abs(acc32 - want))
    np.testing.assert_allclose(acc32, want, rtol=2e-2, atol=1e-2 * scale)
    np.testing.assert_allclose(acc16, want, rtol=2e-2, atol=1e-2 * scale)


# ----------------------------------------------------------------------------- bad parameters


def test_bad_pad_type_names_input():
    from coreml_lab.emulator.ops.conv import conv_pads

    with pytest.raises(ValueError, match="'pad_type' = 'SAME_UPPER'.*expected one of"):
        conv_pads("conv", "SAME_UPPER", [5], [3], [1], [1], None)
    with pytest.raises(ValueError, match="'pad'.*custom"):
        conv_pads("max_pool", "custom", [5, 5], [3, 3], [1, 1], [1, 1], [1, 1])
    assert conv_pads("conv", "same", [5], [4], [1], [1], None) == [(1, 2)]
    assert conv_pads("conv", "same_lower", [5], [4], [1], [1], None) == [(2, 1)]
    assert conv_pads("conv", "same", [7], [3], [3], [1], None) == [(1, 1)]  # ceil(7/3)=3: (3-1)*3+3-7 = 2


@pytest.mark.parametrize("x_dtype", [np.float32, np.float16])
def test_fp32_program_with_fp16_constants_is_exact_for_the_constants_it_holds(x_dtype):
    # coremltools' TestConv stress tests with x_weight_dtype (fp32, fp16) / (fp16, fp16): an ML Program
    # converted at FP32 keeps the FP16 weights as FP16 constants. The emulator computes with exactly
    # those values (FP32 within FP32 tolerance; an FP16 x makes the conv FP16-typed: one rounding of
    # the exact result). The tests' expected values come from torch with the unrounded FP32 weights,
    # which no runtime holding FP16 weights can reach at FP32 tolerance (coremltools runs these
    # combinations only with its FP16 backends, whose tolerance is 0.5 / 5e-2).
    from coremltools.converters.mil.mil import types

    torch.manual_seed(0)
    m = torch.nn.Conv2d(4, 6, (2, 4), padding=1)
    w, b = m.weight.detach().numpy(), m.bias.detach().numpy()
    x = torch.randn(1, 4, 6, 7)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.numpy_type_to_builtin_type(x_dtype))],
                opset_version=ct.target.iOS17)
    def prog(x):
        return mb.conv(x=x, weight=w.astype(np.float16), bias=b.astype(np.float16), pad=[1, 1, 1, 1],
                       pad_type="custom")

    ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                    compute_precision=ct.precision.FLOAT32)
    (conv,) = [op for op in ml._mil_program.functions["main"].operations if op.op_type == "conv"]
    assert conv.weight.dtype == types.fp16
    (got,) = EmulatedModel(ml).predict({"x": x.numpy()}).values()
    held = F.conv2d(torch.from_numpy(x.numpy().astype(x_dtype).astype(np.float64)),
                    torch.from_numpy(w.astype(np.float16).astype(np.float64)),
                    torch.from_numpy(b.astype(np.float16).astype(np.float64)), padding=1).numpy()
    if x_dtype == np.float32:
        np.testing.assert_allclose(got, held, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, held.astype(np.float16))
    unrounded = m(x).detach().numpy()
    assert np.abs(held - unrounded).max() > 1e-4  # the gap coremltools' FP32-tolerance check sees
