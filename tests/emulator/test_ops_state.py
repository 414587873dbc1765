"""Emulator kernels for stateful (iOS18) models: read_state and coreml_update_state.

Real stateful torch models (``register_buffer`` + in-place updates, converted
with ``ct.StateType``) are predicted twice with the same state to check that
updates persist in the state buffers, that a fresh ``make_state()`` starts from
zeros, and that predicting without a state fails clearly. A MIL program checks
that a value read before an update keeps its old content.
"""

from __future__ import annotations

import warnings

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from opcheck import FP16_PROFILES, FP16_RTOL, op_types, require_kernels

from coreml_lab.emulator import EmulatedModel
from coreml_lab.emulator.model import _ARRAY_DTYPES, InputSpec


def _described_states(mlmodel) -> list[InputSpec]:
    """State features as the model description lists them (``description.state``)."""
    out = []
    for st in mlmodel.get_spec().description.state:
        t = st.type.stateType.arrayType
        out.append(InputSpec(st.name, "state", _ARRAY_DTYPES.get(t.dataType, "fp16"), tuple(t.shape)))
    return out


def emulated(mlmodel, cu="CPU_ONLY") -> EmulatedModel:
    return EmulatedModel(mlmodel, cu)


def test_emulated_model_finds_state_features():
    ml = accumulator_model("fp32")
    specs = _described_states(ml)
    assert [s.name for s in specs] == ["acc"]
    em = EmulatedModel(ml)
    assert [s.name for s in em.state_specs] == ["acc"]
    assert [(s.dtype, s.shape) for s in em.state_specs] == [(s.dtype, s.shape) for s in specs]


# ----------------------------------------------------------------------------- torch models


class Accumulator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("acc", torch.zeros(2, 3))

    def forward(self, x):
        self.acc.add_(x)
        return self.acc * 2


