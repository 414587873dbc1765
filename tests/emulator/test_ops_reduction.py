"""Emulator kernels for reductions: reduce_*, reduce_argmax/argmin and cumsum.

Torch models are used where the torch frontend emits the op; the other ops
(reduce_prod, reduce_l1_norm, reduce_log_sum, reduce_sum_square, cumsum's
exclusive/reverse, argmax's iOS17 output_dtype) are built with the MIL builder
and checked against numpy references written from the op docstrings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opcheck import (
    FP16_PROFILES,
    FakeOpCall,
    Fn,
    as_core_ml_shape,
    check_torch_op,
    check_unary_mil,
    convert_torch,
    convert_unary_mil,
    feeds,
    op_types,
    run_unary,
)

from coreml_lab.emulator import EmulatedModel, ne_fp16_accumulation


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _distinct(*shape, seed=0):
    """Distinct values exactly representable in FP16 (no ties, no rounding flips for arg ops)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return (torch.randperm(n, generator=g).float() / 4 - n / 8).reshape(shape)


def _np_axes(axes, rank):
    return None if axes is None else tuple(a % rank for a in axes)


# ----------------------------------------------------------------------------- torch-converted ops

SUM_DIMS = [
    (None, False),          # x.sum(): axes absent -> every dim
    ((1,), False),
    ((-1,), True),          # negative axis, keep_dims
    ((0, 2), False),
    ((-3, -1), True),
]


@pytest.mark.parametrize("dims,keep", SUM_DIMS)
def test_reduce_sum(dims, keep):
    fn = (lambda x: x.sum()) if dims is None else (lambda x: x.sum(dim=dims, keepdim=keep))
    check_torch_op(Fn(fn), [_randn(2, 4, 3, 5)], ["reduce_sum"], atol=1e-5)


def test_reduce_sum_ios15():
    check_torch_op(Fn(lambda x: x.sum(dim=1)), [_randn(2, 4, 3)], ["reduce_sum"], target="iOS15")


@pytest.mark.parametrize("dims,keep", SUM_DIMS)
def test_reduce_mean(dims, keep):
    fn = (lambda x: x.mean()) if dims is None else (lambda x: x.mean(dim=dims, keepdim=keep))
    check_torch_op(Fn(fn), [_randn(2, 4, 3, 5, seed=1)], ["reduce_mean"])


@pytest.mark.parametrize("which", ["max", "min"])
@pytest.mark.parametrize("dims,keep", [(None, False), ((2,), False), ((-1, 1), True)])
def test_reduce_max_min(which, dims, keep):
    if dims is None:
        fn = (lambda x: x.max()) if which == "max" else (lambda x: x.min())
    elif which == "max":
        fn = lambda x: x.amax(dim=dims, keepdim=keep)
    else:
        fn = lambda x: x.amin(dim=dims, keepdim=keep)
    check_torch_op(Fn(fn), [_randn(2, 4, 3, 5, seed=2)], [f"reduce_{which}"], rtol=0, atol=0)


@pytest.mark.parametrize("which", ["argmax", "argmin"])
@pytest.mark.parametrize("dim,keep,target", [(1, False, "iOS17"), (-1, True, "iOS17"), (2, False, "iOS15")])
def test_reduce_argmax_argmin(which, dim, keep, target):
    fn = (lambda x: x.argmax(dim=dim, keepdim=keep)) if which == "argmax" else \
        (lambda x: x.argmin(dim=dim, keepdim=keep))
    ml = check_torch_op(Fn(fn), [_distinct(2, 4, 3, 5, seed=3)], [f"reduce_{which}"], rtol=0, atol=0,
                        target=target)
    out = EmulatedModel(ml).predict(feeds([_distinct(2, 4, 3, 5, seed=3)]))
    assert next(iter(out.values())).dtype == np.int32


@pytest.mark.parametrize("dim,keep", [(1, False), ((-1, 0), True)])
def test_reduce_l2_norm(dim, keep):
    check_torch_op(Fn(lambda x: torch.linalg.vector_norm(x, dim=dim, keepdim=keep)),
                   [_randn(2, 4, 3, seed=4)], ["reduce_l2_norm"])


def test_reduce_l2_norm_all_axes():
    check_torch_op(Fn(lambda x: torch.norm(x)), [_randn(3, 4, seed=5)], ["reduce_l2_norm"])


