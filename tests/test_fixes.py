"""The fix search grows FP32 regions (the spectrogram sample) and never reports a fix that does not verify;
degenerate references (all zeros, below FP16's smallest subnormal) are explained in the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import coreml_lab as cl
import sample_models
from coreml_lab import fixes
from coreml_lab.convert import convert, prepare
from coreml_lab.fp16 import FP16_MAX, RangeStats
from coreml_lab.fp32_regions import SelectorOp, fp32_regions
from coreml_lab.metrics import degenerate_reference

TOL = 1e-2


@pytest.fixture(scope="module")
def spectrogram():
    model, inputs, _ = sample_models.build("spectrogram")
    return model, inputs, cl.find_fp32_ops(model, inputs, progress=False)


def _torch_outputs(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _fp32_ops_of(program) -> dict:
    """Output var name -> dtype of every computing op (consts and casts left out)."""
    from coremltools.converters.mil.mil import types
    return {v.name: types.builtin_to_string(v.dtype) for op in program.functions["main"].operations
            if op.op_type not in ("const", "cast") for v in op.outputs}


def test_spectrogram_sample_overflows_at_its_dft_and_is_back_in_range_after_the_log():
    model, (audio,), _ = sample_models.build("spectrogram")
    mods = dict(model.named_modules())
    seen = {}
    for path in sample_models.spectrogram.FP32_REGION + ("norm",):
        mods[path].register_forward_hook(lambda m, i, o, path=path: seen.__setitem__(path, float(o.abs().max())))
    with torch.no_grad():
        model(audio)
    assert audio.abs().max() < FP16_MAX and torch.equal(audio, audio.round()), "int16-scale PCM that fits FP16"
    assert seen[sample_models.spectrogram.OVERFLOW_MODULE] > FP16_MAX
    assert all(seen[p] > FP16_MAX for p in sample_models.spectrogram.FP32_REGION[:-1])
    assert seen["frontend.log"] < 100 and seen["norm"] < 100


def test_one_op_in_fp32_does_not_fix_the_spectrogram(spectrogram):
    model, inputs, fix = spectrogram
    conv_op = fix.regions[0][0]  # where the region starts: the DFT convolution
    kinds = {op.outputs[0].name: op.op_type for op in fix.conversion.program.functions["main"].operations
             if op.outputs}
    assert kinds[fix.op_outputs[conv_op][0]] == "conv"
    prep = prepare(model, inputs)
    want = _torch_outputs(model, inputs)
    feeds = [prep.inputs.as_numpy()]
    alone = convert(None, options=cl.ConversionOptions(precision="mixed", fp32_ops=(conv_op,)), prepared=prep,
                    cache=False)
    assert _fp32_ops_of(alone.program)[fix.op_outputs[conv_op][0]] == "fp32", "the conv itself is FP32"
    assert math.isinf(fixes.measure(alone, feeds, want, fixes.CHECK_UNITS)), \
        "its FP32 result is cast back to FP16 for the next op: still inf"
    assert fix.tried[frozenset(fix.ops) - {conv_op}] > TOL


def test_region_search_fixes_the_spectrogram_with_the_smallest_region(spectrogram):
    model, inputs, fix = spectrogram
    assert fix.found and math.isinf(fix.error_before) and fix.error_after <= TOL, fix
    assert len(fix.regions) == 1 and fix.regions[0] == fix.ops and fix.n_fp32 >= 5
    assert fix.op_types == {"conv": 1, "split": 1, "mul": 2, "add": 2, "transpose": 1, "linear": 1, "log": 1}
    assert "region" in fix.message and f"{fix.error_after:.3g}" in fix.message
    # as small as the search can make it: every op was verified to be needed
    for op in fix.ops:
        assert fix.tried[frozenset(fix.ops) - {op}] > TOL, op
    # the returned conversion holds exactly those ops in FP32 (by their outputs), the rest in FP16:
    # nothing downstream of the log (layer norm, classifier) and nothing before the DFT
    dtypes = _fp32_ops_of(fix.conversion.program)
    kept = {v for outs in fix.op_outputs.values() for v in outs}
    assert {v for v, d in dtypes.items() if d == "fp32"} == kept
    assert fixes.measure(fix.conversion, [fix.conversion.example_inputs.as_numpy()],
                         _torch_outputs(model, inputs), fixes.CHECK_UNITS) == fix.error_after


def test_spectrogram_snippet_reproduces_the_verified_conversion(spectrogram):
    model, inputs, fix = spectrogram
    from coreml_lab.emulator import EmulatedModel
    ns = {"traced_model": torch.jit.trace(model, inputs), "inputs": fix.conversion.example_inputs.ct_inputs()}
    exec(fix.snippet, ns)
    pasted = ns["mlmodel"]
    assert _fp32_ops_of(pasted._mil_program) == _fp32_ops_of(fix.conversion.program)
    feed = fix.conversion.example_inputs.as_numpy()
    for unit in ("CPU_AND_GPU", "CPU_AND_NE"):
        got = EmulatedModel(pasted, unit).predict(feed)
        ref = EmulatedModel(fix.conversion.mlmodel, unit).predict(feed)
        assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in got)
    want = _torch_outputs(model, inputs)[0]
    assert np.abs(next(iter(got.values())).reshape(want.shape) - want).max() <= TOL * np.abs(want).max()


def test_a_set_that_does_not_verify_is_never_reported_as_a_fix():
    model, inputs, _ = sample_models.build("spectrogram")
    fix = cl.find_fp32_ops(model, inputs, progress=False, tolerance=1e-9, time_budget=120)
    assert not fix.found and "no subset" in fix.message and f"{fix.error_after:.3g}" in fix.message
    assert fix.conversion is not None and math.isfinite(fix.error_after) and fix.error_after > 1e-9
    assert min(fix.tried.values()) == fix.error_after, "the best set tried is the one returned"
    prep = prepare(model, inputs)
    assert fixes.measure(fix.conversion, [prep.inputs.as_numpy()], _torch_outputs(model, inputs),
                         fixes.CHECK_UNITS) == fix.error_after


def _ops(*specs):
    return [SelectorOp(name, "op", i, tuple(ins), tuple(consts), tuple(outs))
            for i, (name, ins, consts, outs) in enumerate(specs)]


def _ranges(**max_abs):
    out = {}
    for name, m in max_abs.items():
        out[name] = RangeStats()
        if m is not None:
            out[name].add(np.array([m], dtype=np.float32))
    return out


def test_regions_grow_forward_until_values_fit_and_backward_to_producers():
    ops = _ops(("a", ["x"], [], ["va"]), ("b", ["va"], [], ["vb"]), ("c", ["vb"], [], ["vc"]),
               ("d", ["vc"], [], ["vd"]), ("e", ["vd"], [], ["ve"]), ("f", ["x"], ["w"], ["vf"]),
               ("g", ["vf"], [], ["vg"]))
    ranges = _ranges(x=3.0, va=10.0, vb=1e6, vc=1e9, vd=20.0, ve=5.0, vf=2.0, vg=1.0)
    # vb, vc overflow: their producers b, c and consumers c, d; d's output fits, so the region ends there
    assert fp32_regions(ops, ranges) == [("b", "c", "d")]
    # an out-of-range constant pulls in its consumer, a region of its own
    consts = {"w": RangeStats()}
    consts["w"].add(np.array([1e5], dtype=np.float32))
    assert fp32_regions(ops, ranges, consts) == [("b", "c", "d"), ("f",)]
    # values mostly below 2^-24 (flushed to zero in FP16) count as out of range too
    tiny = _ranges(x=3.0, va=10.0, vb=1e-9, vc=1e-9, vd=20.0, ve=5.0, vf=2.0, vg=1.0)
    assert fp32_regions(ops, tiny) == [("b", "c", "d")]
    # a value the FP32 program does not show (fused away there) carries the problem on
    hidden = {k: v for k, v in ranges.items() if k != "vd"}
    assert fp32_regions(ops, hidden) == [("b", "c", "d", "e")]
    assert fp32_regions(ops, _ranges(x=3.0, va=1.0, vb=1.0, vc=1.0, vd=1.0, ve=1.0, vf=1.0, vg=1.0)) == []
    # a model input out of range: every op reading it, one region through the shared input
    big_input = _ranges(x=1e6, va=1.0, vb=1.0, vc=1.0, vd=1.0, ve=1.0, vf=1.0, vg=1.0)
    assert fp32_regions(ops, big_input) == [("a", "f")]


class _LoudInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.tanh(x / 1e5))


def test_an_input_beyond_fp16_range_keeps_the_op_reading_it_in_fp32():
    torch.manual_seed(0)
    model, x = _LoudInput().eval(), (torch.rand(2, 16) * 2 - 1) * 4e5
    fix = cl.find_fp32_ops(model, (x,), progress=False)
    assert fix.error_before > TOL and fix.found and fix.error_after <= TOL, fix
    assert fix.n_fp32 == 1 and fix.regions == [fix.ops]
    (reader,) = [op for op in fix.conversion.program.functions["main"].operations
                 if op.outputs and op.outputs[0].name in fix.op_outputs[fix.ops[0]]]
    assert [v.name for v in reader.inputs.values() if v.op is None] == ["x"], "it reads the model input itself"


def test_degenerate_reference_is_classified():
    assert "all zeros" in degenerate_reference(1e-3, math.inf)
    tiny = degenerate_reference(1e-10, 1.0)
    assert "flushes to zero" in tiny and "no signal" in tiny and "1e-10" in tiny
    assert degenerate_reference(0.5, 1.0) is None  # a real reference that is simply far off
    assert degenerate_reference(1e-4, 1e-3) is None  # max |r| = 0.1
    assert degenerate_reference(0.0, 0.0) is None and degenerate_reference(math.nan, math.nan) is None
    assert degenerate_reference(math.inf, math.inf) is None  # inf/NaN results are BROKEN, not degenerate
    assert degenerate_reference(np.float32(1e-10), np.float64(1.0)) == tiny


class _Scaled(torch.nn.Module):
    def __init__(self, model, scale):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.model(x) * self.scale


def test_summary_explains_an_output_below_fp16_subnormals_instead_of_calling_it_divergent():
    model, inputs, _ = sample_models.build("healthy")
    rep = cl.diagnose(_Scaled(model, 1e-9).eval(), inputs, progress=False)
    text = rep.summary()
    gpu = [line for line in text.splitlines() if line.startswith("- CPU_AND_GPU")][0]
    assert "DIFFERENT" not in text and "NO SIGNAL TO COMPARE" in gpu and "flushes to zero" in gpu, text
    row = rep.outputs.set_index("compute_unit").loc["CPU_AND_GPU"]
    assert row.rel_err == pytest.approx(1.0), "the FP16 result is all zeros"
    # the same model at a normal scale keeps the ordinary verdict
    plain = cl.diagnose(_Scaled(model, 1.0).eval(), inputs, progress=False).summary()
    assert "NO SIGNAL" not in plain and "close to PyTorch" in plain


def test_a_neural_network_conversion_is_refused_with_a_clear_error():
    model, inputs, _ = sample_models.build("healthy")
    with pytest.raises(ValueError, match="find_fp32_ops needs convert_to='mlprogram', got 'neuralnetwork'"):
        cl.find_fp32_ops(model, inputs, cl.ConversionOptions(convert_to="neuralnetwork", target="iOS14"),
                         progress=False)
