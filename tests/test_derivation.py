"""One conversion from torch: the FP16 / mixed program made from the FP32 conversion (coreml_lab/derivation.py)."""

from __future__ import annotations

import importlib

import coremltools as ct
import numpy as np
import pytest

import coreml_lab as cl
import sample_models
from coreml_lab.convert import prepare
from coreml_lab.emulator.program import walk_ops

convert_module = importlib.import_module("coreml_lab.convert")
derivation_module = importlib.import_module("coreml_lab.derivation")


def _ops(program):
    """(op type, op name, output names and dtypes, input names, const value) of every op, consts and nested included."""
    rows = []
    for op in walk_ops(program, nested=True, consts=True):
        ins = tuple(sorted((k, tuple(x.name for x in (v if isinstance(v, (list, tuple)) else (v,))))
                           for k, v in op.inputs.items()))
        outs = tuple((v.name, str(v.dtype)) for v in op.outputs)
        rows.append((op.op_type, op.name, outs, ins, op.outputs[0].val if op.op_type == "const" else None))
    return rows


def _direct(model, inputs, options):
    """A direct coremltools conversion of ``options`` from torch (no coreml_lab conversion path)."""
    prep = prepare(model, inputs)
    return ct.convert(prep.take_convertible(), inputs=prep.inputs.ct_inputs(), **options.convert_kwargs())


def _assert_same_program(derived, direct):
    a, b = _ops(derived), _ops(direct)
    assert [r[:4] for r in a] == [r[:4] for r in b]
    for x, y in zip(a, b):
        if x[4] is not None:
            vx, vy = np.asarray(x[4]), np.asarray(y[4])
            assert vx.dtype == vy.dtype and np.array_equal(vx, vy), x[1]
    main_a, main_b = derived.functions["main"], direct.functions["main"]
    assert [(v.name, str(v.dtype)) for v in main_a.outputs] == [(v.name, str(v.dtype)) for v in main_b.outputs]


@pytest.fixture
def counted(monkeypatch):
    """ct.convert calls, by what was converted (a torch trace, or a MIL ``Program`` for a derivation)."""
    calls = []
    real = ct.convert

    def counting(model, *args, **kwargs):
        calls.append("Program" if type(model).__name__ == "Program" else "torch")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(convert_module.ct, "convert", counting)
    return calls


@pytest.mark.parametrize("name", ["deep_residual", "conv_strides"])
def test_derived_fp16_program_is_the_direct_fp16_conversion(name, counted):
    model, inputs, _ = sample_models.build(name)
    conv = cl.convert(model, inputs, cl.ConversionOptions(), cache=False)
    assert counted == ["torch", "Program"]
    assert conv.reference is not None and conv.reference.options.precision == "fp32"
    assert any("coremltools' FP16 pass" in m.text for m in conv.messages)
    _assert_same_program(conv.program, _direct(model, inputs, cl.ConversionOptions())._mil_program)


def test_mixed_precision_is_converted_from_torch_with_the_users_op_selector(counted):
    model, inputs, _ = sample_models.build("deep_residual")
    fp32 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"), cache=False)
    convs = [op.name for op in walk_ops(fp32.program, nested=False) if op.op_type == "conv"]
    options = cl.ConversionOptions(precision="mixed", fp32_ops=tuple(convs[:2]))
    counted.clear()
    conv = cl.convert(model, inputs, options, cache=False)
    assert counted == ["torch", "torch"] and conv.reference is not None
    assert any("second time" in m.text and "fp32_ops" in m.text for m in conv.messages)
    _assert_same_program(conv.program, _direct(model, inputs, options)._mil_program)
    kept = [op for op in walk_ops(conv.program, nested=False) if op.op_type == "conv" and op.outputs[0].dtype
            == ct.converters.mil.mil.types.fp32]
    assert len(kept) == 2


