"""The torch FP64 golden run: by default only where the FP32 program and torch FP32 disagree beyond
FP32 noise (``golden="auto"``), always (True) or never (False); the Report says which outputs have one."""

import contextlib

import numpy as np
import pytest
import torch

import coreml_lab as cl
import sample_models
from coreml_lab.diagnosis import Diagnosis
from coreml_lab.output_statistics import GOLDEN_TOLERANCE


@pytest.fixture
def golden_runs(monkeypatch):
    """How many FP64 runs each diagnosis makes."""
    calls = []
    real = Diagnosis._golden_run

    def counting(self, tensors):
        calls.append(len(tensors))
        return real(self, tensors)

    monkeypatch.setattr(Diagnosis, "_golden_run", counting)
    return calls


def sample(name, golden, **kw):
    model, inputs, _ = sample_models.build(name)
    return cl.diagnose(model, inputs, cl.ConversionOptions(), compute_units=("CPU_ONLY", "CPU_AND_NE"),
                       progress=False, local=False, golden=golden, **kw)


@contextlib.contextmanager
def wrong_hardsigmoid():
    """A converter translation wrong on purpose (slope 1/5 instead of 1/6): off even at FP32."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    original = _TORCH_OPS_REGISTRY.get_func("hardsigmoid")

    @register_torch_op(override=True)
    def hardsigmoid(context, node):
        x = _get_inputs(context, node, expected=1)[0]
        context.add(mb.sigmoid_hard(x=x, alpha=1.0 / 5, beta=0.5, name=node.name))

    try:
        yield
    finally:
        _TORCH_OPS_REGISTRY.set_func_by_name(original, "hardsigmoid")


class TwoHeads(torch.nn.Module):
    """Two outputs: one through the wrongly translated hardsigmoid, one through relu."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.gate = torch.nn.Hardsigmoid()

    def forward(self, x):
        h = self.fc(x)
        return self.gate(h) * 2, torch.relu(h)


class Accumulates(torch.nn.Module):
    """A state that sums every step's input (a Core ML state is FP16, so the FP32 program differs from torch)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("total", torch.zeros(1, 4))

    def forward(self, x):
        self.total.add_(self.lin(x))
        return self.total * 2


def test_auto_skips_the_fp64_run_where_the_fp32_program_agrees_with_torch_and_says_so(golden_runs):
    rep = sample("healthy", "auto")
    assert golden_runs == []
    assert rep.outputs.golden_rel_err.isna().all() and rep.outputs.golden_max_abs_err.isna().all()
    assert rep.outputs.golden.str.startswith("none: FP32 program agrees with torch FP32 within FP32 noise").all()
    refs = rep.references.set_index("reference")
    assert list(refs.index) == ["fp32 program (emulated, exact)"]
    assert refs.loc["fp32 program (emulated, exact)", "against"] == "torch fp32"
    assert refs.loc["fp32 program (emulated, exact)", "rel_err"] <= GOLDEN_TOLERANCE
    assert (rep.outputs.rel_err > 0).all()  # the units are still measured, against torch FP32
    assert any(n.startswith("no FP64 golden run") for n in rep.notes)
    assert "no FP64 golden run" in rep.summary() and "FP32 conversion vs torch FP32" in rep.summary()


def test_auto_runs_it_only_for_the_outputs_where_fp32_program_and_torch_disagree(golden_runs):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(4, 8) * 2
    with wrong_hardsigmoid():
        rep = cl.diagnose(model, (x,), cl.ConversionOptions(), compute_units=("CPU_ONLY",), progress=False,
                          local=False)
    assert golden_runs == [1]
    gate, relu = rep.outputs.output.tolist()
    out = rep.outputs.set_index("output")
    assert np.isfinite(out.loc[gate, "golden_rel_err"]) and out.loc[gate, "golden"].startswith(
        "FP64: FP32 program and torch FP32 disagree")
    assert np.isnan(out.loc[relu, "golden_rel_err"]) and out.loc[relu, "golden"].startswith("none: FP32 program agrees")
    refs = rep.references.set_index(["reference", "output"])
    assert refs.loc[("torch fp32", gate), "against"] == "torch fp64"
    assert refs.loc[("torch fp32", gate), "rel_err"] < GOLDEN_TOLERANCE          # torch FP32 is right ...
    assert refs.loc[("fp32 program (emulated, exact)", gate), "rel_err"] > 1e-2   # ... the translation is not
    assert refs.loc[("fp32 program (emulated, exact)", relu), "against"] == "torch fp32"
    assert ("torch fp32", relu) not in refs.index
    assert any(repr(gate) in n and repr(relu) not in n and "FP64 golden run for" in n for n in rep.notes)


def test_golden_true_runs_it_on_every_input_and_false_never(golden_runs):
    data = [{"image": torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    on = sample("healthy", True, inputs=data)
    assert len(golden_runs) == 2
    assert on.outputs.golden_rel_err.notna().all() and (on.outputs.golden == "FP64: always (golden=True)").all()
    refs = on.references.set_index("reference")
    assert refs.loc["torch fp32", "rel_err"] < GOLDEN_TOLERANCE and (refs["against"] == "torch fp64").all()
    # the golden errors are the torch FP32 ones up to FP32 noise: why auto skips it here
    np.testing.assert_allclose(on.outputs.golden_max_abs_err, on.outputs.max_abs_err,
                               atol=2 * refs.loc["torch fp32", "max_abs_err"])
    off = sample("kv_decoder", False)
    assert len(golden_runs) == 2
    assert off.outputs.golden_rel_err.isna().all() and (off.outputs.golden == "none: golden=False").all()
    assert any(n.startswith("golden=False") for n in off.notes)
    with pytest.raises(ValueError, match="golden must be 'auto'"):
        sample("healthy", "yes")


def test_a_golden_run_of_a_step_starts_from_the_state_the_step_found(golden_runs):
    """The FP64 run comes after the units ran the step: torch's state buffers are put back as the
    step found them for it (else this accumulator would count the step twice), then left as the step left them."""
    torch.manual_seed(0)
    model = Accumulates().eval()
    steps = [{"x": torch.randn(1, 4)} for _ in range(3)]
    rep = cl.diagnose(model, (torch.randn(1, 4),), cl.ConversionOptions(target="iOS18"), steps=steps,
                      compute_units=("CPU_ONLY",), progress=False)
    assert len(golden_runs) == 3  # the FP16 state makes the FP32 program differ from torch at every step
    refs = rep.references.set_index("reference")
    assert refs.loc["torch fp32", "rel_err"] < GOLDEN_TOLERANCE
    assert refs.loc["fp32 program (emulated, exact)", "rel_err"] > GOLDEN_TOLERANCE
    assert (rep.steps[rep.steps.kind == "output"].rel_err < 1e-2).all()  # torch's own steps were not disturbed
    assert torch.equal(model.total, torch.zeros(1, 4))  # the user's buffers as they were