@pytest.mark.parametrize("dim,keep,target", [(1, False, "iOS17"), ((-1, 0), True, "iOS17"), (2, False, "iOS15")])
def test_reduce_log_sum_exp(dim, keep, target):
    x = _randn(2, 4, 3, 5, seed=6) * 3
    check_torch_op(Fn(lambda x: torch.logsumexp(x, dim=dim, keepdim=keep)), [x], ["reduce_log_sum_exp"],
                   target=target)


def test_reduce_log_sum_exp_large_inputs_are_stable_off_the_ne():
    # far beyond exp overflow in FP32 (x ~ 88) and FP16 (x ~ 11): the max-shifted formula stays finite
    x = _randn(2, 6, seed=7) + torch.tensor([100.0, -100.0]).reshape(2, 1)
    check_torch_op(Fn(lambda x: torch.logsumexp(x, dim=1)), [x], ["reduce_log_sum_exp"],
                   compute_units=("CPU_AND_GPU",))


@pytest.mark.parametrize("dim", [0, 2, -1])
def test_cumsum(dim):
    check_torch_op(Fn(lambda x: torch.cumsum(x, dim=dim)), [_randn(3, 4, 5, seed=8)], ["cumsum"], atol=1e-5)


# ----------------------------------------------------------------------------- Neural Engine hazard


@pytest.mark.parametrize("value", [8.0, 7.5])
def test_reduce_log_sum_exp_ne_overflow_hazard(value):
    """apple/coremltools#2690: the NE sums exp(x) in FP16 without the max shift; 32 channels at
    x=8 overflow (32*e^8 ~ 95,000 > 65504) and the NE returns 0; x=7.5 stays below the cliff."""
    x = torch.full((1, 32, 2, 2), value)
    model = Fn(lambda x: torch.logsumexp(x, dim=1))
    ml = convert_torch(model, [x], "fp16")
    assert "reduce_log_sum_exp" in op_types(ml)
    want = value + math.log(32)
    for cu in ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"):
        got = next(iter(EmulatedModel(ml, cu).predict(feeds([x])).values())).astype(np.float64)
        if cu == "CPU_AND_NE" and value == 8.0:
            np.testing.assert_array_equal(got, 0.0, err_msg=cu)
        else:
            np.testing.assert_allclose(got, want, rtol=2e-3, err_msg=cu)


def test_reduce_log_sum_exp_hazard_only_on_fp16_ne():
    # the FP32 program never reaches the NE (barred from FP32 ops): correct everywhere
    x = torch.full((1, 32, 2, 2), 8.0)
    ml = convert_torch(Fn(lambda x: torch.logsumexp(x, dim=1)), [x], "fp32")
    got = next(iter(EmulatedModel(ml, "CPU_AND_NE").predict(feeds([x])).values()))
    np.testing.assert_allclose(got, 8.0 + math.log(32), rtol=1e-6)


# ----------------------------------------------------------------------------- accumulation


def _pairwise_fp16(v: np.ndarray) -> np.float16:
    """Reference: pairwise tree over a 1-d array, every partial sum rounded to FP16."""
    v = v.astype(np.float16)
    while v.size > 1:
        if v.size % 2:
            v = np.append(v, np.float16(0))
        v = (v[0::2] + v[1::2]).astype(np.float16)
    return v[0]


def _sum_model(n):
    # iOS15: FP32 model inputs/outputs with casts around the FP16 reduce_sum, so what CPU_ONLY
    # holds in FP32 reaches the output unrounded (iOS17 FP16 programs have FP16 outputs)
    x = torch.ones(n)
    ml = convert_torch(Fn(lambda x: x.sum()), [x], "fp16", target="iOS15")
    assert "reduce_sum" in op_types(ml)
    return ml


def test_fp16_sum_of_10000_ones():
    # "ne" is the FP16-accumulating Neural Engine variant (the calibrated NE accumulates wide:
    # tests/emulator/test_device_facts.py)
    ml = _sum_model(10000)
    assert "reduce_sum" in op_types(ml)
    x = torch.ones(10000)
    gpu = next(iter(EmulatedModel(ml, "CPU_AND_GPU").predict(feeds([x])).values()))
    ne = next(iter(EmulatedModel(ml, ne_fp16_accumulation()).predict(feeds([x])).values()))
    assert float(gpu) == 10000.0  # FP32 accumulation, 10000 is representable in FP16
    # FP16 pairwise: every partial sum is a power-of-two count or an exact remainder -> 10000
    # (a sequential FP16 running sum would stall at 2048)
    assert float(ne) == float(_pairwise_fp16(np.ones(10000))) == 10000.0


