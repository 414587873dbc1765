"""Activation kernels (coreml_lab/emulator/ops/activation.py) against torch and numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from opcheck import Fn, check_mil, check_torch_op, convert_mil, convert_torch, feeds, mil_outputs, op_types

from coreml_lab.emulator import EmulatedModel
from coreml_lab.emulator.interpreter import OpExecutionError


def _randn(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


X = _randn(2, 3, 4, 5)
XS = [X.numpy()]

# ----------------------------------------------------------------------------- torch-converted ops


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_relu(target):
    check_torch_op(Fn(F.relu), [X], ["relu"], target=target)


def test_relu6():
    check_torch_op(Fn(F.relu6), [X * 2], ["relu6"])


def test_sigmoid():
    check_torch_op(Fn(torch.sigmoid), [X], ["sigmoid"])


def test_silu():
    check_torch_op(Fn(F.silu), [X], ["silu"])


def test_softplus():
    check_torch_op(Fn(F.softplus), [X], ["softplus"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_elu(target):
    check_torch_op(Fn(lambda x: F.elu(x, alpha=0.7)), [X], ["elu"], target=target)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    check_torch_op(Fn(lambda x: F.gelu(x, approximate=approximate)), [X], ["gelu"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_leaky_relu(target):
    check_torch_op(Fn(lambda x: F.leaky_relu(x, 0.1)), [X], ["leaky_relu"], target=target)


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_prelu(target):
    m = torch.nn.PReLU(3)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.1, -0.4, 0.8]))  # distinct per channel: stays prelu
    check_torch_op(m, [X], ["prelu"], target=target)


def test_sigmoid_hard():
    check_torch_op(Fn(F.hardsigmoid), [X], ["sigmoid_hard"])


def test_thresholded_relu_from_hardswish():
    check_torch_op(Fn(F.hardswish), [X], ["thresholded_relu", "sigmoid_hard"])


def test_linear_activation_from_threshold():
    check_torch_op(Fn(lambda x: F.threshold(x, 0.5, -2.0)), [X], ["linear_activation"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_softplus_parametric(target):
    check_torch_op(Fn(lambda x: F.softplus(x, beta=2.0)), [X], ["softplus_parametric"], target=target)


@pytest.mark.parametrize("dim", [0, 1, 3, -1])
def test_softmax(dim):
    check_torch_op(Fn(lambda x: F.softmax(x, dim=dim)), [X], ["softmax"])


def test_softmax_ios15_rank2():
    check_torch_op(Fn(lambda x: F.softmax(x, dim=-1)), [_randn(4, 33)], ["softmax"], target="iOS15")


# ----------------------------------------------------------------------------- builder-only ops


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_erf(x):
    return np.vectorize(math.erf)(x)


GELU_REF = {
    "EXACT": lambda x: 0.5 * x * (1 + _np_erf(x / math.sqrt(2))),
    "TANH_APPROXIMATION": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "SIGMOID_APPROXIMATION": lambda x: x * _np_sigmoid(1.702 * x),
}


@pytest.mark.parametrize("mode", list(GELU_REF))
def test_gelu_modes_builder(mode):
    check_mil(lambda x: mb.gelu(x=x, mode=mode), XS, GELU_REF[mode], "gelu")


def test_gelu_modes_differ():
    # the three formulas really are different functions (the kernel must not ignore `mode`)
    x = np.linspace(-3, 3, 13, dtype=np.float32)[None]
    outs = {}
    for mode in GELU_REF:
        (outs[mode],) = mil_outputs(convert_mil(lambda v, m=mode: mb.gelu(x=v, mode=m), [x]), [x])
    assert np.max(np.abs(outs["EXACT"] - outs["SIGMOID_APPROXIMATION"])) > 1e-2
    assert np.max(np.abs(outs["EXACT"] - outs["TANH_APPROXIMATION"])) > 1e-5


@pytest.mark.parametrize("beta", [2.0, -0.5])
def test_clamped_relu(beta):
    # docstring semantics: min(beta, x) if x >= 0 else min(beta, alpha * x)
    ref = lambda x: np.where(x >= 0, np.minimum(beta, x), np.minimum(beta, 0.3 * x))
    check_mil(lambda x: mb.clamped_relu(x=x, alpha=0.3, beta=beta), XS, ref, "clamped_relu")


def test_scaled_tanh():
    check_mil(lambda x: mb.scaled_tanh(x=x, alpha=1.5, beta=0.7), XS, lambda x: 1.5 * np.tanh(0.7 * x), "scaled_tanh")


def test_linear_activation():
    check_mil(lambda x: mb.linear_activation(x=x, alpha=-1.25, beta=0.5), XS, lambda x: -1.25 * x + 0.5,
              "linear_activation")


def test_thresholded_relu():
    check_mil(lambda x: mb.thresholded_relu(x=x, alpha=0.4), XS, lambda x: np.where(x >= 0.4, x, 0.0),
              "thresholded_relu")


def test_thresholded_relu_boundary_inclusive():
    x = np.array([[0.25, 0.5, 0.75, 0.5 - 1e-6]], dtype=np.float32)
    (got,) = mil_outputs(convert_mil(lambda v: mb.thresholded_relu(x=v, alpha=0.5), [x]), [x])
    np.testing.assert_array_equal(got, np.array([[0.0, 0.5, 0.75, 0.0]], dtype=np.float32))


def test_sigmoid_hard_builder():
    check_mil(lambda x: mb.sigmoid_hard(x=x, alpha=0.2, beta=0.5), XS,
              lambda x: np.clip(0.2 * x + 0.5, 0, 1), "sigmoid_hard")


def test_softsign():
    check_mil(lambda x: mb.softsign(x=x), XS, lambda x: x / (1 + np.abs(x)), "softsign")


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 7)])
def test_softplus_parametric_builder(shape):
    alpha = np.array([0.5, 1.0, 2.0], dtype=np.float32)
    beta = np.array([2.0, 1.0, -0.5], dtype=np.float32)
    x = _randn(*shape).numpy()
    bshape = (1, 3) + (1,) * (len(shape) - 2)

    def ref(v):
        return alpha.reshape(bshape) * np.log1p(np.exp(beta.reshape(bshape) * v))

    check_mil(lambda v: mb.softplus_parametric(x=v, alpha=alpha, beta=beta), [x], ref, "softplus_parametric")


def test_prelu_rank3_and_5():
    for shape in [(2, 3, 6), (1, 3, 2, 2, 2)]:
        x = _randn(*shape).numpy()
        a = np.full(3, 0.25, np.float32)  # rank 3 / 5 prelu needs equal alphas
        check_mil(lambda v: mb.prelu(x=v, alpha=a), [x], lambda v: np.where(v > 0, v, 0.25 * v), "prelu", fp16=False,
                  passes=False)  # the default pipeline rewrites equal-alpha prelu to leaky_relu


# iOS17: alpha / beta may have another dtype (fp16) than x (fp32)
A16 = np.float16(0.3)
B16 = np.float16(1.7)
a, b = float(A16), float(B16)  # the fp16 values the op really carries
IOS17_MIXED = {
    "clamped_relu": (lambda x: mb.clamped_relu(x=x, alpha=A16, beta=B16),
                     lambda x: np.where(x >= 0, np.minimum(b, x), np.minimum(b, a * x))),
    "elu": (lambda x: mb.elu(x=x, alpha=A16), lambda x: np.where(x > 0, x, a * np.expm1(x))),
    "leaky_relu": (lambda x: mb.leaky_relu(x=x, alpha=A16), lambda x: np.where(x >= 0, x, a * x)),
    "linear_activation": (lambda x: mb.linear_activation(x=x, alpha=A16, beta=B16), lambda x: a * x + b),
    "prelu": (lambda x: mb.prelu(x=x, alpha=np.array([0.1, -0.3, 0.7], np.float16)),
              lambda x: np.where(x > 0, x, np.array([0.1, -0.3, 0.7], np.float16).astype(np.float64)
                                 .reshape(1, 3, 1, 1) * x)),
    "scaled_tanh": (lambda x: mb.scaled_tanh(x=x, alpha=A16, beta=B16), lambda x: a * np.tanh(b * x)),
    "sigmoid_hard": (lambda x: mb.sigmoid_hard(x=x, alpha=A16, beta=B16), lambda x: np.clip(a * x + b, 0, 1)),
    "softplus_parametric": (
        lambda x: mb.softplus_parametric(x=x, alpha=np.full(3, A16), beta=np.full(3, B16)),
        lambda x: a * np.log1p(np.exp(b * x))),
    "thresholded_relu": (lambda x: mb.thresholded_relu(x=x, alpha=A16), lambda x: np.where(x >= a, x, 0.0)),
}


@pytest.mark.parametrize("op", sorted(IOS17_MIXED))
def test_ios17_fp16_parameters_on_fp32_op(op):
    build, ref = IOS17_MIXED[op]
    ml = convert_mil(build, XS, "iOS17", passes=False)
    prog = ml._mil_program.functions["main"]
    the_op = next(o for o in prog.operations if o.op_type == op)
    assert types.builtin_to_string(the_op.outputs[0].dtype) == "fp32"
    assert {types.builtin_to_string(v.dtype) for k, v in the_op.inputs.items() if k != "x"} == {"fp16"}
    (got,) = mil_outputs(ml, XS)
    np.testing.assert_allclose(got.astype(np.float64), ref(X.numpy().astype(np.float64)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- softmax details


def test_softmax_large_logits_fp16_neural_engine():
    # max-shift: logits far above ln(65504) stay finite on an FP16 device
    x = np.array([[1000.0, 999.0, 998.0, 990.0]], dtype=np.float32)
    ml16 = convert_mil(lambda v: mb.softmax(x=v, axis=-1), [x], precision="fp16")
    e = np.exp(x.astype(np.float64) - 1000.0)
    want = e / e.sum()
    for cu in ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"):
        (got,) = mil_outputs(ml16, [x], cu)
        assert np.isfinite(got).all(), cu
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4, err_msg=cu)


def test_softmax_sums_with_profile_accumulation():
    # the FP16-accumulation NE variant sums softmax in FP16 (pairwise); the calibrated NE profile
    # accumulates wide (ane-guide): the two must differ (the kernel sums through numerics with call.accumulate)
    from coreml_lab.emulator.profiles import PROFILES, Precision, ne_fp16_accumulation

    x = _randn(2, 3000, scale=2.0, seed=5).numpy()
    ml16 = convert_mil(lambda v: mb.softmax(x=v, axis=1), [x], precision="fp16")
    (fp16_acc,) = mil_outputs(ml16, [x], ne_fp16_accumulation())
    acc32 = PROFILES["CPU_AND_NE"].with_device("NE", fp16={"activation": Precision("fp16", "fp16", "fp32")})
    (fp32_acc,) = mil_outputs(ml16, [x], acc32)
    assert not np.array_equal(fp16_acc, fp32_acc)
    x16 = x.astype(np.float16).astype(np.float64)
    e = np.exp(x16 - x16.max(axis=1, keepdims=True))
    want = e / e.sum(axis=1, keepdims=True)
    for got in (fp16_acc, fp32_acc):
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-6)


def test_softmax_bad_axis_names_axis():
    x = np.zeros((2, 3), dtype=np.float32)
    ml = convert_mil(lambda v: mb.softmax(x=v, axis=5), [x], passes=False)
    with pytest.raises(OpExecutionError, match="axis"):
        mil_outputs(ml, [x])


# ----------------------------------------------------------------------------- softplus NE hazard


class _Softplus(torch.nn.Module):
    def forward(self, x):
        return F.softplus(x)


def test_softplus_neural_engine_overflow_cliff():
    # apple/coremltools#2687: on the Neural Engine softplus collapses to 0 once exp(x) overflows FP16.
    x = torch.linspace(9.0, 12.0, 97).reshape(1, -1)
    model = convert_torch(_Softplus(), [x], "fp16")
    assert "softplus" in op_types(model)
    f = feeds([x])
    outs = {cu: next(iter(EmulatedModel(model, cu).predict(f).values())).reshape(-1).astype(np.float64)
            for cu in ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")}
    xv = x.numpy().reshape(-1).astype(np.float64)
    i12 = int(np.argmin(np.abs(xv - 12.0)))
    for cu in ("CPU_ONLY", "CPU_AND_GPU"):
        assert abs(outs[cu][i12] - 12.0) < 0.02, cu                         # ~x at x = 12
        np.testing.assert_allclose(outs[cu], np.log1p(np.exp(xv)), rtol=2e-3, err_msg=cu)
    ne = outs["CPU_AND_NE"]
    assert ne[i12] == 0.0                                                     # exactly 0 at x = 12
    zero = np.nonzero(ne == 0.0)[0]
    cliff = xv[zero[0]]
    assert 10.0 < cliff < 11.2, cliff
    assert (ne[zero[0]:] == 0).all(), "past the cliff every output is 0"
    below = slice(0, zero[0])
    np.testing.assert_allclose(ne[below], np.log1p(np.exp(xv[below])), rtol=2e-3)


def test_softplus_hazard_only_on_neural_engine_profile():
    # the GPU also stores FP16 but computes in FP32: no cliff there; strict FP16 CPU has no hazard rule
    from coreml_lab.emulator.profiles import strict_fp16_cpu

    x = np.array([[11.5, 20.0, 60.0]], dtype=np.float32)
    ml16 = convert_mil(lambda v: mb.softplus(x=v), [x], precision="fp16")
    (got,) = mil_outputs(ml16, [x], strict_fp16_cpu())
    np.testing.assert_allclose(got, x, rtol=1e-3)
    (got,) = mil_outputs(ml16, [x], "CPU_AND_NE")
    np.testing.assert_array_equal(got, np.zeros_like(got))
