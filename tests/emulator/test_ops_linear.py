"""Emulator kernels of the linear family: linear, matmul, einsum."""

from __future__ import annotations

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from opcheck import check_torch_op, convert_program, fp16_accumulation_runs, mil_ops, op_types

from coreml_lab.emulator import EmulatedModel

# ----------------------------------------------------------------------------- linear


@pytest.mark.parametrize("shape", [(8,), (3, 8), (2, 3, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_linear(shape, bias, target):
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 5, bias=bias)
    ml = check_torch_op(m, [torch.randn(*shape)], ["linear"], target=target)
    (op,) = mil_ops(ml, "linear")
    if bias:
        assert op.bias is not None and np.any(op.bias.val != 0)


def test_linear_int32_mil():
    w = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    b = np.array([1, -2, 3], dtype=np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 4), dtype=types.int32)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.linear(x=x, weight=w, bias=b)

    ml = convert_program(prog, ct.target.iOS17)
    assert "linear" in op_types(ml)
    x = np.array([[1, 2, 3, 4], [100000, -7, 0, 9]], dtype=np.int32)
    got = EmulatedModel(ml, "CPU_ONLY").predict({"x": x})
    (out,) = got.values()
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, x.astype(np.int64) @ w.T + b)


# ----------------------------------------------------------------------------- matmul


class MatMul(torch.nn.Module):
    def __init__(self, tx=False, ty=False):
        super().__init__()
        self.tx, self.ty = tx, ty

    def forward(self, a, b):
        if self.tx:
            a = a.transpose(-1, -2)
        if self.ty:
            b = b.transpose(-1, -2)
        return torch.matmul(a, b)


@pytest.mark.parametrize("sa, sb", [
    ((3, 4), (4, 5)),               # plain 2-D
    ((2, 3, 4), (2, 4, 5)),         # batched
    ((2, 1, 3, 4), (5, 4, 6)),      # broadcast batch dims of different rank
    ((4,), (2, 4, 5)),              # rank-1 x promoted then squeezed
    # rank-1 y is in the docstring, but MIL's type inference indexes y_shape[-2] and fails
    # (IndexError in coremltools 9.0), so no program can hold it.
])
def test_matmul_shapes(sa, sb):
    torch.manual_seed(1)
    check_torch_op(MatMul(), [torch.randn(*sa), torch.randn(*sb)], ["matmul"])


@pytest.mark.parametrize("tx, ty", [(True, False), (False, True), (True, True)])
def test_matmul_transpose(tx, ty):
    torch.manual_seed(2)
    a = torch.randn(2, 4, 3) if tx else torch.randn(2, 3, 4)
    b = torch.randn(2, 5, 4) if ty else torch.randn(2, 4, 5)
    ml = check_torch_op(MatMul(tx, ty), [a, b], ["matmul"])
    ops = mil_ops(ml, "matmul")
    if "transpose" not in op_types(ml):  # the transposes were fused into the matmul
        assert ops[0].transpose_x.val == tx and ops[0].transpose_y.val == ty


@pytest.mark.parametrize("target", [ct.target.iOS15, ct.target.iOS17])
def test_matmul_transpose_flags_mil(target):
    """transpose_x/transpose_y and a rank-1 operand straight from the MIL builder."""
    rng = np.random.default_rng(0)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 4, 3)), mb.TensorSpec(shape=(2, 5, 4)),
                             mb.TensorSpec(shape=(3,))], opset_version=target)
    def prog(x, y, v):
        a = mb.matmul(x=x, y=y, transpose_x=True, transpose_y=True)   # (2, 3, 5)
        c = mb.matmul(x=v, y=x, transpose_y=True)                     # (3,) @ (2, 3, 4) -> (2, 4)
        return a, c

    ml = convert_program(prog, target)
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    y = rng.standard_normal((2, 5, 4)).astype(np.float32)
    v = rng.standard_normal((3,)).astype(np.float32)
    got = list(EmulatedModel(ml, "CPU_ONLY").predict({"x": x, "y": y, "v": v}).values())
    want_a = np.swapaxes(x, -1, -2) @ np.swapaxes(y, -1, -2)
    want_c = v @ np.swapaxes(x, -1, -2)
    np.testing.assert_allclose(got[0], want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want_c, rtol=1e-5, atol=1e-6)