def test_fp16_sum_random_matches_references():
    v = np.random.default_rng(0).uniform(0, 4, size=10000).astype(np.float16)
    ml = _sum_model(10000)
    x = torch.from_numpy(v.astype(np.float32))
    gpu = float(next(iter(EmulatedModel(ml, "CPU_AND_GPU").predict(feeds([x])).values())))
    ne = float(next(iter(EmulatedModel(ml, ne_fp16_accumulation()).predict(feeds([x])).values())))
    assert gpu == float(np.float16(np.sum(v.astype(np.float64))))  # FP32 sum, one rounding to FP16
    assert ne == float(_pairwise_fp16(v))                            # FP16 pairwise tree


def test_fp16_sum_accumulation_differs_between_gpu_and_ne():
    # 2048 + 1 rounds back to 2048 in FP16 (spacing 2, ties to even): the FP16-accumulating NE
    # variant's pairwise tree gives (2048 + 1) + (1 + 1) = 2050, FP32 accumulation gives 2051 -> 2052.
    v = np.array([2048, 1, 1, 1], dtype=np.float32)
    ml = _sum_model(4)
    x = torch.from_numpy(v)
    gpu = float(next(iter(EmulatedModel(ml, "CPU_AND_GPU").predict(feeds([x])).values())))
    ne = float(next(iter(EmulatedModel(ml, ne_fp16_accumulation()).predict(feeds([x])).values())))
    cpu = float(next(iter(EmulatedModel(ml, "CPU_ONLY").predict(feeds([x])).values())))
    assert (cpu, gpu, ne) == (2051.0, 2052.0, 2050.0)
    assert ne == float(_pairwise_fp16(v))


def test_fp16_sum_overflow():
    x = torch.full((10000,), 10.0)  # true sum 100,000 > 65504
    ml = _sum_model(10000)
    cpu = float(next(iter(EmulatedModel(ml, "CPU_ONLY").predict(feeds([x])).values())))
    assert cpu == 100000.0  # CPU runs FP16-typed ops in FP32
    for cu in FP16_PROFILES:
        got = float(next(iter(EmulatedModel(ml, cu).predict(feeds([x])).values())))
        assert math.isinf(got) and got > 0, cu


# ----------------------------------------------------------------------------- builder-only ops

AXES_VARIANTS = [
    (None, False),
    (None, True),
    ([1], False),
    ([-1], True),
    ([0, -1], False),
]


@pytest.mark.parametrize("axes,keep", AXES_VARIANTS)
def test_reduce_prod(axes, keep):
    x = np.random.default_rng(1).uniform(0.6, 1.6, size=(2, 3, 4)).astype(np.float32)
    ref = np.prod(x.astype(np.float64), axis=_np_axes(axes, 3), keepdims=keep)
    check_unary_mil(lambda v: mb.reduce_prod(x=v, axes=axes, keep_dims=keep), x, ref, "reduce_prod")


@pytest.mark.parametrize("axes,keep", AXES_VARIANTS)
def test_reduce_l1_norm(axes, keep):
    x = np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32)
    ref = np.sum(np.abs(x.astype(np.float64)), axis=_np_axes(axes, 3), keepdims=keep)
    check_unary_mil(lambda v: mb.reduce_l1_norm(x=v, axes=axes, keep_dims=keep), x, ref, "reduce_l1_norm")


@pytest.mark.parametrize("axes,keep", AXES_VARIANTS)
def test_reduce_log_sum(axes, keep):
    x = np.random.default_rng(3).uniform(0.1, 2.0, size=(2, 3, 4)).astype(np.float32)
    ref = np.log(np.sum(x.astype(np.float64), axis=_np_axes(axes, 3), keepdims=keep))
    check_unary_mil(lambda v: mb.reduce_log_sum(x=v, axes=axes, keep_dims=keep), x, ref, "reduce_log_sum")