class KVCache(torch.nn.Module):
    """A tiny KV-cache: write one row at position ``pos``, return the whole cache scaled."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kv", torch.zeros(1, 4, 3))

    def forward(self, y, pos):
        p = pos[0]
        self.kv[:, p:p + 1, :] = y
        return self.kv * 1.0


_MODELS: dict = {}


def _convert(module, inputs, specs, states, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), inputs, check_trace=False)
        return ct.convert(
            traced, inputs=specs, states=states, convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        )


def accumulator_model(precision):
    key = ("acc", precision)
    if key not in _MODELS:
        _MODELS[key] = _convert(
            Accumulator(), (torch.ones(2, 3),), [ct.TensorType(name="x", shape=(2, 3))],
            [ct.StateType(wrapped_type=ct.TensorType(shape=(2, 3), dtype=np.float16), name="acc")], precision)
    return _MODELS[key]


def kv_model(precision):
    key = ("kv", precision)
    if key not in _MODELS:
        _MODELS[key] = _convert(
            KVCache(), (torch.ones(1, 1, 3), torch.tensor([1], dtype=torch.int32)),
            [ct.TensorType(name="y", shape=(1, 1, 3)), ct.TensorType(name="pos", shape=(1,), dtype=np.int32)],
            [ct.StateType(wrapped_type=ct.TensorType(shape=(1, 4, 3), dtype=np.float16), name="kv")], precision)
    return _MODELS[key]


X1 = np.array([[0.5, -1.25, 3.0], [1e-3, 100.0, -7.5]], np.float32)
X2 = np.array([[0.25, 2.0, -3.0], [0.3, 0.7, 1.0]], np.float32)


def _acc_reference(xs):
    """The state is an FP16 buffer: every update rounds to FP16."""
    acc = np.zeros((2, 3), np.float16)
    outs = []
    for x in xs:
        acc = (acc.astype(np.float32) + x).astype(np.float16)
        outs.append(2.0 * acc.astype(np.float32))
    return outs, acc


@pytest.mark.parametrize("cu", ["CPU_ONLY", "CPU_AND_GPU"])
def test_accumulator_persists_across_predictions(cu):
    ml = accumulator_model("fp32")
    assert {"read_state", "coreml_update_state"} <= op_types(ml)
    em = emulated(ml, cu)
    state = em.make_state()
    got1 = em.predict({"x": X1}, state=state)[next(iter(em.output_names))]
    got2 = em.predict({"x": X2}, state=state)[next(iter(em.output_names))]
    (want1, want2), acc = _acc_reference([X1, X2])
    np.testing.assert_allclose(got1, want1, rtol=1e-6)
    np.testing.assert_allclose(got2, want2, rtol=1e-6)
    # the buffer holds the FP16 accumulation, updated in place
    np.testing.assert_array_equal(state.read("acc"), acc)
    assert state.read("acc").dtype == np.float16


def test_fresh_state_starts_from_zeros_and_states_are_independent():
    em = emulated(accumulator_model("fp32"))
    name = next(iter(em.output_names))
    s1 = em.make_state()
    em.predict({"x": X1}, state=s1)
    em.predict({"x": X1}, state=s1)
    s2 = em.make_state()
    np.testing.assert_array_equal(s2.read("acc"), np.zeros((2, 3), np.float16))
    got = em.predict({"x": X2}, state=s2)[name]
    np.testing.assert_allclose(got, 2.0 * X2.astype(np.float16).astype(np.float32), rtol=1e-6)
    # s1 was not touched by predictions on s2
    np.testing.assert_array_equal(s1.read("acc"), _acc_reference([X1, X1])[1])


def test_predict_without_state_raises():
    em = emulated(accumulator_model("fp32"))
    with pytest.raises(ValueError, match="stateful.*make_state"):
        em.predict({"x": X1})


@pytest.mark.parametrize("cu", FP16_PROFILES)
def test_accumulator_fp16_program(cu):
    ml = accumulator_model("fp16")
    assert {"read_state", "coreml_update_state"} <= op_types(ml)
    em = emulated(ml, cu)
    state = em.make_state()
    name = next(iter(em.output_names))
    outs = [em.predict({"x": x}, state=state)[name] for x in (X1, X2, X1)]
    wants, acc = _acc_reference([X1, X2, X1])
    for got, want in zip(outs, wants):
        np.testing.assert_allclose(got, want, rtol=FP16_RTOL, atol=1e-2)
    np.testing.assert_allclose(state.read("acc").astype(np.float32), acc.astype(np.float32), rtol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_kv_cache_slice_update(precision):
    require_kernels("slice_update", "concat", "expand_dims")
    ml = kv_model(precision)
    assert {"read_state", "coreml_update_state", "slice_update"} <= op_types(ml)
    cus = ["CPU_ONLY"] if precision == "fp32" else list(FP16_PROFILES)
    rows = [np.array([[[1.0, 2.0, 3.0]]], np.float32), np.array([[[-4.0, 0.5, 8.0]]], np.float32),
            np.array([[[7.0, 7.0, 7.0]]], np.float32)]
    for cu in cus:
        em = emulated(ml, cu)
        name = next(iter(em.output_names))
        state = em.make_state()
        want = np.zeros((1, 4, 3), np.float32)
        for pos, row in zip([2, 0, 2], rows):
            got = em.predict({"y": row, "pos": np.array([pos], np.int32)}, state=state)[name]
            want[:, pos] = row[:, 0]
            np.testing.assert_allclose(got, want, rtol=1e-3 if precision == "fp16" else 1e-6, err_msg=cu)
        np.testing.assert_array_equal(state.read("kv"), want.astype(np.float16))


# ----------------------------------------------------------------------------- MIL program


@pytest.mark.parametrize("cu", ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"])
def test_read_returns_a_copy_not_a_view(cu):
    @mb.program(input_specs=[mb.StateTensorSpec((2, 3), dtype=types.fp16), mb.TensorSpec((2, 3), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(s, x):
        before = mb.read_state(input=s, name="before")
        after = mb.coreml_update_state(state=s, value=mb.add(x=before, y=x), name="after")
        return mb.identity(x=before, name="old"), mb.identity(x=after, name="new")

    require_kernels("identity")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                        compute_precision=ct.precision.FLOAT16)
    em = emulated(ml, cu)
    state = em.make_state()
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float16)
    out1 = em.predict({"x": x}, state=state)
    out2 = em.predict({"x": x}, state=state)
    np.testing.assert_array_equal(out1["old"], np.zeros((2, 3)))
    np.testing.assert_array_equal(out1["new"], x)
    np.testing.assert_array_equal(out2["old"], x)          # the update of this run did not leak into it
    np.testing.assert_array_equal(out2["new"], 2 * x.astype(np.float32))
    np.testing.assert_array_equal(state.read("s"), 2 * x)