def test_guarded_gathers_are_derived_with_the_guard_where_a_direct_conversion_has_it(counted):
    # coremltools guards gather indices against negative values after its FP16 pass: the FP32 program has the
    # guard already; the derivation takes it off so the FP16 passes put it back after the INT16 casts
    model, inputs, _ = sample_models.build("transformer_mask")
    conv = cl.convert(model, inputs, cl.ConversionOptions(), cache=False)
    assert counted == ["torch", "Program"]
    direct = _direct(model, inputs, cl.ConversionOptions())._mil_program
    a, b = _ops(conv.program), _ops(direct)
    assert [r[0] for r in a] == [r[0] for r in b]  # op types in order (a few ops coremltools names are named apart)
    assert [[d for _, d in r[2]] for r in a] == [[d for _, d in r[2]] for r in b]
    for x, y in zip(a, b):
        if x[4] is not None:
            assert np.array_equal(np.asarray(x[4]), np.asarray(y[4])), x[1]


def test_a_conversion_the_derivation_cannot_serve_is_converted_again_and_says_why(counted, monkeypatch):
    def failing(*args, **kwargs):
        raise ValueError("no FP16 pass today")

    monkeypatch.setattr(derivation_module, "derive", failing)
    model, inputs, _ = sample_models.build("conv_strides")
    conv = cl.convert(model, inputs, cl.ConversionOptions(), cache=False)
    assert counted == ["torch", "torch"]
    notes = [m.text for m in conv.messages if "second time" in m.text]
    assert notes and "no FP16 pass today" in notes[0]
    _assert_same_program(conv.program, _direct(model, inputs, cl.ConversionOptions())._mil_program)


def test_inputs_without_a_dtype_are_not_derived(counted):
    model, inputs, _ = sample_models.build("deep_residual")
    spec = prepare(model, inputs).inputs.ct_inputs()[0]
    options = cl.ConversionOptions(inputs=(ct.TensorType(name=spec.name, shape=spec.shape.shape),))
    assert derivation_module.derivable(options) is not None
    conv = cl.convert(model, inputs, options, cache=False)
    assert "torch" in counted and "Program" not in counted
    assert any("second time" in m.text and "no dtype" in m.text for m in conv.messages)


def test_diagnose_converts_once_and_a_conversion_is_diagnosed_without_converting(counted, tmp_path, monkeypatch):
    monkeypatch.setenv("COREML_LAB_CACHE", str(tmp_path))
    model, inputs, _ = sample_models.build("deep_residual")
    report = cl.diagnose(model, inputs, cl.ConversionOptions(), compute_units=["CPU_ONLY"], progress=False)
    assert counted == ["torch", "Program"] and report.layers is not None
    counted.clear()
    conv = cl.convert(model, inputs, cl.ConversionOptions(), cache=False)
    counted.clear()
    cl.diagnose(conv, compute_units=["CPU_ONLY"], progress=False)
    assert counted == []


@pytest.mark.parametrize("name", ["transformer_mask", "compression_outlier"])
def test_the_references_scope_layer_map_names_every_module_the_op_mapping_helper_named(name):
    """The FP32 reference is now the plain conversion (named by scopes), not coremltools' op-mapping helper's."""
    model, inputs, _ = sample_models.build(name)
    prep = prepare(model, inputs)
    options = cl.ConversionOptions(precision="fp32")
    helper = cl.convert(None, options=options, prepared=prep, cache=False, layer_mapping=True).layer_map()
    scopes = cl.convert(None, options=options, prepared=prep, cache=False).layer_map()
    assert helper.source == "coremltools" and scopes.source == "scopes"
    assert set(helper.module_outputs) <= set(scopes.module_outputs)


def test_a_compressed_fp32_conversion_is_the_reference_compressed(counted):
    model, inputs, _ = sample_models.build("compression_outlier")
    options = cl.ConversionOptions(precision="fp32", compression="palettize4", target="iOS18")
    conv = cl.convert(model, inputs, options, cache=False)
    assert counted.count("torch") == 1  # (coremltools' compression converts the compressed MIL program itself)
    assert conv.reference is not None and conv.reference.options.compression is None
    assert any(op.op_type.startswith("constexpr_") for op in walk_ops(conv.program, nested=False, consts=True))
    assert not any(op.op_type.startswith("constexpr_")
                   for op in walk_ops(conv.reference.program, nested=False, consts=True))
