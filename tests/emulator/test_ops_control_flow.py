"""Emulator kernels for control flow: cond, while_loop, select and MIL lists.

Data-dependent loops and branches come from ``torch.jit.script`` modules
converted directly (tracing would unroll them); nested control flow (a loop
inside a cond branch reading values of the enclosing blocks) and the list ops,
which no torch model produces, are built with the MIL builder and checked
against numpy.
"""

from __future__ import annotations

import warnings

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from opcheck import FP16_PROFILES, FP16_RTOL, check_torch_op, convert_program, op_types, predict_one, require_kernels

from coreml_lab.emulator import EmulatedModel
from coreml_lab.emulator.interpreter import OpExecutionError


def convert_scripted(module, specs, precision="fp32", target="iOS17"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module.eval())
        return ct.convert(
            scripted, inputs=specs, convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, target),
        )


# ----------------------------------------------------------------------------- torch.jit.script


class DoubleUntil(torch.nn.Module):
    """A data-dependent while loop followed by a data-dependent if."""

    def forward(self, x):
        y = x
        while bool(y.sum() < 50.0):
            y = y * 2.0 + 1.0
        if bool(x.mean() > 0):
            y = y - x
        else:
            y = y + 3.0 * x
        return y


class RangeLoop(torch.nn.Module):
    """A counted loop whose trip count is a model input (zero trips allowed)."""

    def forward(self, x, n):
        y = x
        for _ in range(int(n[0])):
            y = y * 0.5 + 1.0
        return y


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_scripted_while_and_if(target, sign):
    require_kernels("reduce_sum", "reduce_mean")
    x = (torch.linspace(0.1, 1.2, 6).reshape(2, 3) * sign).float()
    with torch.no_grad():
        want = DoubleUntil()(x).numpy()
    ml = convert_scripted(DoubleUntil(), [ct.TensorType(name="x", shape=(2, 3))], target=target)
    assert {"while_loop", "cond"} <= op_types(ml)
    got = predict_one(ml, {"x": x.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    # The loop ran several iterations (the check is not vacuous)
    assert np.abs(want).max() > 10


@pytest.mark.parametrize("cu", FP16_PROFILES)
def test_scripted_while_and_if_fp16(cu):
    require_kernels("reduce_sum", "reduce_mean")
    x = torch.linspace(0.1, 1.2, 6).reshape(2, 3)
    with torch.no_grad():
        want = DoubleUntil().double()(x.double()).numpy()
    ml = convert_scripted(DoubleUntil(), [ct.TensorType(name="x", shape=(2, 3))], precision="fp16")
    assert {"while_loop", "cond"} <= op_types(ml)
    got = predict_one(ml, {"x": x.numpy()}, cu)
    np.testing.assert_allclose(got, want, rtol=FP16_RTOL, atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("n", [0, 1, 5])
def test_scripted_range_loop(n):
    x = torch.tensor([[0.0, 2.0, -4.0], [8.0, 1.5, -0.25]])
    nn_ = torch.tensor([n], dtype=torch.int32)
    with torch.no_grad():
        want = RangeLoop()(x, nn_).numpy()
    ml = convert_scripted(RangeLoop(), [ct.TensorType(name="x", shape=(2, 3)),
                                        ct.TensorType(name="n", shape=(1,), dtype=np.int32)])
    assert "while_loop" in op_types(ml)
    got = predict_one(ml, {"x": x.numpy(), "n": np.array([n], np.int32)})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    if n == 0:
        np.testing.assert_array_equal(got, x.numpy())


# ----------------------------------------------------------------------------- MIL builder: nesting

def _nested_program(target):
    int32 = types.int32

    @mb.program(input_specs=[mb.TensorSpec(shape=(3,)), mb.TensorSpec(shape=(1,), dtype=int32)],
                opset_version=getattr(ct.target, target))
    def prog(x, k):
        k0 = mb.squeeze(x=k)
        scale = mb.mul(x=x, y=0.5)   # defined in the main block, read inside nested blocks

        def true_fn():
            # nested loop inside the true branch: y = y * 0.5 + x (x, scale from outer blocks), k times;
            # with an inner cond in the body choosing the increment
            def c(i, y):
                return mb.less(x=i, y=k0)

            def b(i, y):
                odd = mb.equal(x=mb.mod(x=i, y=2), y=1)
                inc = mb.cond(pred=odd, _true_fn=lambda: mb.add(x=x, y=scale),
                              _false_fn=lambda: mb.identity(x=x))
                return mb.add(x=i, y=1), mb.add(x=mb.mul(x=y, y=0.5), y=inc)

            _, y = mb.while_loop(_cond=c, _body=b, loop_vars=(np.int32(0), x))
            return y

        def false_fn():
            return mb.sub(x=scale, y=x)

        pred = mb.greater(x=k0, y=0)
        return mb.cond(pred=pred, _true_fn=true_fn, _false_fn=false_fn)

    return prog


def _nested_reference(x, k):
    x = x.astype(np.float64)
    if k <= 0:
        return 0.5 * x - x
    y = x.copy()
    for i in range(k):
        inc = x + 0.5 * x if i % 2 == 1 else x
        y = y * 0.5 + inc
    return y


@pytest.mark.parametrize("target", ["iOS15", "iOS18"])
def test_nested_loop_inside_cond(target):
    require_kernels("squeeze", "identity")
    ml = convert_program(_nested_program(target), target=target)
    em = EmulatedModel(ml, "CPU_ONLY")
    x = np.array([1.0, -2.0, 0.25], np.float32)
    for k in (0, 1, 4, -3):
        got = next(iter(em.predict({"x": x, "k": np.array([k], np.int32)}).values()))
        np.testing.assert_allclose(got, _nested_reference(x, k), rtol=1e-6, err_msg=f"k={k}")


def test_nested_loop_inside_cond_fp16_profiles():
    require_kernels("squeeze", "identity")
    ml = convert_program(_nested_program("iOS17"), precision="fp16")
    x = np.array([1.0, -2.0, 0.25], np.float32)
    want = _nested_reference(x, 3)
    for cu in FP16_PROFILES:
        got = next(iter(EmulatedModel(ml, cu).predict({"x": x, "k": np.array([3], np.int32)}).values()))
        np.testing.assert_allclose(got, want, rtol=FP16_RTOL, atol=1e-3, err_msg=cu)


def test_nested_blocks_visible_in_compiled_steps():
    require_kernels("squeeze", "identity")
    ml = convert_program(_nested_program("iOS17"))
    kinds = [s.op.op_type for s in EmulatedModel(ml).ops()]
    # the cond inside the loop inside the cond is compiled and runs
    assert kinds.count("cond") == 2 and kinds.count("while_loop") == 1


def test_nested_ops_reach_the_predict_on_op_callback():
    require_kernels("squeeze", "identity")
    ml = convert_program(_nested_program("iOS17"))
    seen = []
    EmulatedModel(ml).predict({"x": np.ones(3, np.float32), "k": np.array([2], np.int32)},
                              on_op=lambda r: seen.append(r.op_type))
    assert "cond" in seen and "while_loop" in seen, "ops inside nested blocks reach the callback"
    assert "mod" in seen and seen.count("cond") >= 3


# ----------------------------------------------------------------------------- select


class Where(torch.nn.Module):
    def forward(self, x, y):
        return torch.where(x > 0.1, x * 2.0, y)


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
@pytest.mark.parametrize("yshape", [(2, 3, 4), (1, 4), (3, 1)])
def test_select_broadcast(target, yshape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, generator=g)
    y = torch.randn(*yshape, generator=g)
    check_torch_op(Where(), [x, y], expect_ops={"select"}, rtol=1e-6, target=target)


def test_select_mil_int_and_bool():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.int32)], opset_version=ct.target.iOS17)
    def prog(a):
        c = mb.greater(x=a, y=0)
        ints = mb.select(cond=c, a=a, b=np.int32(-7))
        bools = mb.select(cond=c, a=np.array([[False], [True]]), b=np.array([True, False, True]))
        return ints, bools

    ml = convert_program(prog)
    a = np.array([[3, -1, 0], [5, 2, -9]], np.int32)
    out = EmulatedModel(ml).predict({"a": a})
    ints, bools = out.values()
    np.testing.assert_array_equal(ints, np.where(a > 0, a, -7))
    assert ints.dtype == np.int32
    want_b = np.where(a > 0, np.array([[False], [True]]), np.array([True, False, True]))
    np.testing.assert_array_equal(bools, want_b)


