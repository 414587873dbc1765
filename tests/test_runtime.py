"""Runtimes: 'auto' picks Core ML only on macOS; the Core ML runtime's plumbing is checked with test doubles.

Core ML cannot run on Linux. Here, test doubles named as such stand in for Core ML's
prediction (they run the emulator) so that we can check what the Core ML runtime asks
for: the compute units, the inputs, and every intermediate output via MLModelInspector.
The real Core ML comparison runs on macOS only.
"""

from __future__ import annotations

import platform

import coremltools as ct
import numpy as np
import pytest

import coreml_lab as cl
import sample_models
from coreml_lab import runtime as rt
from coreml_lab.emulator import EmulatedModel


@pytest.fixture(scope="module")
def conv():
    model, inputs, _ = sample_models.build("healthy")
    return cl.convert(model, inputs, cl.ConversionOptions())


def test_auto_is_the_emulator_off_macos():
    if platform.system() != "Darwin":
        assert rt.resolve("auto") == "emulator"
        with pytest.raises(RuntimeError, match="needs macOS with Core ML"):
            rt.resolve("coreml")
    with pytest.raises(ValueError, match="runtime must be one of"):
        rt.resolve("metal")


def test_emulator_runtime_names_itself(conv):
    r = rt.make_runtime(conv.mlmodel, "CPU_AND_NE", "emulator")
    assert (r.name, r.compute_unit) == ("emulator", "CPU_AND_NE")
    out = r.predict(conv.example_inputs.as_numpy())
    assert set(out) == {o.name for o in conv.mlmodel.get_spec().description.output}


class EmulatorStandInForCoreMLPredict:
    """TEST DOUBLE: replaces Core ML's MLModel.predict with the emulator and records the call."""

    calls: list = []

    def __init__(self, mlmodel, compute_units):
        self.compute_units = compute_units
        self._emulated = EmulatedModel(mlmodel, compute_units.name)

    def __call__(self, data):
        EmulatorStandInForCoreMLPredict.calls.append(("predict", self.compute_units, {k: np.array(v) for k, v in
                                                                                     data.items()}))
        return self._emulated.predict(data)


class EmulatorStandInForAsyncCoreMLModel:
    """TEST DOUBLE: replaces coremltools' async Core ML wrapper used by MLModelInspector."""

    created: list = []

    def __init__(self, spec, weights_dir, compute_units):
        self.compute_units = compute_units
        self.requested_outputs = [o.name for o in spec.description.output]
        self._emulated = EmulatedModel(ct.models.MLModel(spec, weights_dir=weights_dir, skip_model_load=True),
                                       compute_units.name)
        EmulatorStandInForAsyncCoreMLModel.created.append(self)

    @classmethod
    def from_spec_or_path(cls, spec_or_path, weights_dir, compute_units=ct.ComputeUnit.ALL, **kwargs):
        return cls(spec_or_path, weights_dir, compute_units)

    async def load(self):
        return None

    async def predict(self, inputs):
        return self._emulated.predict(inputs)

    def cleanup(self):
        return None


def test_coreml_runtime_asks_for_compute_units_inputs_and_every_intermediate(conv, monkeypatch):
    from coremltools.models.ml_program.experimental import debugging_utils

    monkeypatch.setattr(debugging_utils, "MLModelAsyncWrapper", EmulatorStandInForAsyncCoreMLModel)
    EmulatorStandInForCoreMLPredict.calls.clear()
    EmulatorStandInForAsyncCoreMLModel.created.clear()

    def load_with_double(mlmodel, compute_units):
        model = ct.models.MLModel(mlmodel.get_spec(), weights_dir=mlmodel.weights_dir, skip_model_load=True)
        model.predict = EmulatorStandInForCoreMLPredict(model, compute_units)
        return model

    runtime = rt.CoreMLRuntime(conv.mlmodel, "CPU_AND_NE", load=load_with_double)
    feeds = conv.example_inputs.as_numpy()
    before = {k: v.copy() for k, v in feeds.items()}
    records = []
    out = runtime.predict(feeds, on_op=records.append)

    assert runtime.name == "coreml" and runtime.ct_compute_unit == ct.ComputeUnit.CPU_AND_NE
    (kind, cu, sent), = EmulatorStandInForCoreMLPredict.calls
    assert cu == ct.ComputeUnit.CPU_AND_NE and sent.keys() == feeds.keys()
    assert all(np.array_equal(sent[k], feeds[k]) for k in feeds)
    assert all(np.array_equal(before[k], feeds[k]) for k in feeds), "the user's inputs are untouched"
    want = EmulatedModel(conv.mlmodel, "CPU_AND_NE").predict(feeds)
    assert all(np.array_equal(out[k], want[k]) for k in want)

    assert EmulatorStandInForAsyncCoreMLModel.created
    assert {w.compute_units for w in EmulatorStandInForAsyncCoreMLModel.created} == {ct.ComputeUnit.CPU_AND_NE}
    requested = {n for w in EmulatorStandInForAsyncCoreMLModel.created for n in w.requested_outputs}
    program_vars = {op.outputs[0].name for op in conv.program.functions["main"].operations
                    if op.op_type != "const"}
    assert program_vars <= requested, "every op output was requested from Core ML"
    got = {r.name for r in records}
    assert program_vars <= got and all(r.device == "CPU_AND_NE" for r in records)
    conv_rec = next(r for r in records if r.op_type == "conv")
    assert isinstance(conv_rec.value, np.ndarray) and conv_rec.value.ndim == 4


