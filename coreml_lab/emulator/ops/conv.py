"""Convolution ops: conv, conv_transpose (1-d, 2-d, 3-d), conv_quantized.

Semantics: coremltools ``ops/defs/iOS15/conv.py`` and ``iOS17/conv.py`` (iOS17
only lets weight/bias have another float dtype than ``x`` and makes the
conv_transpose weight non-const; inputs arrive in the compute dtype, so the
kernels are the same for both opsets).

Padding (``pad_type``), for each spatial dim with dilated kernel
``dk = (K - 1) * dilation + 1``:

* ``valid``: none; ``custom``: ``pad[2i]`` before, ``pad[2i+1]`` after.
* ``same``: total ``max(0, (ceil(D / s) - 1) * s + dk - D)`` so that
  ``D_out = ceil(D / s)``; when the total is odd the extra element goes *after*
  (bottom/right), like TF "SAME", ONNX "SAME_UPPER" and torch ``padding="same"``.
* ``same_lower``: the same total with the extra element *before* (top/left).

The conv docstring's formula for the split (``padding[2i] = ceil((dk - 1) / 2)``
for even ``dk``) puts the extra element before, which is really the
``same_lower`` split; the torch frontend maps ``padding="same"`` to ``same`` and
coremltools' own tests check ``same`` against torch (extra after) and
``same_lower`` against torch on flipped tensors (extra before). The kernels follow
those tests. Asymmetric padding is applied with an explicit ``F.pad`` and the
convolution then runs with zero padding.

conv_transpose: output spatial size ``D_out`` is ``output_shape[2:]`` when given,
else ``(D - 1) * s + dk`` (valid), that minus ``pad[2i] + pad[2i+1]`` (custom),
``D * s`` (same). The full transposed convolution (size ``(D - 1) * s + dk``) is
cropped starting at ``pad[2i]`` (custom), 0 (valid) or ``total // 2`` with
``total = full - D_out`` (same, TF convention: extra crop at the end), and
zero-extended at the end if ``D_out`` is larger (uncertain: how Core ML fills an
``output_shape`` larger than the full size is not documented). Bias is added after
cropping.

All dot products go through :func:`numerics.conv_nd` with the op's accumulation
dtype (1-d, 2-d and 3-d alike), then the Neural Engine's multiply-accumulate output port
where the device has one (:func:`.linear.mac_output`: the 2^15 ceiling applies to a
convolution of two or more taps, C_in / groups x kernel size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import numerics
from ..registry import kernel
from .linear import has_mac_port, mac_output

FP16 = torch.float16
PAD_TYPES = ("valid", "same", "same_lower", "custom")


# ----------------------------------------------------------------------------- helpers


def _param_list(call, name: str, nd: int) -> list[int]:
    v = call.ints(name)
    if v is None or len(v) != nd:
        raise ValueError(
            f"{call.op.op_type}: input {name!r} = {v} must have one value per spatial dimension ({nd})")
    return v


def conv_pads(op_type: str, pad_type: str, in_sizes, kernel_sizes, strides, dilations, pad) -> list[tuple]:
    """(before, after) padding per spatial dim for ``pad_type`` (see module docstring)."""
    nd = len(in_sizes)
    if pad_type == "valid":
        return [(0, 0)] * nd
    if pad_type == "custom":
        if pad is None or len(pad) != 2 * nd:
            raise ValueError(
                f"{op_type}: input 'pad' = {pad} must have 2 values per spatial dimension "
                f"({2 * nd}) when pad_type is 'custom'")
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(nd)]
    if pad_type in ("same", "same_lower"):
        out = []
        for d, k, s, dil in zip(in_sizes, kernel_sizes, strides, dilations):
            dk = (k - 1) * dil + 1
            total = max(0, (math.ceil(d / s) - 1) * s + dk - d)
            small = total // 2
            out.append((small, total - small) if pad_type == "same" else (total - small, small))
        return out
    raise ValueError(f"{op_type}: input 'pad_type' = {pad_type!r} is not supported; expected one of {PAD_TYPES}")


def _torch_pad_arg(pads) -> list[int]:
    """F.pad argument (last dim first) from per-dim (before, after) pairs."""
    arg = []
    for before, after in reversed(pads):
        arg += [before, after]
    return arg


def _conv(x, weight, bias, strides, pads, dilations, groups, accumulate):
    nd = weight.ndim - 2
    if all(b == a for b, a in pads):
        padding = [b for b, _ in pads]
    else:
        x = F.pad(x, _torch_pad_arg(pads))
        padding = [0] * nd
    return numerics.conv_nd(x, weight, bias, strides, padding, dilations, groups, accumulate)


def _check_rank(call, x, weight):
    nd = x.ndim - 2
    if nd not in (1, 2, 3) or weight.ndim != x.ndim:
        raise ValueError(
            f"{call.op.op_type}: input 'x' must be rank 3..5 [n, C, *D] with a 'weight' of the same rank, "
            f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    return nd


def _conv_call(call, x, weight):
    nd = _check_rank(call, x, weight)
    bias = call.tensor("bias", dtype=x.dtype) if call.has("bias") else None
    strides = _param_list(call, "strides", nd)
    dilations = _param_list(call, "dilations", nd)
    groups = call.int("groups")
    pad_type = call.str("pad_type")
    pads = conv_pads(call.op.op_type, pad_type, list(x.shape[2:]), list(weight.shape[2:]), strides, dilations,
                     call.ints("pad"))
    if x.shape[1] % groups or weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"{call.op.op_type}: input 'groups' = {groups} does not fit C_in = {x.shape[1]} and weight "
            f"shape {tuple(weight.shape)} (expected weight[1] == C_in / groups)")
    taps = math.prod(weight.shape[1:])
    if not has_mac_port(call, taps):
        return _conv(x, weight, bias, strides, pads, dilations, groups, call.accumulate)
    y = _conv(x, weight, None, strides, pads, dilations, groups, call.accumulate)
    return mac_output(call, y, bias, (1, -1, *([1] * nd)), taps=taps)


# ----------------------------------------------------------------------------- conv


def _operands(call):
    """x and weight in the accumulation dtype: values are the same, and constant weights are
    converted once and cached instead of on every run."""
    x = call.tensor("x", dtype=call.accumulate) if call.raw("x").is_floating_point() else call.tensor("x")
    return x, call.tensor("weight", dtype=x.dtype)


@kernel("conv", family="conv", uses={"accumulate", "hazards"})
def conv(call):
    x, weight = _operands(call)
    return _conv_call(call, x, weight)


@kernel("conv_quantized", family="conv")
def conv_quantized(call):
    """conv with uint8 weights: ``W = W_q * quant_scale + quant_bias`` (quantization_type 'linear').

    ``quant_scale`` / ``quant_bias`` hold one value or one per output channel. For 'lut' the
    docstring gives no formula; the weight is read as indices into the lookup table
    ``quant_scale`` (2^nbits values; uncertain) and ``quant_bias`` is not used. The op is
    experimental (a NeuralNetwork-era op); whether the Core ML runtime executes it in an
    ML Program is not documented.
    """
    x = call.tensor("x")
    wq = call.raw("weight")
    qtype = call.str("quantization_type")
    scale = call.tensor("quant_scale").to(x.dtype)
    qbias = call.tensor("quant_bias").to(x.dtype)
    if qtype == "linear":
        # scale / bias: one value, or one per output channel (NeuralNetwork LinearQuantizationParams)
        if scale.numel() > 1:
            scale = scale.reshape(-1, *([1] * (wq.ndim - 1)))
        if qbias.numel() > 1:
            qbias = qbias.reshape(-1, *([1] * (wq.ndim - 1)))
        weight = wq.to(x.dtype) * scale + qbias
    elif qtype == "lut":
        weight = scale.reshape(-1)[wq.long()]
    else:
        raise ValueError(f"conv_quantized: input 'quantization_type' = {qtype!r}; expected 'linear' or 'lut'")
    return _conv_call(call, x, weight.to(x.dtype))


# ----------------------------------------------------------------------------- conv_transpose


def _conv_transpose_full(x, weight, strides, dilations, groups, accumulate):
    """Full transposed convolution, spatial size (D - 1) * s + (K - 1) * d + 1, no bias."""
    nd = weight.ndim - 2
    if accumulate != FP16:
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
        return fn(x.to(accumulate), weight.to(accumulate), None, stride=tuple(strides), padding=0,
                  output_padding=0, groups=groups, dilation=tuple(dilations))
    # As a direct convolution: insert (s - 1) zeros between inputs, pad (K - 1) * d on both sides,
    # and convolve with the spatially flipped weight whose in/out channels are swapped per group.
    n, cin = x.shape[:2]
    in_sizes = x.shape[2:]
    z_sizes = [(d - 1) * s + 1 for d, s in zip(in_sizes, strides)]
    z = x.new_zeros(n, cin, *z_sizes)
    z[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    ksizes = weight.shape[2:]
    pads = [((k - 1) * d, (k - 1) * d) for k, d in zip(ksizes, dilations)]
    cout_g = weight.shape[1]
    w = weight.reshape(groups, cin // groups, cout_g, *ksizes).transpose(1, 2)
    w = w.reshape(groups * cout_g, cin // groups, *ksizes).flip(list(range(2, 2 + nd)))
    return _conv(z, w, None, [1] * nd, pads, dilations, groups, accumulate)


@kernel("conv_transpose", family="conv")
def conv_transpose(call):
    x, weight = _operands(call)
    nd = _check_rank(call, x, weight)
    bias = call.tensor("bias") if call.has("bias") else None
    strides = _param_list(call, "strides", nd)
    dilations = _param_list(call, "dilations", nd)
    groups = call.int("groups")
    pad_type = call.str("pad_type")
    if x.shape[1] != weight.shape[0] or x.shape[1] % groups:
        raise ValueError(
            f"conv_transpose: input 'weight' shape {tuple(weight.shape)} / 'groups' = {groups} do not fit "
            f"C_in = {x.shape[1]} (expected weight [C_in, C_out / groups, *K], C_in divisible by groups)")
    in_sizes = list(x.shape[2:])
    ksizes = list(weight.shape[2:])
    full = [(d - 1) * s + (k - 1) * dil + 1 for d, s, k, dil in zip(in_sizes, strides, ksizes, dilations)]
    pad = call.ints("pad")
    out_shape = call.ints("output_shape")
    if pad_type == "custom":
        if pad is None or len(pad) != 2 * nd:
            raise ValueError(f"conv_transpose: input 'pad' = {pad} must have {2 * nd} values for pad_type 'custom'")
        starts = [pad[2 * i] for i in range(nd)]
        outs = [full[i] - pad[2 * i] - pad[2 * i + 1] for i in range(nd)]
    elif pad_type == "valid":
        starts = [0] * nd
        outs = list(full)
    elif pad_type == "same":
        outs = [d * s for d, s in zip(in_sizes, strides)]
        starts = None
    else:
        raise ValueError(
            f"conv_transpose: input 'pad_type' = {pad_type!r} is not supported; expected 'valid', 'same' or 'custom'")
    if out_shape is not None:
        if len(out_shape) == nd + 2:
            out_shape = out_shape[2:]
        if len(out_shape) != nd:
            raise ValueError(
                f"conv_transpose: input 'output_shape' = {call.ints('output_shape')} must be [n, C_out, *D_out]")
        outs = list(out_shape)
    if starts is None:  # same: crop total // 2 at the start, the rest at the end
        starts = [max(f - o, 0) // 2 for f, o in zip(full, outs)]
    y = _conv_transpose_full(x, weight, strides, dilations, groups, call.accumulate)
    crop = []
    for f, st, o in zip(full, starts, outs):
        crop.append((-st, o - (f - st)))  # negative F.pad values crop, positive extend with zeros
    if any(b or a for b, a in crop):
        y = F.pad(y, _torch_pad_arg(crop))
    taps = (x.shape[1] // groups) * math.prod(ksizes)
    return mac_output(call, y, bias, (1, -1, *([1] * nd)), taps=taps)