# ----------------------------------------------------------------------------- lists


@pytest.mark.parametrize("n,precision,cu", [
    (0, "fp32", "CPU_ONLY"), (1, "fp32", "CPU_ONLY"), (4, "fp32", "CPU_ONLY"),
    (0, "fp16", "CPU_AND_GPU"), (4, "fp16", "CPU_AND_GPU"), (4, "fp16", "CPU_AND_NE"),
])
def test_list_write_in_loop_then_gather_read_length(n, precision, cu):
    require_kernels("squeeze")

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3)), mb.TensorSpec(shape=(1,), dtype=types.int32)],
                opset_version=ct.target.iOS17)
    def prog(x, k):
        ls = mb.make_list(init_length=1, elem_shape=[2, 3], dtype="fp32", dynamic_length=True)
        k0 = mb.squeeze(x=k)

        def c(i, y, l):
            return mb.less(x=i, y=k0)

        def b(i, y, l):
            y2 = mb.add(x=mb.mul(x=y, y=0.5), y=1.0)
            return mb.add(x=i, y=1), y2, mb.list_write(ls=l, index=i, value=y2)

        _, y, l = mb.while_loop(_cond=c, _body=b, loop_vars=(np.int32(0), x, ls))
        return (y, mb.list_length(ls=l), mb.list_gather(ls=l, indices=[0, 0]),
                mb.list_read(ls=l, index=0))

    ml = convert_program(prog, precision=precision)
    x = np.array([[1, 2, 3], [-4, 0.5, 8]], np.float32)
    out = list(EmulatedModel(ml, cu).predict({"x": x, "k": np.array([n], np.int32)}).values())
    y, length, gathered, first = out
    steps, cur = [], x.astype(np.float64)
    for _ in range(n):
        cur = cur * 0.5 + 1.0
        steps.append(cur)
    rtol = 1e-6 if precision == "fp32" else 2e-3  # FP16: values of a few units, one rounding per op
    np.testing.assert_allclose(y, cur, rtol=rtol)
    assert int(length) == max(n, 1)  # init_length 1; writes grow the list
    want_first = steps[0] if steps else np.zeros((2, 3))  # never-written slots read as zeros
    np.testing.assert_allclose(first, want_first, rtol=rtol)
    np.testing.assert_allclose(gathered, np.stack([want_first, want_first]), rtol=rtol)


