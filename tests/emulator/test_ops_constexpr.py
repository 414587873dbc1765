"""Emulator kernels for weight decompression (constexpr_*) and quantize / dequantize.

Compressed models come from coremltools' own weight compression
(``coremltools.optimize.coreml``) applied to a tiny torch model at iOS16 (the
iOS16 constexpr ops, bit-packed) and iOS18 (blockwise / grouped / joint ops).
Each decompressed weight the emulator produces is compared *exactly* with the
weight coremltools' public ``decompress_weights`` materialises, and the model
output with the output of the decompressed model and with numpy. The parts of
the iOS18 ops no compression API produces here (vector palettisation needs
k-means from scikit-learn) are checked on the worked examples of the op
docstrings, built with the MIL builder.
"""

from __future__ import annotations

import warnings

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from opcheck import FP16_PROFILES, FP16_RTOL, check_torch_op, op_types, require_kernels

from coreml_lab.emulator import EmulatedModel

# ----------------------------------------------------------------------------- compressed torch models

_G = torch.Generator().manual_seed(0)
LINEAR = torch.nn.Linear(32, 16).eval()
with torch.no_grad():
    LINEAR.weight.copy_(torch.randn(16, 32, generator=_G) * 0.3)
    LINEAR.bias.copy_(torch.randn(16, generator=_G))
X = torch.randn(4, 32, generator=_G)

_BASE: dict = {}


def base_model(target: str, precision: str):
    key = (target, precision)
    if key not in _BASE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(LINEAR, (X,))
            _BASE[key] = ct.convert(
                traced, inputs=[ct.TensorType(name="x0", shape=tuple(X.shape))], convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, target),
                compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
            )
    return _BASE[key]


def quantize(ml, joint=False, **cfg):
    cfg = cto.OpLinearQuantizerConfig(weight_threshold=10, **cfg)
    return cto.linear_quantize_weights(ml, cto.OptimizationConfig(global_config=cfg), joint_compression=joint)


def palettize(ml, joint=False, **cfg):
    cfg = cto.OpPalettizerConfig(mode="uniform", weight_threshold=10, **cfg)
    return cto.palettize_weights(ml, cto.OptimizationConfig(global_config=cfg), joint_compression=joint)


def prune(ml, **cfg):
    cfg = cto.OpMagnitudePrunerConfig(target_sparsity=0.6, weight_threshold=10, **cfg)
    return cto.prune_weights(ml, cto.OptimizationConfig(global_config=cfg))


def constexpr_types(ml) -> set[str]:
    return {t for t in op_types(ml) if t.startswith("constexpr_")}