@pytest.mark.parametrize("axes,keep", AXES_VARIANTS)
def test_reduce_sum_square(axes, keep):
    x = np.random.default_rng(4).normal(size=(2, 3, 4)).astype(np.float32)
    ref = np.sum(np.square(x.astype(np.float64)), axis=_np_axes(axes, 3), keepdims=keep)
    check_unary_mil(lambda v: mb.reduce_sum_square(x=v, axes=axes, keep_dims=keep), x, ref,
                    "reduce_sum_square")


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_reduce_log_sum_exp_builder_ios15_and_17(target):
    x = np.random.default_rng(5).normal(size=(3, 5)).astype(np.float32) * 4
    x64 = x.astype(np.float64)
    m = x64.max(axis=0, keepdims=True)
    ref = (np.log(np.exp(x64 - m).sum(axis=0, keepdims=True)) + m)
    check_unary_mil(lambda v: mb.reduce_log_sum_exp(x=v, axes=[-2], keep_dims=True), x, ref,
                    "reduce_log_sum_exp", target=target)


def _np_cumsum(x, axis, exclusive, reverse):
    """Docstring semantics: inclusive/exclusive running sum, optionally from the end."""
    y = np.flip(x, axis) if reverse else x
    c = np.cumsum(y, axis=axis)
    if exclusive:
        c = c - y
    return np.flip(c, axis) if reverse else c


@pytest.mark.parametrize("exclusive,reverse", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("axis", [0, -1])
def test_cumsum_exclusive_reverse(axis, exclusive, reverse):
    x = np.random.default_rng(6).normal(size=(3, 4, 5)).astype(np.float32)
    ref = _np_cumsum(x.astype(np.float64), axis % 3, exclusive, reverse)
    check_unary_mil(lambda v: mb.cumsum(x=v, axis=axis, exclusive=exclusive, reverse=reverse), x, ref,
                    "cumsum", target="iOS15" if exclusive else "iOS17")


def test_cumsum_exclusive_first_element_is_zero():
    x = np.arange(1, 6, dtype=np.float32)
    got = run_unary(convert_unary_mil(lambda v: mb.cumsum(x=v, axis=0, exclusive=True), x.shape), x)
    np.testing.assert_array_equal(got, [0, 1, 3, 6, 10])
    got = run_unary(convert_unary_mil(lambda v: mb.cumsum(x=v, axis=0, exclusive=True, reverse=True), x.shape), x)
    np.testing.assert_array_equal(got, [14, 12, 9, 5, 0])


def test_cumsum_int32_exact():
    x = np.array([2 ** 24, 1, 1, -3], dtype=np.int32)
    ml = convert_unary_mil(lambda v: mb.cumsum(x=v, axis=0), x.shape, dtype=types.int32)
    got = run_unary(ml, x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.cumsum(x.astype(np.int64)))  # 2**24 + 1 is not an fp32


def test_reduce_sum_int32_exact():
    x = np.array([[2 ** 24, 1], [7, -2]], dtype=np.int32)
    ml = convert_unary_mil(lambda v: mb.reduce_sum(x=v, axes=[1]), x.shape, dtype=types.int32)
    got = run_unary(ml, x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [2 ** 24 + 1, 5])


def test_reduce_mean_int32_truncates():
    x = np.array([[1, 2], [-1, -2], [3, 4]], dtype=np.int32)
    ml = convert_unary_mil(lambda v: mb.reduce_mean(x=v, axes=[1]), x.shape, dtype=types.int32)
    np.testing.assert_array_equal(run_unary(ml, x), [1, -1, 3])  # 1.5, -1.5, 3.5 truncated toward zero


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
@pytest.mark.parametrize("op", ["reduce_argmax", "reduce_argmin"])
def test_arg_ties_return_first_index(op, target):
    x = np.array([[1, 5, 5, 0], [3, 3, 3, 3], [2, 0, 0, 2]], dtype=np.float32)
    ml = convert_unary_mil(lambda v: getattr(mb, op)(x=v, axis=1), x.shape, target)
    want = [1, 0, 0] if op == "reduce_argmax" else [3, 0, 1]
    np.testing.assert_array_equal(run_unary(ml, x), want)
    ml16 = convert_unary_mil(lambda v: getattr(mb, op)(x=v, axis=1), x.shape, target, "fp16")
    for cu in FP16_PROFILES:
        np.testing.assert_array_equal(run_unary(ml16, x, cu), want, err_msg=cu)


@pytest.mark.parametrize("output_dtype", ["int32", "uint16"])
def test_argmax_ios17_output_dtype(output_dtype):
    x = _distinct(2, 3, 6, seed=9).numpy()
    ml = convert_unary_mil(lambda v: mb.reduce_argmax(x=v, axis=-1, keep_dims=True, output_dtype=output_dtype),
                           x.shape, "iOS17")
    seen = []
    out = EmulatedModel(ml).predict({"x": x}, on_op=lambda r: seen.append((r.op_type, r.dtype)))
    # the op really declares output_dtype; Core ML has no uint16 outputs, so the converter
    # appends a cast to int32 for the model output
    assert ("reduce_argmax", output_dtype) in seen
    got = next(iter(out.values()))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1)[..., None])


