"""The FP32 reference of a diagnosis: a fork of the one conversion, finished at FP32, equal to a direct FP32 conversion."""

import re

import coremltools as ct
import numpy as np
import pytest
import torch

import coreml_lab as cl
import sample_models
from coreml_lab import diagnosis
from coreml_lab.convert import prepare
from coreml_lab.fp32_reference import copy_program, fp32_reference
from coreml_lab.mapping import build_layer_map


def _ops(program):
    """Op types, names (numbers coremltools' passes count process-wide blanked) and output dtypes, in order."""
    function = program.functions["main"]
    return [(op.op_type, re.sub(r"(_?\d+)+", "#", op.name), tuple(str(v.dtype) for v in op.outputs))
            for op in function.operations]


def _consts(program):
    return [op.outputs[0].val for op in program.functions["main"].operations if op.op_type == "const"]


def _same_program(a, b):
    assert _ops(a) == _ops(b)
    ca, cb = _consts(a), _consts(b)
    assert len(ca) == len(cb)
    for i, (x, y) in enumerate(zip(ca, cb)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), i
    fa, fb = a.functions["main"], b.functions["main"]
    assert [(v.name, str(v.dtype)) for v in fa.outputs] == [(v.name, str(v.dtype)) for v in fb.outputs]
    assert [(n, str(v.dtype)) for n, v in fa.inputs.items()] == [(n, str(v.dtype)) for n, v in fb.inputs.items()]
    names = [op.name for op in fa.operations]
    assert sum(x == op.name for x, op in zip(names, fb.operations)) >= 0.8 * len(names)  # most are torch names; kv_decoder: 277 of 313


@pytest.mark.parametrize("name", ["fp16_overflow", "transformer_mask", "kv_decoder", "conv_strides"])
def test_forked_reference_is_a_direct_fp32_conversion_and_the_conversion_is_unchanged(name):
    model, inputs, _ = sample_models.build(name)
    options = cl.ConversionOptions(target="iOS17")
    conversion = cl.convert(model, inputs, options, cache=False, fork_fp32=True)
    assert conversion.fp32_fork is not None
    direct16 = cl.convert(model, inputs, options, cache=False)
    _same_program(conversion.program, direct16.program)

    reference = diagnosis._fp32_conversion(options, conversion.prepared, conversion)
    assert conversion.fp32_fork is None  # used up: its program is the reference's
    assert any("before coremltools' FP16 pass" in m.text for m in reference.messages)
    direct32 = cl.convert(model, inputs, options.replace(precision="fp32"), cache=False)
    _same_program(reference.program, direct32.program)
    assert reference.io_dtypes() == direct32.io_dtypes()


def test_reference_without_a_fork_is_a_direct_fp32_conversion_kept_as_its_program():
    model, inputs, _ = sample_models.build("fp16_overflow")
    prep = prepare(model, inputs)
    reference = fp32_reference(prep, cl.ConversionOptions())
    direct32 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"), cache=False)
    _same_program(reference.program, direct32.program)
    assert not list(reference.mlmodel.get_spec().mlProgram.functions)  # no program body was serialized
    assert fp32_reference(prep, cl.ConversionOptions()) is reference  # remembered for the next diagnosis


def test_diagnose_converts_from_torch_once(fresh_cache, monkeypatch):
    model, inputs, _ = sample_models.build("fp16_overflow")
    sources = []
    real = ct.convert

    def counting(model, *args, **kwargs):
        sources.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ct, "convert", counting)
    report = cl.diagnose(model, inputs, cl.ConversionOptions(), compute_units=("CPU_ONLY",))
    assert sum(name != "Program" for name in sources) == 1, sources
    assert report.outputs["rel_err"].notna().all()


class Expert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Stages(torch.nn.Module):
    """Two ModuleLists deep, as SegFormer's encoder.block[i][j]: scopes name both fc's "0.fc"."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleList([Expert()]) for _ in range(2)])

    def forward(self, x):
        for stage in self.blocks:
            for expert in stage:
                x = expert(x) + x
        return x


def test_layers_inside_nested_module_lists_are_named_by_their_full_path():
    model, x = Stages().eval(), torch.randn(2, 4)
    for conversion in (cl.convert(model, (x,), cl.ConversionOptions(), cache=False),
                       diagnosis._fp32_conversion(cl.ConversionOptions(), prepare(model, (x,)))):
        layer_map = build_layer_map(conversion.program, model, conversion.layer_chains)
        linear = [op for op in conversion.program.functions["main"].operations if op.op_type == "linear"]
        assert [layer_map.op_module(op) for op in linear] == ["blocks.0.0.fc", "blocks.1.0.fc"]


def test_program_copy_shares_weights_and_nothing_else():
    model, inputs, _ = sample_models.build("conv_strides")
    program = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"), cache=False).program
    copied = copy_program(program)
    before, after = program.functions["main"].operations, copied.functions["main"].operations
    assert [op.op_type for op in before] == [op.op_type for op in after]
    assert all(a is not b for a, b in zip(before, after))
    arrays = [(a.outputs[0].val, b.outputs[0].val) for a, b in zip(before, after)
              if a.op_type == "const" and isinstance(a.outputs[0].val, np.ndarray) and a.outputs[0].val.size > 1]
    assert arrays and all(a is b for a, b in arrays)
