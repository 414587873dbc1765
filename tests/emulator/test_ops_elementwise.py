"""Elementwise kernels (coreml_lab/emulator/ops/elementwise.py) against torch and numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from hypothesis import given, settings
from hypothesis import strategies as st
from opcheck import Fn, check_mil, check_torch_op, convert_mil, convert_torch, feeds, mil_outputs, op_types

from coreml_lab.emulator import EmulatedModel


def _gen(seed):
    return torch.Generator().manual_seed(seed)


SHAPE = (2, 3, 4)


def normal(scale=2.0, seed=0, shape=SHAPE):
    return torch.randn(*shape, generator=_gen(seed)) * scale


def uniform(lo, hi, seed=0, shape=SHAPE):
    return torch.rand(*shape, generator=_gen(seed)) * (hi - lo) + lo


def off_integer(seed=0, shape=SHAPE):
    """Values at least 0.1 away from any integer: floor/ceil/trunc agree after FP16 rounding."""
    g = _gen(seed)
    return torch.randint(-6, 6, shape, generator=g).float() + torch.rand(*shape, generator=g) * 0.8 + 0.1


def grid(seed=0, shape=SHAPE, nonzero=False):
    """Multiples of 0.5 in [-3, 3] (exact in FP16, so equalities survive FP16 conversion)."""
    v = torch.randint(-6, 7, shape, generator=_gen(seed)).float() / 2
    if nonzero:
        v = torch.where(v == 0, torch.full_like(v, 1.5), v)
    return v


def ints(lo=-7, hi=8, seed=0, shape=SHAPE, nonzero=False):
    v = torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int32)
    if nonzero:
        v = torch.where(v == 0, torch.full_like(v, 3), v)
    return v


# ----------------------------------------------------------------------------- unary, torch-converted

UNARY = {
    # op: (torch fn, input)
    "abs": (torch.abs, normal()),
    "acos": (torch.acos, uniform(-0.9, 0.9)),
    "asin": (torch.asin, uniform(-0.9, 0.9)),
    "atan": (torch.atan, normal(3.0)),
    "atanh": (torch.atanh, uniform(-0.9, 0.9)),
    "ceil": (torch.ceil, off_integer()),
    "cos": (torch.cos, normal()),
    "cosh": (torch.cosh, normal()),
    "erf": (torch.erf, normal(1.0)),
    "exp": (torch.exp, normal()),
    "exp2": (torch.exp2, normal()),
    "floor": (torch.floor, off_integer()),
    "log": (torch.log, uniform(0.05, 20.0)),
    "rsqrt": (torch.rsqrt, uniform(0.05, 20.0)),
    "sign": (torch.sign, grid()),  # grid: includes exact zeros
    "sin": (torch.sin, normal()),
    "sinh": (torch.sinh, normal()),
    "sqrt": (torch.sqrt, uniform(0.0, 20.0)),
    "tan": (torch.tan, uniform(-1.2, 1.2)),
    "tanh": (torch.tanh, normal()),
}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary_float(op):
    fn, x = UNARY[op]
    check_torch_op(Fn(fn), [x], [op])


@pytest.mark.parametrize("op", ["abs", "sign"])
def test_unary_int32(op):
    check_torch_op(Fn(getattr(torch, op)), [ints()], [op])


def test_round_half_to_even():
    # MIL: "0.5 is rounded to 0" - ties go to the even neighbour, like torch.round / np.round
    x = torch.tensor([[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.3, -0.7, 2.2, 4.6, -3.4]])
    ml = check_torch_op(Fn(torch.round), [x], ["round"])
    got = next(iter(EmulatedModel(ml, "CPU_ONLY").predict(feeds([x])).values()))
    np.testing.assert_array_equal(got[0, :7], [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0])


def test_reciprocal_becomes_inverse_with_epsilon():
    # The torch frontend converts torch.reciprocal to MIL inverse with the default epsilon 1e-4:
    # y = 1 / (x + 1e-4), not 1 / x. The emulator follows the MIL op.
    x = uniform(0.5, 2.0)
    ml = convert_torch(Fn(torch.reciprocal), [x])
    assert "inverse" in op_types(ml)
    got = next(iter(EmulatedModel(ml, "CPU_ONLY").predict(feeds([x])).values()))
    xv = x.numpy()
    np.testing.assert_allclose(got, 1.0 / (xv + np.float32(1e-4)), rtol=1e-6)
    assert np.max(np.abs(got * xv - 1.0)) > 2e-5  # measurably not 1/x


def test_inverse_torch_large_inputs():
    # |x| >= 20: the 1e-4 epsilon changes 1/x by < 5e-6 relative, inside rtol 1e-5
    x = uniform(20.0, 50.0) * torch.where(normal() > 0, 1.0, -1.0)
    check_torch_op(Fn(torch.reciprocal), [x], ["inverse"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_clip(target):
    check_torch_op(Fn(lambda x: torch.clamp(x, -0.75, 1.25)), [normal()], ["clip"], target=target)


def test_threshold_torch():
    check_torch_op(Fn(lambda x: F.threshold(x, 0.5, 0.0)), [normal()], ["threshold"])


def test_logical_not():
    check_torch_op(Fn(lambda x: torch.logical_not(x > 0).float()), [grid()], ["logical_not"])


# ----------------------------------------------------------------------------- unary, builder


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
@pytest.mark.parametrize("epsilon", [None, 0.5])
def test_inverse_builder(target, epsilon):
    x = uniform(0.2, 3.0).numpy()
    eps = 1e-4 if epsilon is None else epsilon
    kw = {} if epsilon is None else {"epsilon": np.float32(epsilon)}
    check_mil(lambda v: mb.inverse(x=v, **kw), [x], lambda v: 1.0 / (v + eps), "inverse", target=target)


@pytest.mark.parametrize("op,fn,domain", [
    ("log", lambda v, e: np.log(v + e), (0.0, 5.0)),
    ("rsqrt", lambda v, e: 1.0 / np.sqrt(v + e), (0.0, 5.0)),
    ("inverse", lambda v, e: 1.0 / (v + e), (0.0, 5.0)),
])
def test_epsilon_fp16_parameter_ios17(op, fn, domain):
    # iOS17: epsilon may be FP16 while x is FP32; epsilon = 0.25 also makes x = 0 finite
    x = np.concatenate([[0.0], uniform(*domain).numpy().reshape(-1)]).astype(np.float32)[None]
    ml = check_mil(lambda v: getattr(mb, op)(x=v, epsilon=np.float16(0.25)), [x], lambda v: fn(v, 0.25), op,
                   passes=False, fp16=False)
    main = ml._mil_program.functions["main"]
    the_op = next(o for o in main.operations if o.op_type == op)
    assert types.builtin_to_string(the_op.epsilon.dtype) == "fp16"


def test_square():
    x = normal().numpy()
    check_mil(lambda v: mb.square(x=v), [x], np.square, "square")
    xi = ints().numpy()
    check_mil(lambda v: mb.square(x=v), [xi], np.square, "square", exact=True, fp16=False)


def test_threshold_builder_float_and_int():
    x = normal().numpy()
    check_mil(lambda v: mb.threshold(x=v, alpha=np.float32(0.3)), [x], lambda v: np.maximum(v, 0.3), "threshold")
    xi = ints().numpy()
    check_mil(lambda v: mb.threshold(x=v, alpha=np.int32(-2)), [xi], lambda v: np.maximum(v, -2), "threshold",
              exact=True, fp16=False)


def test_exp2_int32():
    xi = ints(0, 20).numpy()
    check_mil(lambda v: mb.exp2(x=v), [xi], lambda v: (2 ** v).astype(np.int32), "exp2", exact=True, fp16=False)


def test_sign_zero_and_int():
    x = np.array([[-2.0, -0.0, 0.0, 3.5]], dtype=np.float32)
    check_mil(lambda v: mb.sign(x=v), [x], np.sign, "sign", exact=True)


# ----------------------------------------------------------------------------- cast


def test_cast_float_to_int32_truncates():
    x = off_integer() * 3
    ml = check_torch_op(Fn(lambda v: v.to(torch.int32)), [x], ["cast"])
    got = next(iter(EmulatedModel(ml, "CPU_ONLY").predict(feeds([x])).values()))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.trunc(x.numpy()).astype(np.int32))


def test_cast_int32_to_float():
    check_torch_op(Fn(lambda v: v.float() * 0.5), [ints()], ["cast"])


def test_cast_to_bool():
    check_torch_op(Fn(lambda v: v.bool().float()), [grid()], ["cast"])


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
def test_cast_ios17_small_ints_wrap_like_numpy(dtype):
    x = np.array([[-70000, -300, -129, -1, 0, 1, 127, 128, 255, 256, 40000, 70000]], dtype=np.int32)
    # a small-int output is cast back to int32 for the model output (Core ML cannot output them)
    check_mil(lambda v: mb.cast(x=v, dtype=dtype), [x],
              lambda v: v.astype(np.dtype(dtype)).astype(np.int32), "cast", exact=True, fp16=False, passes=False)


def test_cast_ios15_fp32_to_fp16_rounds_on_gpu_and_ne_only():
    x = np.array([[1.0 + 2 ** -12, 0.1, 65519.0, 70000.0]], dtype=np.float32)

    def build(v):
        return mb.cast(x=mb.cast(x=v, dtype="fp16"), dtype="fp32")

    ml = convert_mil(build, [x], "iOS15", passes=False)
    (cpu,) = mil_outputs(ml, [x], "CPU_ONLY")   # CPU runs FP16-typed ops in FP32: no rounding
    np.testing.assert_array_equal(cpu, x)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)  # 70000 -> inf
    for cu in ("CPU_AND_GPU", "CPU_AND_NE"):
        (got,) = mil_outputs(ml, [x], cu)
        np.testing.assert_array_equal(got, want, err_msg=cu)


# ----------------------------------------------------------------------------- binary, torch-converted

BINARY_FLOAT = {
    "add": (torch.add, normal(), normal(seed=1)),
    "sub": (torch.sub, normal(), normal(seed=1)),
    "mul": (torch.mul, normal(), normal(seed=1)),
    "real_div": (torch.div, normal(), uniform(0.5, 3.0, seed=1)),
    "maximum": (torch.maximum, grid(), grid(seed=1)),
    "minimum": (torch.minimum, grid(), grid(seed=1)),
    "pow": (torch.pow, uniform(0.1, 3.0), normal(1.0, seed=1)),
    "floor_div": (torch.floor_divide, grid() * 2, grid(seed=1, nonzero=True)),
}


@pytest.mark.parametrize("op", sorted(BINARY_FLOAT))
def test_binary_float(op):
    fn, x, y = BINARY_FLOAT[op]
    check_torch_op(Fn(fn), [x, y], [op])


def test_binary_broadcast_torch():
    check_torch_op(Fn(lambda a, b: a * b + b), [normal(shape=(2, 1, 4)), normal(seed=1, shape=(3, 1))],
                   ["mul", "add"], target="iOS15")


BINARY_INT = {
    "add": (torch.add, ints(), ints(seed=1)),
    "sub": (torch.sub, ints(), ints(seed=1)),
    "mul": (torch.mul, ints(), ints(seed=1)),
    "maximum": (torch.maximum, ints(), ints(seed=1)),
    "minimum": (torch.minimum, ints(), ints(seed=1)),
    "pow": (torch.pow, ints(-3, 4), ints(0, 5, seed=1)),
    "floor_div": (torch.floor_divide, ints(-20, 20), ints(seed=1, nonzero=True)),
}


@pytest.mark.parametrize("op", sorted(BINARY_INT))
def test_binary_int32(op):
    fn, x, y = BINARY_INT[op]
    check_torch_op(Fn(fn), [x, y], [op])


def test_remainder_torch():
    # torch.remainder converts to x - floor_div(x, y) * y; sign follows the divisor
    check_torch_op(Fn(torch.remainder), [grid() * 3, grid(seed=1, nonzero=True)], ["floor_div", "mul", "sub"])
    check_torch_op(Fn(torch.remainder), [ints(-20, 20), ints(seed=1, nonzero=True)], ["floor_div"])


COMPARE = {
    "equal": torch.eq, "not_equal": torch.ne, "greater": torch.gt,
    "greater_equal": torch.ge, "less": torch.lt, "less_equal": torch.le,
}


@pytest.mark.parametrize("op", sorted(COMPARE))
def test_compare(op):
    fn = COMPARE[op]
    x, y = grid(), grid(seed=1)
    assert (x == y).any() and (x != y).any()  # both outcomes present
    check_torch_op(Fn(lambda a, b: fn(a, b).float()), [x, y], [op])
    check_torch_op(Fn(lambda a, b: fn(a, b).int()), [ints(-2, 3), ints(-2, 3, seed=1)], [op], check_fp16=False)


@pytest.mark.parametrize("op,fn", [("logical_and", torch.logical_and), ("logical_or", torch.logical_or),
                                   ("logical_xor", torch.logical_xor)])
def test_logical(op, fn):
    check_torch_op(Fn(lambda a, b: fn(a > 0, b > 0).float()), [grid(), grid(seed=1)], [op])


# ----------------------------------------------------------------------------- binary, builder


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_mod_float_sign_of_divisor(target):
    x = (grid() * 3).numpy()
    y = grid(seed=1, nonzero=True).numpy()
    ml = check_mil(lambda a, b: mb.mod(x=a, y=b), [x, y], np.mod, "mod", target=target)
    (got,) = mil_outputs(ml, [x, y])
    assert ((got == 0) | (np.sign(got) == np.sign(y))).all()


def test_mod_int32():
    x, y = ints(-20, 20).numpy(), ints(seed=1, nonzero=True).numpy()
    check_mil(lambda a, b: mb.mod(x=a, y=b), [x, y], np.mod, "mod", exact=True, fp16=False)


def test_floor_div_int32_rounds_toward_negative_infinity():
    x = np.array([[-7, -7, 7, 7, -1, 0]], dtype=np.int32)
    y = np.array([[2, -2, 2, -2, 3, 5]], dtype=np.int32)
    check_mil(lambda a, b: mb.floor_div(x=a, y=b), [x, y], np.floor_divide, "floor_div", exact=True, fp16=False)


def test_pow_int32_negative_exponent():
    x = np.array([[1, -1, -1, 2, -3, 5, 2]], dtype=np.int32)
    y = np.array([[-3, -2, -3, -1, -2, 0, 10]], dtype=np.int32)
    want = np.array([[1, 1, -1, 0, 0, 1, 1024]], dtype=np.int32)
    check_mil(lambda a, b: mb.pow(x=a, y=b), [x, y], lambda a, b: want, "pow", exact=True, fp16=False)


# ----------------------------------------------------------------------------- FP16 rounding


@pytest.mark.parametrize("op,npfn", [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                                     ("real_div", np.divide), ("maximum", np.maximum)])
def test_fp16_binary_rounds_like_numpy_float16(op, npfn):
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((4, 64)) * 100).astype(np.float32)
    b = (rng.standard_normal((1, 64)) * 3).astype(np.float32)  # broadcast along dim 0
    ml16 = convert_mil(lambda x, y: getattr(mb, op)(x=x, y=y), [a, b], precision="fp16")
    assert op in op_types(ml16)
    with np.errstate(all="ignore"):
        want16 = npfn(a.astype(np.float16), b.astype(np.float16))  # numpy float16 arithmetic
    (ne,) = mil_outputs(ml16, [a, b], "CPU_AND_NE")
    np.testing.assert_array_equal(ne, want16.astype(np.float32))
    if op != "maximum":
        # the GPU computes in FP32 and stores FP16: double rounding would still show as FP16 values,
        # while CPU_ONLY keeps FP32 and must differ from the FP16 result somewhere
        (cpu,) = mil_outputs(ml16, [a, b], "CPU_ONLY")
        assert not np.array_equal(cpu, ne)
        np.testing.assert_array_equal(cpu, npfn(a, b))


# ----------------------------------------------------------------------------- hypothesis: shapes


@st.composite
def broadcast_shapes(draw):
    """Two shapes that broadcast together: ranks 0-4, dims 1-5, at least one of rank >= 1."""
    rank = draw(st.integers(0, 4))
    out = draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank))

    def operand():
        r = draw(st.integers(0, rank))
        dims = out[rank - r:]
        return tuple(d if draw(st.booleans()) else 1 for d in dims)

    x, y = operand(), operand()
    if not x and not y:
        x = (1,)
    return x, y


NP_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum, "real_div": np.divide,
    "greater": np.greater, "equal": np.equal, "less_equal": np.less_equal, "not_equal": np.not_equal,
}


def _operand(shape, dtype, rng, nonzero=False):
    if dtype == "int32":
        v = np.array(rng.integers(-4, 5, size=shape), dtype=np.int32)
        fill = 3
    else:
        v = rng.integers(-6, 7, size=shape) / 2  # grid: equalities occur
        v = np.array(v + (rng.random(shape) < 0.5) * rng.random(shape), dtype=np.float32)
        fill = 1.5
    if nonzero:
        v[v == 0] = fill
    return v


@pytest.mark.slow  # property tests over many shapes: make test-slow
@settings(max_examples=15, deadline=None)
@given(shapes=broadcast_shapes(), op=st.sampled_from(sorted(NP_BINARY)), dtype=st.sampled_from(["fp32", "int32"]),
       seed=st.integers(0, 2 ** 16))
def test_binary_broadcasting_hypothesis(shapes, op, dtype, seed):
    if op == "real_div":
        dtype = "fp32"  # int32 real_div: not produced by frontends, semantics uncertain
    rng = np.random.default_rng(seed)
    xs, ys = shapes
    x = _operand(xs, dtype, rng)
    y = _operand(ys, dtype, rng, nonzero=op == "real_div")
    # rank-0 operands cannot be model inputs: they become constants in the program
    feeds_ = [a for a in (x, y) if a.ndim]
    mil_op = getattr(mb, op)

    def build(*vs):
        it = iter(vs)
        a = next(it) if x.ndim else x[()]
        b = next(it) if y.ndim else y[()]
        return mil_op(x=a, y=b)

    ml = convert_mil(build, feeds_, passes=False)
    assert op in op_types(ml)
    (got,) = mil_outputs(ml, feeds_)
    want = NP_BINARY[op](x, y)
    assert got.shape == want.shape
    if want.dtype != np.bool_:
        assert got.dtype == want.dtype
    # (a bool result may come back cast to a numeric output type: compare values)
    np.testing.assert_array_equal(got, want.astype(got.dtype))


NP_UNARY = {
    "exp": (np.exp, (-5, 5)), "tanh": (np.tanh, (-4, 4)), "abs": (np.abs, (-5, 5)),
    "sqrt": (np.sqrt, (0, 9)), "sin": (np.sin, (-6, 6)), "floor": (np.floor, (-5, 5)),
    "atan": (np.arctan, (-5, 5)), "square": (np.square, (-5, 5)),
}


@pytest.mark.slow  # property tests over many shapes: make test-slow
@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), op=st.sampled_from(sorted(NP_UNARY)),
       seed=st.integers(0, 2 ** 16))
def test_unary_shapes_hypothesis(shape, op, seed):
    fn, (lo, hi) = NP_UNARY[op]
    x = np.random.default_rng(seed).uniform(lo, hi, size=shape).astype(np.float32)
    ml = convert_mil(lambda v: getattr(mb, op)(x=v), [x], passes=False)
    (got,) = mil_outputs(ml, [x])
    assert got.shape == x.shape and got.dtype == np.float32
    # torch and numpy transcendental kernels may differ by an ulp or two in FP32
    np.testing.assert_allclose(got, fn(x.astype(np.float64)), rtol=2e-6, atol=1e-7)