def test_argmin_default_axis_is_last():
    x = _distinct(3, 7, seed=10).numpy()
    ml = convert_unary_mil(lambda v: mb.reduce_argmin(x=v), x.shape, "iOS15")
    np.testing.assert_array_equal(run_unary(ml, x), np.argmin(x, axis=-1))


# ----------------------------------------------------------------------------- property tests

_NP_REDUCE = {
    "reduce_sum": np.sum,
    "reduce_mean": np.mean,
    "reduce_max": np.max,
    "reduce_prod": np.prod,
}


@st.composite
def _reduction_case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    rank = len(shape)
    if draw(st.booleans()):
        axes = None
    else:
        chosen = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
        axes = [a - rank if draw(st.booleans()) else a for a in chosen]
    keep = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return shape, axes, keep, seed


def _property_check(op, case):
    shape, axes, keep, seed = case
    g = np.random.default_rng(seed)
    if op == "reduce_prod":
        x = g.uniform(0.7, 1.4, size=shape).astype(np.float32)
    else:
        x = g.normal(size=shape).astype(np.float32)
    ref = as_core_ml_shape(_NP_REDUCE[op](x.astype(np.float64), axis=_np_axes(axes, len(shape)), keepdims=keep))
    kwargs = {"keep_dims": keep} if axes is None else {"axes": axes, "keep_dims": keep}
    ml = convert_unary_mil(lambda v: getattr(mb, op)(x=v, **kwargs), shape)
    got = np.asarray(run_unary(ml, x))
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=1e-5, atol=1e-5)


_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow  # property tests over many shapes: make test-slow
@pytest.mark.parametrize("op", sorted(_NP_REDUCE))
@_SETTINGS
@given(case=_reduction_case())
def test_reduction_property(op, case):
    _property_check(op, case)


# ----------------------------------------------------------------------------- bad parameters


def _kernel(op_type):
    from coreml_lab.emulator.registry import lookup
    k = lookup(op_type)
    assert k is not None and k.family == "reduction"
    return k.fn


@pytest.mark.parametrize("op_type,values,words", [
    ("reduce_sum", {"axes": [3]}, ["'axes'", "3"]),
    ("reduce_max", {"axes": [-4]}, ["'axes'", "-4"]),
    ("reduce_argmax", {"axis": 0, "output_dtype": "int8"}, ["'output_dtype'", "int8", "uint16"]),
    ("reduce_argmin", {"axis": 5}, ["'axis'", "5"]),
    ("cumsum", {"axis": -4}, ["'axis'", "-4"]),
])
def test_bad_parameters_raise_value_error(op_type, values, words):
    call = FakeOpCall(op_type, {"x": torch.zeros(2, 3, 4)}, **values)
    with pytest.raises(ValueError) as info:
        _kernel(op_type)(call)
    for w in words:
        assert w in str(info.value)
    assert op_type in str(info.value)


def test_empty_axes_reduce_nothing():
    # MIL keeps x's shape for axes=[] (nothing reduced); torch.sum(dim=[]) would reduce everything
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2
    for op_type, want in [("reduce_sum", x), ("reduce_prod", x), ("reduce_max", x), ("reduce_mean", x),
                          ("reduce_l2_norm", x.abs()), ("reduce_sum_square", x * x),
                          ("reduce_log_sum_exp", x)]:
        got = _kernel(op_type)(FakeOpCall(op_type, {"x": x}, axes=[], keep_dims=False))
        torch.testing.assert_close(got.float(), want, msg=op_type)