def decompressed_weights(ml) -> dict[str, np.ndarray]:
    """The weights coremltools' public decompress_weights materialises, by variable name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = cto.decompress_weights(ml)
    out = {}
    for op in dec._mil_program.functions["main"].operations:
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray):
            out[op.outputs[0].name] = op.outputs[0].val
    return out, dec


def emulate(ml, cu="CPU_ONLY"):
    """Model output plus every constexpr output the emulator produced."""
    seen = {}

    def record(r):
        if r.op_type.startswith("constexpr_"):
            seen[r.name] = (np.array(r.value), r.dtype)

    out = EmulatedModel(ml, cu).predict({"x0": X.numpy()}, on_op=record)
    return next(iter(out.values())), seen


def check_compressed(ml, expect: set[str], precision: str, lossy: bool = False):
    require_kernels("linear")
    assert expect <= constexpr_types(ml), f"compression produced {constexpr_types(ml)}"
    ref, dec = decompressed_weights(ml)
    got, seen = emulate(ml)
    # every final weight is exactly what coremltools decompresses, in the declared dtype
    compared = 0
    for name, (value, declared) in seen.items():
        if name in ref:
            want = ref[name]
            assert declared == ("fp16" if want.dtype == np.float16 else "fp32")
            np.testing.assert_array_equal(value.astype(want.dtype), want, err_msg=name)
            np.testing.assert_array_equal(value.astype(np.float64), want.astype(np.float64), err_msg=name)
            compared += 1
    assert compared >= 1, f"no decompressed weight compared ({sorted(seen)} vs {sorted(ref)})"
    # model output: the compressed model and the decompressed model agree, and match numpy
    dec_out = next(iter(EmulatedModel(dec, "CPU_ONLY").predict({"x0": X.numpy()}).values()))
    np.testing.assert_array_equal(got, dec_out)
    w = next(v for k, v in ref.items() if v.ndim == 2).astype(np.float64)
    b = LINEAR.bias.detach().numpy().astype(np.float64)
    want = X.numpy().astype(np.float64) @ w.T + b
    if precision == "fp32":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        for cu in FP16_PROFILES:
            got16, _ = emulate(ml, cu)
            np.testing.assert_allclose(got16, want, rtol=FP16_RTOL, atol=1e-2 * np.abs(want).max(), err_msg=cu)
    # compression error stays small next to the uncompressed torch model (sanity of the whole path;
    # 1- and 2-bit LUTs of a Gaussian weight are too coarse for this bound)
    if not lossy:
        with torch.no_grad():
            exact = LINEAR(X).numpy()
        assert np.abs(got - exact).max() < 0.5 * np.abs(exact).max()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("mode,dtype", [("linear_symmetric", "int8"), ("linear", "uint8")])
def test_ios16_affine_dequantize(precision, mode, dtype):
    ml = quantize(base_model("iOS16", precision), mode=mode, dtype=dtype)
    check_compressed(ml, {"constexpr_affine_dequantize"}, precision)


@pytest.mark.parametrize("precision,nbits", [
    ("fp32", 1), ("fp32", 2), ("fp32", 4), ("fp32", 6), ("fp32", 8), ("fp16", 2), ("fp16", 6),
])
def test_ios16_lut_to_dense_bit_packing(precision, nbits):
    # 6 bits: indices straddle byte boundaries
    ml = palettize(base_model("iOS16", precision), nbits=nbits)
    check_compressed(ml, {"constexpr_lut_to_dense"}, precision, lossy=nbits <= 2)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ios16_sparse_to_dense(precision):
    ml = prune(base_model("iOS16", precision))
    check_compressed(ml, {"constexpr_sparse_to_dense"}, precision)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("granularity,dtype,kw", [
    ("per_channel", "int8", {}),
    ("per_channel", "uint4", {}),
    ("per_block", "int4", {"block_size": 8}),
    ("per_tensor", "int8", {}),
])
def test_ios18_blockwise_shift_scale(precision, granularity, dtype, kw):
    ml = quantize(base_model("iOS18", precision), mode="linear_symmetric", dtype=dtype,
                  granularity=granularity, **kw)
    check_compressed(ml, {"constexpr_blockwise_shift_scale"}, precision)


def test_ios18_blockwise_shift_scale_with_offset():
    # mode="linear" stores an offset (zero point)
    ml = quantize(base_model("iOS18", "fp32"), mode="linear", dtype="uint8", granularity="per_block", block_size=16)
    assert any(op.op_type == "constexpr_blockwise_shift_scale" and "offset" in op.inputs
               for op in ml._mil_program.functions["main"].operations)
    check_compressed(ml, {"constexpr_blockwise_shift_scale"}, "fp32")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("nbits,kw", [
    (3, {}),
    (4, {"granularity": "per_grouped_channel", "group_size": 4}),
    (2, {"granularity": "per_grouped_channel", "group_size": 8, "enable_per_channel_scale": True}),
])
def test_ios18_lut_to_dense(precision, nbits, kw):
    ml = palettize(base_model("iOS18", precision), nbits=nbits, **kw)
    expect = {"constexpr_lut_to_dense"}
    if kw.get("enable_per_channel_scale"):
        expect.add("constexpr_blockwise_shift_scale")
    check_compressed(ml, expect, precision, lossy=nbits <= 2)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ios18_sparse_to_dense(precision):
    ml = prune(base_model("iOS18", precision))
    check_compressed(ml, {"constexpr_sparse_to_dense"}, precision)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ios18_joint_prune_palettize(precision):
    ml = palettize(prune(base_model("iOS18", precision)), joint=True, nbits=2)
    check_compressed(ml, {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"}, precision, lossy=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # coremltools divides by the zero scale of all-zero blocks
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ios18_joint_prune_quantize(precision):
    ml = quantize(prune(base_model("iOS18", precision)), joint=True, mode="linear_symmetric",
                  dtype="int4", granularity="per_block", block_size=8)
    check_compressed(ml, {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"}, precision)


def test_decompression_is_computed_once_and_reused():
    require_kernels("linear")
    ml = palettize(base_model("iOS18", "fp32"), nbits=4)
    em = EmulatedModel(ml)
    values = []

    def record(r):
        if r.op_type == "constexpr_lut_to_dense":
            values.append(r.value)

    a = em.predict({"x0": X.numpy()}, on_op=record)
    b = em.predict({"x0": X.numpy()}, on_op=record)
    assert len(values) == 2 and np.shares_memory(values[0], values[1])
    np.testing.assert_array_equal(next(iter(a.values())), next(iter(b.values())))


# ----------------------------------------------------------------------------- MIL builder: docstring examples


def run_program(prog, target, feeds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                        compute_precision=ct.precision.FLOAT32)
    return list(EmulatedModel(ml).predict(feeds).values()), ml


def test_ios16_lut_packing_docstring_example():
    # n_bits = 2, shape (5,): byte0 = i3 i2 i1 i0 (MSB..LSB) = 01 10 11 00, byte1 = xxxxxx 11
    lut = np.array([10.0, 20.0, 30.0, 40.0], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(5,))], opset_version=ct.target.iOS16)
    def prog(x):
        w = mb.constexpr_lut_to_dense(indices=np.array([0b01101100, 0b00000011], np.uint8), lut=lut,
                                      shape=np.array([5], np.uint32))
        return mb.add(x=x, y=w)

    (got,), ml = run_program(prog, "iOS16", {"x": np.zeros(5, np.float32)})
    assert "constexpr_lut_to_dense" in op_types(ml)
    np.testing.assert_array_equal(got, lut[[0, 3, 2, 1, 3]])


def test_ios16_sparse_mask_docstring_example_and_affine_scalar_params():
    # mask byte 0b00001100: elements 2 and 3 set (LSB first)
    @mb.program(input_specs=[mb.TensorSpec(shape=(5,))], opset_version=ct.target.iOS16)
    def prog(x):
        s = mb.constexpr_sparse_to_dense(nonzero_data=np.array([7.0, -3.0], np.float32),
                                         mask=np.array([0b00001100], np.uint8), shape=np.array([5], np.uint32))
        a = mb.constexpr_affine_dequantize(quantized_data=np.array([0, 5, 250, 128, 1], np.uint8),
                                           zero_point=np.uint8(128), scale=np.float32(0.5), axis=0)
        return mb.add(x=mb.add(x=x, y=s), y=a)

    (got,), _ = run_program(prog, "iOS16", {"x": np.zeros(5, np.float32)})
    want = np.array([0, 0, 7, -3, 0], np.float64) + 0.5 * (np.array([0, 5, 250, 128, 1]) - 128)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("target", ["iOS16", "iOS18"])
def test_constexpr_cast(target):
    src = np.array([[1.0009765625, -65504.0], [3.140625, 6e-8]], np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 2))], opset_version=getattr(ct.target, target))
    def prog(x):
        return mb.add(x=x, y=mb.constexpr_cast(source_val=src, output_dtype="fp32"))

    (got,), ml = run_program(prog, target, {"x": np.zeros((2, 2), np.float32)})
    assert "constexpr_cast" in op_types(ml)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, src.astype(np.float32))


def test_ios18_lut_per_group_docstring_case1():
    indices = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3], np.uint8).reshape(6, 2)
    lut = np.array([1.0, 5.0, 9.0, 13.0, 2.0, 10.0, 18.0, 26.0], np.float32).reshape(2, 1, 4, 1)

    @mb.program(input_specs=[mb.TensorSpec(shape=(6, 2))], opset_version=ct.target.iOS18)
    def prog(x):
        w = mb.constexpr_lut_to_dense(indices=indices.astype(types.np_uint2_dtype), lut=lut)
        return mb.add(x=x, y=w)

    (got,), _ = run_program(prog, "iOS18", {"x": np.zeros((6, 2), np.float32)})
    want = np.array([[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]], np.float32)
    np.testing.assert_array_equal(got, want)


_VEC_INDICES = np.array([[[0, 0], [1, 0]], [[1, 1], [0, 0]]], np.uint8)
_A, _B = [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]


@pytest.mark.parametrize("vector_axis", [1, 2, -1])
def test_ios18_vector_palettization_docstring_case2(vector_axis):
    lut = np.array([_A, _B], np.float32).reshape(1, 1, 1, 2, 3)
    out_shape = [2, 2, 2]
    out_shape[vector_axis] *= 3

    @mb.program(input_specs=[mb.TensorSpec(shape=tuple(out_shape))], opset_version=ct.target.iOS18)
    def prog(x):
        w = mb.constexpr_lut_to_dense(indices=_VEC_INDICES.astype(types.np_uint1_dtype), lut=lut,
                                      vector_axis=np.int32(vector_axis))
        return mb.add(x=x, y=w)

    (got,), _ = run_program(prog, "iOS18", {"x": np.zeros(out_shape, np.float32)})
    # reference: replace each index by its vector, laid out along vector_axis
    vec = np.array([_A, _B])[_VEC_INDICES]        # (2, 2, 2, 3)
    ax = vector_axis % 3
    want = np.moveaxis(vec, -1, ax + 1).reshape(out_shape)
    np.testing.assert_array_equal(got, want)
    if ax == 1:  # the docstring's Case 2.1 listing, first slice
        np.testing.assert_array_equal(got[0, :, 0], [1, 2, 3, 10, 20, 30])
        np.testing.assert_array_equal(got[0, :, 1], [1, 2, 3, 1, 2, 3])


_MASK = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1], [0, 1, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]], np.uint8)
_NZ_IDX = np.array([0, 1, 1, 0, 1, 1, 0, 0, 1], np.uint8)


@pytest.mark.parametrize("vector", [False, True])
def test_ios18_lut_to_sparse_docstring_example(vector):
    if vector:
        lut = np.array([[2.0, 2.0], [3.0, 3.0]], np.float32).reshape(1, 1, 2, 2)
        out_shape = (8, 6)
    else:
        lut = np.array([2.0, 3.0], np.float32).reshape(1, 1, 2, 1)
        out_shape = (4, 6)

    @mb.program(input_specs=[mb.TensorSpec(shape=out_shape)], opset_version=ct.target.iOS18)
    def prog(x):
        kw = {"vector_axis": np.int32(0)} if vector else {}
        mask, nz = mb.constexpr_lut_to_sparse(indices_mask=_MASK.astype(types.np_uint1_dtype),
                                              indices_nonzero_data=_NZ_IDX.astype(types.np_uint1_dtype),
                                              lut=lut, **kw)
        return mb.add(x=x, y=mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=mask))

    (got,), ml = run_program(prog, "iOS18", {"x": np.zeros(out_shape, np.float32)})
    assert {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"} <= op_types(ml)
    dense = np.zeros((4, 6))
    dense[_MASK != 0] = np.array([2.0, 3.0])[_NZ_IDX]
    want = np.repeat(dense, 2, axis=0) if vector else dense
    np.testing.assert_array_equal(got, want)
    # docstring: the nonzero output for the scalar case
    if not vector:
        np.testing.assert_array_equal(got[_MASK != 0], [2.0, 3.0, 3.0, 2.0, 3.0, 3.0, 2.0, 2.0, 3.0])


def test_ios18_sparse_blockwise_shift_scale_docstring_example():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]], np.uint8)
    nonzero = np.array([10, 11, 3, 4, 5, 6, 7, 8, 9], np.int8)
    scale = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)
    offset = np.array([[1, 2, 3, 4]], np.int8)

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 4))], opset_version=ct.target.iOS18)
    def prog(x):
        m, nz = mb.constexpr_sparse_blockwise_shift_scale(data_mask=mask.astype(types.np_uint1_dtype),
                                                          nonzero_data=nonzero, scale=scale, offset=offset)
        return mb.add(x=x, y=mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=m))

    (got,), ml = run_program(prog, "iOS18", {"x": np.zeros((4, 4), np.float32)})
    assert "constexpr_sparse_blockwise_shift_scale" in op_types(ml)
    dense = np.zeros((4, 4), np.float32)
    dense[mask != 0] = nonzero
    want = np.where(mask != 0, (dense - offset.astype(np.float32)) * scale, 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got[mask != 0], [0.9, 1.8, 0.2, 0.4, 0.6, 0.9, 1.2, 0.7, 1.4], rtol=1e-6)


def test_ios18_blockwise_shift_scale_float_offset_rank3():
    data = np.arange(-12, 12, dtype=np.int8).reshape(2, 3, 4)
    scale = np.array([[[0.5, 2.0]], [[0.25, 1.0]]], np.float16)      # (2, 1, 2): blocks (1, 3, 2)
    offset = np.array([[[1.5, -2.0]], [[0.0, 3.0]]], np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.add(x=x, y=mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                        compute_precision=ct.precision.FLOAT16)
    got = next(iter(EmulatedModel(ml, "CPU_AND_GPU").predict({"x": np.zeros((2, 3, 4), np.float16)}).values()))
    s = np.repeat(scale.astype(np.float32), 2, axis=2)
    o = np.repeat(offset.astype(np.float32), 2, axis=2)
    want = (s * (data.astype(np.float32) - o)).astype(np.float16)  # one rounding to the FP16 weight
    np.testing.assert_array_equal(got.astype(np.float16), want)


# ----------------------------------------------------------------------------- quantize / dequantize


class QDQ(torch.nn.Module):
    def forward(self, x):
        a = torch.dequantize(torch.quantize_per_tensor(x, 0.1, 10, torch.quint8))
        b = torch.dequantize(torch.quantize_per_channel(
            x, torch.tensor([0.1, 0.2, 0.05]), torch.tensor([0, 1, -2]), 1, torch.qint8))
        return a, b


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantize_dequantize_fp32_vs_torch():
    # values span the clipping range of both uint8 (zero point 10) and int8
    x = torch.linspace(-30, 30, 2 * 3 * 40).reshape(2, 3, 40)
    check_torch_op(QDQ(), [x], {"quantize", "dequantize"}, target="iOS17", rtol=1e-6, atol=1e-6,
                   check_fp16=False)


def test_quantize_rounds_half_to_even():
    @mb.program(input_specs=[mb.TensorSpec(shape=(6,))], opset_version=ct.target.iOS17)
    def prog(x):
        q = mb.quantize(input=x, scale=np.float32(0.5), zero_point=np.int8(0), output_dtype="int8")
        return q, mb.dequantize(input=q, scale=np.float32(0.5), zero_point=np.int8(0))

    (q, dq), _ = run_program(prog, "iOS17", {"x": np.array([0.25, 0.75, -0.25, -1.25, 200.0, -200.0], np.float32)})
    # (the converter casts an int8 program output to int32: Core ML outputs have no int8)
    np.testing.assert_array_equal(q, [0, 2, 0, -2, 127, -128])
    np.testing.assert_array_equal(dq, [0.0, 1.0, 0.0, -1.0, 63.5, -64.0])


@pytest.mark.parametrize("cu", FP16_PROFILES)
def test_quantize_dequantize_fp16(cu):
    # values a quarter step away from rounding ties: FP16 x/scale cannot flip the rounding
    scale = np.array([0.1, 0.2, 0.05], np.float32)
    k = np.arange(-60, 60, dtype=np.float32).reshape(1, 1, 120) % 50 - 25
    x = ((k + 0.25) * scale.reshape(1, 3, 1)).astype(np.float32)
    x = np.concatenate([x, -x], axis=0)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 120), dtype=types.fp16)], opset_version=ct.target.iOS17)
    def prog(x):
        q = mb.quantize(input=x, scale=scale.astype(np.float16), zero_point=np.array([0, 1, -2], np.int8),
                        axis=1, output_dtype="int8")
        return mb.dequantize(input=q, scale=scale.astype(np.float16), zero_point=np.array([0, 1, -2], np.int8),
                             axis=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                        compute_precision=ct.precision.FLOAT16)
    got = next(iter(EmulatedModel(ml, cu).predict({"x": x.astype(np.float16)}).values()))
    s = scale.astype(np.float16).astype(np.float64).reshape(1, 3, 1)
    zp = np.array([0, 1, -2]).reshape(1, 3, 1)
    q = np.clip(np.round(x.astype(np.float16).astype(np.float64) / s) + zp, -128, 127)
    want = (q - zp) * s
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- issue 15: every mode per target


@pytest.mark.parametrize("target", ["iOS16", "iOS17", "iOS18"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_kmeans_palettization_per_target(target, precision):
    # the kit's "palettizeN" specs use k-means (scikit-learn), not the uniform LUTs above
    cfg = cto.OpPalettizerConfig(mode="kmeans", nbits=4, weight_threshold=10)
    ml = cto.palettize_weights(base_model(target, precision), cto.OptimizationConfig(global_config=cfg))
    check_compressed(ml, {"constexpr_lut_to_dense"}, precision)


@pytest.mark.parametrize("target", ["iOS16", "iOS17"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ios17_and_ios16_quantize_and_prune(target, precision):
    check_compressed(quantize(base_model(target, precision), mode="linear_symmetric", dtype="int8",
                              granularity="per_tensor"), {"constexpr_affine_dequantize"}, precision)
    check_compressed(prune(base_model(target, precision)), {"constexpr_sparse_to_dense"}, precision)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("cluster_dim", [2, 4])
def test_ios18_vector_palettization_from_coremltools(precision, cluster_dim):
    # vector palettes as coremltools' k-means emits them (lut's last dim = cluster_dim)
    cfg = cto.OpPalettizerConfig(mode="kmeans", nbits=2, cluster_dim=cluster_dim, weight_threshold=10)
    ml = cto.palettize_weights(base_model("iOS18", precision), cto.OptimizationConfig(global_config=cfg))
    lut = next(op.lut for op in ml._mil_program.functions["main"].operations if op.op_type == "constexpr_lut_to_dense")
    assert lut.shape[-1] == cluster_dim
    check_compressed(ml, {"constexpr_lut_to_dense"}, precision, lossy=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ios18_joint_palettize_quantize_lut(precision):
    # "palettize4+int8": the LUT itself quantized per tensor (lut_to_dense fed by blockwise_shift_scale)
    ml = quantize(palettize(base_model("iOS18", precision), nbits=4), joint=True, mode="linear_symmetric",
                  dtype="int8", granularity="per_tensor")
    check_compressed(ml, {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}, precision)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ios18_joint_prune_kmeans_palettize_grouped(precision):
    # (coremltools itself rejects joint pruning with enable_per_channel_scale: data/scale rank mismatch)
    cfg = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=4,
                                 weight_threshold=10)
    ml = cto.palettize_weights(prune(base_model("iOS18", precision)), cto.OptimizationConfig(global_config=cfg),
                               joint_compression=True)
    check_compressed(ml, {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"}, precision)