def _load_with_double(mlmodel, compute_units):
    """TEST DOUBLE loader: the model with the emulator standing in for Core ML's predict."""
    model = ct.models.MLModel(mlmodel.get_spec(), weights_dir=mlmodel.weights_dir, skip_model_load=True)
    model.predict = EmulatorStandInForCoreMLPredict(model, compute_units)
    return model


def test_a_diagnosis_on_core_ml_measures_what_the_runtime_streams(monkeypatch):
    """The macOS path of a diagnosis (CoreMLRuntime.stream into the statistics), with the emulator
    standing in for Core ML: every streamed op output becomes a layer row, in the order streamed,
    measured against the exact FP32 program."""
    from coremltools.models.ml_program.experimental import debugging_utils

    from coreml_lab.convert import convert
    from coreml_lab.diagnosis import Diagnosis

    monkeypatch.setattr(debugging_utils, "MLModelAsyncWrapper", EmulatorStandInForAsyncCoreMLModel)
    monkeypatch.setattr(rt, "_load_mlmodel", _load_with_double)
    model, inputs, _ = sample_models.build("healthy")
    conv16 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp16"))
    conv32 = convert(None, options=conv16.options.replace(precision="fp32", fp32_ops=()),
                     prepared=conv16.prepared, layer_mapping=True)
    orders = []
    real_stream = rt.CoreMLRuntime.stream

    def watching_stream(self, feeds, on_value):
        return real_stream(self, feeds, lambda order, record: orders.append(order) or on_value(order, record))

    monkeypatch.setattr(rt.CoreMLRuntime, "stream", watching_stream)
    units = ["CPU_ONLY", "CPU_AND_NE"]
    report = Diagnosis(conv16, conv32, units, "coreml", local=False).run([conv16.example_inputs.as_numpy()],
                                                                        progress=False)
    assert report.runtime == "coreml" and report.environment["measured"]
    per_unit = len(orders) // 2
    assert per_unit and orders == list(range(per_unit)) * 2
    for cu in units:
        rows = report.layers[report.layers.compute_unit == cu]
        assert len(rows) == per_unit and set(rows.device) == {"coreml"}
        assert list(rows["index"]) == list(range(per_unit))
        compared = rows.dropna(subset=["rel_err"])
        assert len(compared) > per_unit // 2 and (compared.rel_err < 1e-2).all()
    assert set(report.outputs.compute_unit) == set(units) and (report.outputs.rel_err < 1e-2).all()


def test_run_coroutine_works_inside_a_running_event_loop():
    import asyncio

    async def answer():
        return 42

    async def outer():
        return rt.run_coroutine(answer())  # as from a Jupyter cell, where a loop is running

    assert asyncio.run(outer()) == 42


@pytest.mark.macos
@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML itself only runs on macOS")
def test_real_coreml_matches_the_emulator_within_fp16_tolerance(conv):  # pragma: no cover - macOS
    rep = cl.diagnose(*sample_models.build("healthy")[:2], runtime="coreml", progress=False)
    assert set(rep.layers.runtime) == {"coreml"}
    assert (rep.outputs.rel_err < 1e-2).all()
