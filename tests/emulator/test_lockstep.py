"""Sharing one computation between compute units: the kernel declarations it relies on hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from opcheck import run_mil

from coreml_lab.emulator.interpreter import Step
from coreml_lab.emulator.lockstep import SharedRun, numeric_signature, var_input_names
from coreml_lab.emulator.profiles import FP16, FP32, HAZARDS, PROFILES, Precision
from coreml_lab.emulator.registry import _KERNELS, ALL_USES, _load_kernels, lookup

RNG = np.random.default_rng(0)
POSITIVE = {"x": RNG.uniform(0.1, 0.9, (3, 5)).astype(np.float32)}
PAIR = {"x": RNG.uniform(0.5, 2.0, (3, 5)).astype(np.float32), "y": RNG.uniform(0.5, 2.0, (3, 5)).astype(np.float32)}
SIGNED = {"x": (RNG.standard_normal((3, 5)) * 4).astype(np.float32)}
W_CONV = RNG.standard_normal((3, 4, 3, 3)).astype(np.float16)
W_LIN = RNG.standard_normal((5, 8)).astype(np.float16)
B_LIN = RNG.standard_normal(5).astype(np.float16)

#: op type -> (body over FP16 inputs, inputs)
SPECIAL = {
    "relu": (lambda x: mb.relu(x=x), SIGNED),
    "relu6": (lambda x: mb.relu6(x=x), SIGNED),
    "conv": (lambda x: mb.conv(x=x, weight=W_CONV, pad_type="same"),
             {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)}),
    "linear": (lambda x: mb.linear(x=x, weight=W_LIN, bias=B_LIN), {"x": RNG.standard_normal((2, 8)).astype(np.float32)}),
    "matmul": (lambda x, y: mb.matmul(x=x, y=y), {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32),
                                                  "y": RNG.standard_normal((2, 8, 4)).astype(np.float32)}),
}


def _case(op_type):
    if op_type in SPECIAL:
        return SPECIAL[op_type]
    if op_type == "cast":
        return None
    fn = getattr(mb, op_type)
    if lookup(op_type).fn.__name__ in ("binary", "real_div", "compare"):
        return (lambda x, y: fn(x=x, y=y)), PAIR
    return (lambda x: fn(x=x)), POSITIVE


def _narrowed_kernels():
    _load_kernels()
    return sorted(op for op, k in _KERNELS.items() if k.uses != ALL_USES or k.compute_free_on_fp16)


def _profile(compute=FP32, accumulate=FP32, hazards=()):
    return PROFILES["CPU_AND_GPU"].with_device("GPU", fp16=Precision(FP16, compute, accumulate), hazards=hazards)


@pytest.mark.parametrize("op_type", _narrowed_kernels())
def test_kernels_do_not_depend_on_the_precision_fields_they_leave_out(op_type):
    """Changing a field a kernel does not use (compute: with FP16 inputs) leaves every bit the same."""
    kernel = lookup(op_type)
    base = _profile()
    variants = []
    if "compute" not in kernel.uses or kernel.compute_free_on_fp16:
        variants.append(_profile(compute=FP16))
    if "accumulate" not in kernel.uses:
        variants.append(_profile(accumulate=FP16))
    if "hazards" not in kernel.uses:
        variants.append(_profile(hazards=tuple(HAZARDS)))
    assert variants, f"{op_type} narrows nothing"
    if op_type == "cast":  # FP32 input: cast reads it as held, whatever the compute dtype
        data = {"x": RNG.standard_normal((3, 5)).astype(np.float32)}
        body, fp16 = (lambda x: mb.cast(x=x, dtype="fp16")), False
    else:
        body, data = _case(op_type)
        fp16 = True
    want = run_mil(body, data, fp16=fp16, compute_unit=base)
    for profile in variants:
        got = run_mil(body, data, fp16=fp16, compute_unit=profile)
        for g, w in zip(got, want):
            assert np.array_equal(np.asarray(g), np.asarray(w)), (op_type, profile.devices[0].fp16)


def test_compute_dtype_matters_when_an_input_is_wider_than_fp16():
    """The compute_free_on_fp16 exemption needs FP16 inputs: an FP32 input rounded to FP16 first differs."""
    x = torch.tensor([1.0001], dtype=torch.float32)  # not representable in FP16

    step = Step()  # the parts of a compiled step numeric_signature reads
    step.blocks, step.op, step.hazards = [], object(), frozenset()
    step.outputs = [("y", "fp16", torch.float16)]
    step.inputs = {"x": "x"}
    step.kernel = lookup("add")
    step.precision = Precision(FP16, FP32, FP32)
    wide = numeric_signature(step, {"x": x})
    narrow = numeric_signature(step, {"x": x.half()})
    assert wide[2] == FP32 and narrow[2] is None


def test_shared_run_refuses_interpreters_of_different_programs():
    import coremltools as ct

    from coreml_lab.emulator.interpreter import Interpreter

    @mb.program(input_specs=[mb.TensorSpec(shape=(2,))], opset_version=ct.target.iOS17)
    def relu(x):
        return mb.relu(x=x)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2,))], opset_version=ct.target.iOS17)
    def sigmoid(x):
        return mb.sigmoid(x=x)

    a = Interpreter(relu.functions["main"], PROFILES["CPU_ONLY"])
    b = Interpreter(sigmoid.functions["main"], PROFILES["CPU_ONLY"])
    with pytest.raises(ValueError, match="same program"):
        SharedRun({"A": a, "B": b})
    with pytest.raises(ValueError, match="at least one"):
        SharedRun({})


def test_a_lockstep_run_holds_widened_weights_one_step_at_a_time():
    """An FP16 weight widened to FP32 (CPU, GPU) is dropped once the run has passed its step (memory
    of a real-size diagnosis); a plain run keeps it for the next predict. Results are the same."""
    import coremltools as ct

    from coreml_lab.emulator.interpreter import RELEASE_MIN_BYTES, Interpreter
    from coreml_lab.emulator.opcall import Const

    n = 512  # 512 x 512 FP16 weight: 1 MiB once widened to FP32
    weight = (RNG.standard_normal((n, n)) / n).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, n))], opset_version=ct.target.iOS17)
    def prog(x):
        h = mb.linear(x=mb.cast(x=x, dtype="fp16"), weight=weight)
        return mb.cast(x=mb.relu(x=h), dtype="fp32")

    function = prog.functions["main"]
    x = torch.from_numpy(RNG.standard_normal((2, n)).astype(np.float32))
    units = {cu: Interpreter(function, PROFILES[cu]) for cu in ("CPU_ONLY", "CPU_AND_GPU")}
    (big,) = [c for c in units["CPU_ONLY"].consts.values() if isinstance(c, Const) and np.size(c.value) == n * n]
    assert n * n * 4 >= RELEASE_MIN_BYTES

    plain = {cu: interp.run({"x": x}) for cu, interp in units.items()}
    assert torch.float32 in big._tensors  # a plain run keeps the widened copy for the next one

    run = SharedRun(units)
    run.start({cu: {"x": x} for cu in units})
    for index in range(run.n_steps):
        run.step(index)
        run.free(index)
    assert list(big._tensors) == [None] and big._tensors[None].dtype == torch.float16
    outs = run.finish()
    for cu in units:
        for name, value in plain[cu].items():
            assert torch.equal(outs[cu][name], value)


def test_a_lockstep_step_is_measured_without_its_dead_inputs_and_with_its_widened_weights():
    """Values no later step reads are dropped before ``on_step`` measures the step's outputs (a
    diagnosis' memory peak is the largest step's inputs, outputs and measurements at once), while
    the step's widened weights stay for its local re-run; the values measured are those of a plain run."""
    import coremltools as ct

    from coreml_lab.emulator.interpreter import Interpreter
    from coreml_lab.emulator.lockstep import Lockstep
    from coreml_lab.emulator.opcall import Const

    n = 512
    weight = (RNG.standard_normal((n, n)) / n).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, n))], opset_version=ct.target.iOS17)
    def prog(x):
        h = mb.linear(x=mb.cast(x=x, dtype="fp16"), weight=weight)
        return mb.cast(x=mb.relu(x=h), dtype="fp32")

    function = prog.functions["main"]
    x = torch.from_numpy(RNG.standard_normal((2, n)).astype(np.float32))
    ref = Interpreter(function, PROFILES["CPU_ONLY"])
    units = {cu: Interpreter(function, PROFILES[cu]) for cu in ("CPU_AND_GPU", "CPU_AND_NE")}
    plain = {cu: interp.run({"x": x}) for cu, interp in units.items()}
    (big,) = [c for c in units["CPU_AND_GPU"].consts.values() if isinstance(c, Const) and np.size(c.value) == n * n]
    lock = Lockstep(ref, units, with_inputs=False, ref_of={})
    seen = []

    def on_step(index, step, values, refs):
        for cu, env in lock.units.envs.items():
            for name in var_input_names(step):
                if name in step.frees:
                    assert name not in env, (cu, step.op.op_type, name)
            for (name, _, _), value in zip(step.outputs, values[cu]):
                seen.append((cu, name, value))
        if step.op.op_type == "linear":
            assert torch.float32 in big._tensors, "the widened weight is kept until the step is measured"

    def on_reference(step, name, value):
        return
        yield

    from coreml_lab.reference import drain
    drain(lock.run({"x": x}, {"x": x}, on_step, on_reference))
    assert any(op == "linear" for op in (s.op.op_type for s in lock.steps))
    for cu, name, value in seen:
        if name in plain[cu]:
            assert torch.equal(value.float(), plain[cu][name].float())
