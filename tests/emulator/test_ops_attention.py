"""Emulator kernel of the attention family: scaled_dot_product_attention (iOS18)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from opcheck import (
    check_torch_op,
    convert_program,
    convert_torch,
    fp16_accumulation_runs,
    mil_program,
    op_types,
    predict_one,
    require_kernels,
)

SDPA = "scaled_dot_product_attention"


class Attention(torch.nn.Module):
    """q, k, v (and a mask source m) -> F.scaled_dot_product_attention."""

    def __init__(self, mask="none", const_mask=None):
        super().__init__()
        self.mask = mask
        if const_mask is not None:
            self.register_buffer("const_mask", const_mask)

    def forward(self, q, k, v, *m):
        if self.mask == "bool":          # runtime bool mask computed from an input
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m[0] > 0)
        if self.mask == "float":         # runtime additive float mask
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m[0])
        if self.mask == "const_bool":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.const_mask)
        if self.mask == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mask == "scale":
            return F.scaled_dot_product_attention(q, k, v, scale=0.3)
        return F.scaled_dot_product_attention(q, k, v)


def sdpa_mil_model(q, k, v, mask):
    """An FP32 iOS18 model of one MIL scaled_dot_product_attention over inputs q, k, v with a constant mask."""
    specs = {name: mb.TensorSpec(shape=a.shape) for name, a in (("q", q), ("k", k), ("v", v))}
    prog = mil_program(lambda q_, k_, v_: mb.scaled_dot_product_attention(query=q_, key=k_, value=v_, attn_mask=mask),
                       specs, "iOS18")
    return convert_program(prog, "iOS18")


def qkv(batch, L, S, E, EV, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*batch, L, E, generator=g), torch.randn(*batch, S, E, generator=g),
            torch.randn(*batch, S, EV, generator=g)]


def bool_source(shape, seed=1):
    """A float tensor whose '> 0' keeps column 0 of every row (no fully masked row)."""
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    m[..., 0] = 1.0
    return m


@pytest.mark.parametrize("batch, L, S, E, EV", [
    ((1, 2), 4, 6, 8, 5),   # [B, H, L, E]
    ((2,), 3, 7, 16, 4),    # rank 3
    ((1, 2, 3), 2, 3, 4, 4),  # rank 5
])
def test_sdpa_no_mask(batch, L, S, E, EV):
    ml = check_torch_op(Attention(), qkv(batch, L, S, E, EV), [SDPA], target="iOS18")
    assert "softmax" not in op_types(ml)


@pytest.mark.parametrize("mask_shape", [(4, 6), (1, 1, 4, 6), (2, 1, 4, 6), (2, 3, 4, 6)])
def test_sdpa_bool_mask(mask_shape):
    inputs = qkv((2, 3), 4, 6, 8, 5, seed=2) + [bool_source(mask_shape)]
    ml = check_torch_op(Attention("bool"), inputs, [SDPA], target="iOS18")
    (op,) = [o for o in ml._mil_program.functions["main"].operations if o.op_type == SDPA]
    assert op.attn_mask is not None and types.is_bool(op.attn_mask.dtype)


@pytest.mark.parametrize("mask_shape", [(4, 6), (2, 1, 4, 6)])
def test_sdpa_float_mask(mask_shape):
    inputs = qkv((2, 3), 4, 6, 8, 5, seed=3) + [torch.randn(*mask_shape) * 3]
    ml = check_torch_op(Attention("float"), inputs, [SDPA], target="iOS18")
    (op,) = [o for o in ml._mil_program.functions["main"].operations if o.op_type == SDPA]
    assert op.attn_mask is not None and types.is_float(op.attn_mask.dtype)


def test_sdpa_const_bool_mask():
    mask = bool_source((5, 5), seed=4) > 0
    check_torch_op(Attention("const_bool", mask), qkv((1, 2), 5, 5, 8, 8, seed=4), [SDPA], target="iOS18")


def test_sdpa_causal():
    # is_causal becomes a constant band_part mask folded into a bool const
    check_torch_op(Attention("causal"), qkv((1, 2), 5, 5, 8, 8, seed=5), [SDPA], target="iOS18")


def test_sdpa_fully_masked_row_is_nan():
    """A row with every key masked gives NaN, as the docstring's formula (softmax over all -inf) does."""
    q, k, v = (t.numpy() for t in qkv((1,), 3, 4, 4, 2, seed=6))
    mask = np.ones((3, 4), bool)
    mask[1] = False
    got = predict_one(sdpa_mil_model(q, k, v, mask), {"q": q, "k": k, "v": v})
    assert np.isnan(got[0, 1]).all()
    s = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) / 2.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p @ v
    np.testing.assert_allclose(got[0, [0, 2]], want[0, [0, 2]], rtol=1e-5, atol=1e-6)


def test_sdpa_fp16_mask_with_fp32_query_mil():
    """Mask dtype M may differ from T: an fp16 additive mask on an fp32 attention."""
    q, k, v = (t.numpy() for t in qkv((2,), 3, 5, 4, 3, seed=7))
    mask = (np.random.default_rng(7).standard_normal((3, 5)) * 2).astype(np.float16)
    ml = sdpa_mil_model(q, k, v, mask)
    assert SDPA in op_types(ml)
    got = predict_one(ml, {"q": q, "k": k, "v": v})
    want = F.scaled_dot_product_attention(torch.from_numpy(q).double(), torch.from_numpy(k).double(),
                                          torch.from_numpy(v).double(),
                                          attn_mask=torch.from_numpy(mask.astype(np.float64))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- older targets decompose


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_sdpa_ios17_decomposes(mask):
    require_kernels("softmax", "matmul", "mul", "add", "sub", "cast", "greater")
    inputs = qkv((1, 2), 4, 6, 8, 5, seed=8)
    if mask == "bool":
        inputs.append(bool_source((4, 6), seed=8))
    elif mask == "float":
        inputs.append(torch.randn(4, 6))
    ml = check_torch_op(Attention(mask), inputs, ["matmul", "softmax"], target="iOS17")
    assert SDPA not in op_types(ml)
    ml18 = convert_torch(Attention(mask), inputs, "fp32", "iOS18")
    assert SDPA in op_types(ml18) and "softmax" not in op_types(ml18)


def test_sdpa_custom_scale_decomposes_at_ios18():
    require_kernels("softmax", "matmul", "mul")
    ml = check_torch_op(Attention("scale"), qkv((1, 2), 4, 6, 8, 5, seed=9), ["matmul", "softmax"], target="iOS18")
    assert SDPA not in op_types(ml)


# ----------------------------------------------------------------------------- FP16 accumulation


def test_sdpa_fp16_accumulation():
    inputs = [t + 0.3 for t in qkv((1, 2), 8, 256, 128, 16, seed=10)]
    module = Attention()
    ml16 = convert_torch(module, inputs, "fp16", "iOS18")
    assert SDPA in op_types(ml16)
    want, acc32, acc16, scale = fp16_accumulation_runs(module, inputs, ml16=ml16)
    assert not np.array_equal(acc16, acc32)
    assert np.max(np.abs(acc16 - want)) > np.max(np.abs(acc32 - want))
    np.testing.assert_allclose(acc16, want, rtol=2e-2, atol=2e-2 * scale)