def test_matmul_int32_mil():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.int32),
                             mb.TensorSpec(shape=(3, 2), dtype=types.int32)], opset_version=ct.target.iOS17)
    def prog(x, y):
        return mb.matmul(x=x, y=y)

    ml = convert_program(prog, ct.target.iOS17)
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    y = np.array([[7, 8], [9, 10], [11, 12]], dtype=np.int32) * 1000
    (out,) = EmulatedModel(ml, "CPU_ONLY").predict({"x": x, "y": y}).values()
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, x @ y)


# ----------------------------------------------------------------------------- einsum


class Einsum(torch.nn.Module):
    def __init__(self, eq):
        super().__init__()
        self.eq = eq

    def forward(self, a, b):
        return torch.einsum(self.eq, a, b)


@pytest.mark.parametrize("eq, sa, sb", [
    ("nchw,nwhu->nchu", (2, 3, 4, 5), (2, 5, 4, 6)),
    ("nchw,nwhu->nchu", (1, 3, 4, 5), (2, 5, 1, 6)),   # B and H broadcast
    ("abcd,adce->abce", (2, 3, 4, 5), (2, 5, 4, 6)),   # same form, other letters
    ("chw,whu->chu", (3, 4, 5), (5, 4, 6)),
    ("chw,whu->chu", (3, 1, 5), (5, 4, 6)),            # H broadcast
])
def test_einsum_op(eq, sa, sb):
    torch.manual_seed(3)
    a, b = torch.randn(*sa), torch.randn(*sb)  # torch.einsum broadcasts size-1 dims too
    ml = check_torch_op(Einsum(eq), [a, b], ["einsum"])
    assert mil_ops(ml, "einsum")[0].equation.val.replace(" ", "") == eq


def test_einsum_reversed_operands():
    """'nwhu,nchw->nchu' converts to einsum with the operands swapped."""
    torch.manual_seed(4)
    check_torch_op(Einsum("nwhu,nchw->nchu"), [torch.randn(2, 5, 4, 6), torch.randn(2, 3, 4, 5)], ["einsum"])


@pytest.mark.parametrize("eq, sa, sb", [
    ("bij,bjk->bik", (2, 3, 4), (2, 4, 5)),
    ("bnqd,bnkd->bnqk", (1, 2, 3, 4), (1, 2, 5, 4)),
])
def test_einsum_lowered_to_matmul(eq, sa, sb):
    torch.manual_seed(5)
    check_torch_op(Einsum(eq), [torch.randn(*sa), torch.randn(*sb)], ["matmul"])


def test_einsum_pattern_validation():
    from coreml_lab.emulator.ops.linear import _EINSUM_FORMS, _einsum_pattern

    assert _einsum_pattern("nchw,nwhu->nchu") == _EINSUM_FORMS[4]
    assert _einsum_pattern(" chw, whr -> chr ") == _EINSUM_FORMS[3]
    assert _einsum_pattern("nchw,nwhu->nchw") != _EINSUM_FORMS[4]
    assert _einsum_pattern("ij,jk") is None


# ----------------------------------------------------------------------------- FP16 accumulation


def test_linear_fp16_accumulation_differs():
    torch.manual_seed(6)
    m = torch.nn.Linear(512, 16)
    x = torch.randn(4, 512) + 1.0
    want, acc32, acc16, scale = fp16_accumulation_runs(m, [x])
    assert not np.array_equal(acc16, acc32), "FP16 accumulation changed nothing"
    err16 = np.max(np.abs(acc16 - want))
    err32 = np.max(np.abs(acc32 - want))
    assert err16 > err32, (err16, err32)
    # both stay within FP16 tolerance of the float64 reference
    np.testing.assert_allclose(acc32, want, rtol=2e-2, atol=1e-2 * scale)
    np.testing.assert_allclose(acc16, want, rtol=2e-2, atol=1e-2 * scale)


def test_matmul_fp16_accumulation_differs():
    torch.manual_seed(7)
    a, b = torch.randn(2, 8, 256) + 0.5, torch.randn(2, 256, 8) + 0.5
    want, acc32, acc16, scale = fp16_accumulation_runs(MatMul(), [a, b])
    assert not np.array_equal(acc16, acc32)
    np.testing.assert_allclose(acc16, want, rtol=2e-2, atol=1e-2 * scale)


def test_einsum_fp16_accumulation():
    torch.manual_seed(8)
    a, b = torch.randn(1, 3, 4, 300) + 0.5, torch.randn(1, 300, 4, 2) + 0.5
    want, acc32, acc16, scale = fp16_accumulation_runs(Einsum("nchw,nwhu->nchu"), [a, b])
    assert not np.array_equal(acc16, acc32)
    np.testing.assert_allclose(acc16, want, rtol=2e-2, atol=1e-2 * scale)