def test_list_scatter_is_functional_and_reads_zeros():
    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 2))], opset_version=ct.target.iOS17)
    def prog(v):
        ls = mb.make_list(init_length=4, elem_shape=[2], dtype="fp32", dynamic_length=False)
        ls2 = mb.list_scatter(ls=ls, indices=[3, 0, 2], value=v)
        ls3 = mb.list_write(ls=ls2, index=1, value=mb.mul(x=mb.list_read(ls=ls2, index=0), y=10.0))
        # ls2 must be unchanged by the later write
        return mb.list_gather(ls=ls2, indices=[0, 1, 2, 3]), mb.list_gather(ls=ls3, indices=[1, 3])

    ml = convert_program(prog)
    v = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    before, after = EmulatedModel(ml).predict({"v": v}).values()
    np.testing.assert_array_equal(before, np.array([[3, 4], [0, 0], [5, 6], [1, 2]], np.float32))
    np.testing.assert_array_equal(after, np.array([[30, 40], [1, 2]], np.float32))


def test_list_read_out_of_range_names_the_op():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2,))], opset_version=ct.target.iOS17)
    def prog(x):
        ls = mb.make_list(init_length=2, elem_shape=[2], dtype="fp32", dynamic_length=False)
        ls = mb.list_write(ls=ls, index=0, value=x)
        return mb.list_read(ls=ls, index=5, name="bad_read")

    ml = convert_program(prog)
    with pytest.raises(OpExecutionError, match="bad_read.*index.*5"):
        EmulatedModel(ml).predict({"x": np.ones(2, np.float32)})
