"""Shared helpers for per-op emulator tests: convert a tiny torch model, run it, compare.

``check_torch_op`` is the acceptance check of the emulator issue: the FP32
conversion under CPU_ONLY must match torch within ``rtol``; the FP16 conversion
under GPU and NE profiles must match a float64 torch reference within FP16
tolerance; and the MIL program must really contain the op under test.

The rest are the small helpers the op test files share instead of each keeping
a copy: kernel requirements, a function-wrapping module, a fake ``OpCall``, and
MIL-builder programs converted and emulated in the few ways the files need
(inputs x0, x1, ... with a reference function; one input ``x`` with a fixed
reference; named inputs over several compute units; keyword inputs without
graph passes).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types

from coreml_lab.emulator import EmulatedModel
from coreml_lab.emulator.profiles import gpu_fp16_accumulation
from coreml_lab.emulator.registry import declared_default, lookup

FP16_RTOL = 2e-2
FP16_PROFILES = ("CPU_AND_GPU", "CPU_AND_NE")


def convert_torch(module: torch.nn.Module, inputs: Sequence[torch.Tensor], precision: str = "fp32",
                  target: str = "iOS17", input_dtypes=None) -> ct.models.MLModel:
    """Trace and convert ``module`` with inputs named x0, x1, ... (no coreml_lab.convert: a test double-free path)."""
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, tuple(inputs))
        specs = []
        for i, t in enumerate(inputs):
            dtype = None
            if input_dtypes is not None:
                dtype = input_dtypes[i]
            elif t.dtype in (torch.int32, torch.int64):
                dtype = np.int32
            specs.append(ct.TensorType(name=f"x{i}", shape=tuple(t.shape), dtype=dtype))
        return ct.convert(
            traced, inputs=specs, convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, target),
        )


def _all_ops(mlmodel) -> list:
    """Every op of the converted program, nested blocks included."""
    ops = []

    def walk(block):
        for op in block.operations:
            ops.append(op)
            for b in op.blocks:
                walk(b)

    for f in mlmodel._mil_program.functions.values():
        walk(f)
    return ops


def op_types(mlmodel) -> set[str]:
    return {op.op_type for op in _all_ops(mlmodel)}


def feeds(inputs: Sequence[torch.Tensor]) -> dict:
    out = {}
    for i, t in enumerate(inputs):
        arr = t.detach().numpy()
        if arr.dtype == np.int64:
            arr = arr.astype(np.int32)
        out[f"x{i}"] = arr
    return out


def torch_outputs(module, inputs, dtype=torch.float32) -> list[np.ndarray]:
    module = module.eval()
    with torch.no_grad():
        if dtype == torch.float64:
            import copy
            module = copy.deepcopy(module).double()
            inputs = [t.double() if t.is_floating_point() else t for t in inputs]
        out = module(*inputs)
    if isinstance(out, torch.Tensor):
        out = [out]
    return [o.detach().numpy() for o in out]


def as_core_ml_shape(ref) -> np.ndarray:
    """A reference result shaped as Core ML returns it: a rank-0 result as shape (1,) (MLMultiArray has
    no rank 0; coremltools' testing_utils.compare_shapes accepts exactly that pair). The emulator's
    predict does the same."""
    ref = np.asarray(ref)
    return ref.reshape(1) if ref.shape == () else ref


def _close(got, want, rtol, atol, what):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    want = as_core_ml_shape(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what, equal_nan=True)


def check_torch_op(module: torch.nn.Module, inputs: Sequence[torch.Tensor], expect_ops: Iterable[str],
                   rtol: float = 1e-5, atol: float = 1e-6, fp16_rtol: float = FP16_RTOL,
                   fp16_atol: float | None = None, target: str = "iOS17",
                   compute_units: Sequence[str] = FP16_PROFILES, check_fp16: bool = True):
    """Convert ``module`` at FP32 and FP16 and check the emulator against torch; returns the FP32 MLModel."""
    want32 = torch_outputs(module, inputs)
    ml32 = convert_torch(module, inputs, "fp32", target)
    missing = set(expect_ops) - op_types(ml32)
    assert not missing, f"conversion did not produce {missing}; it has {sorted(op_types(ml32))}"
    got = EmulatedModel(ml32, "CPU_ONLY").predict(feeds(inputs))
    names = [v.name for v in ml32._mil_program.functions["main"].outputs]
    for name, w in zip(names, want32):
        _close(got[name], w, rtol, atol, f"FP32 CPU_ONLY output {name}")
    if not check_fp16:
        return ml32
    want64 = torch_outputs(module, inputs, torch.float64)
    ml16 = convert_torch(module, inputs, "fp16", target)
    assert set(expect_ops) <= op_types(ml16) | {"cast"}, "FP16 conversion lost the op under test"
    names16 = [v.name for v in ml16._mil_program.functions["main"].outputs]
    for cu in compute_units:
        got = EmulatedModel(ml16, cu).predict(feeds(inputs))
        for name, w in zip(names16, want64):
            scale = float(np.max(np.abs(w))) if np.size(w) and np.isfinite(w).all() else 1.0
            a = fp16_atol if fp16_atol is not None else 1e-2 * max(scale, 1e-3)
            _close(got[name], w, fp16_rtol, a, f"FP16 {cu} output {name}")
    return ml32


def fp16_accumulation_runs(module, inputs, target="iOS17", ml16=None):
    """The FP16 model on the GPU profile, accumulating in FP32 and in FP16: (float64 torch, acc32, acc16, max|torch|).

    ``ml16`` is the FP16 conversion of ``module`` when the caller already has it.
    """
    if ml16 is None:
        ml16 = convert_torch(module, inputs, "fp16", target)
    want = torch_outputs(module, inputs, torch.float64)[0]
    name = ml16._mil_program.functions["main"].outputs[0].name
    acc32 = EmulatedModel(ml16, "CPU_AND_GPU").predict(feeds(inputs))[name].astype(np.float64)
    acc16 = EmulatedModel(ml16, gpu_fp16_accumulation()).predict(feeds(inputs))[name].astype(np.float64)
    return want, acc32, acc16, float(np.max(np.abs(want)))


# ----------------------------------------------------------------------------- shared small helpers


def require_kernels(*ops: str) -> None:
    """Fail (never skip) when a model also needs kernels of another op family that are not registered."""
    missing = [o for o in ops if lookup(o) is None]
    if missing:
        pytest.fail(f"kernels of other op families are not registered: {missing}")


class Fn(torch.nn.Module):
    """Wraps a tensor function in a module, so each test states the torch code it converts inline."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def predict_one(mlmodel, data: dict, compute_unit="CPU_ONLY"):
    """Emulate a model that has exactly one output and return that output."""
    out = EmulatedModel(mlmodel, compute_unit).predict(data)
    assert len(out) == 1
    return next(iter(out.values()))


class _FakeVar:
    """What an op definition's ``default_inputs()`` reads of a required input: rank, shape, dtype."""

    def __init__(self, t: torch.Tensor | None):
        self.shape = tuple(t.shape) if t is not None else (1, 1, 1, 1)
        self.rank = len(self.shape)
        self.dtype = types.fp16 if t is not None and t.dtype == torch.float16 else types.fp32
        self.val = None


def definition_op(op_type, target=ct.target.iOS18, inputs=None):
    """A bare instance of coremltools' op class for ``op_type`` at ``target`` (no builder, no program).

    Required inputs are stand-ins carrying a shape (from ``inputs``' tensors when given);
    optional inputs are absent. Enough for ``default_inputs()`` and the emulator's
    :func:`declared_default`.
    """
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    versions = SSAOpRegistry.core_ops.get(op_type, {})
    usable = [v for v in versions if v <= target]
    if not usable:
        return type("Op", (), {"op_type": op_type})()
    cls = versions[max(usable)]
    op = cls.__new__(cls)
    inputs = inputs or {}
    for name, spec in cls.input_spec.input_types.items():
        t = inputs.get(name)
        setattr(op, name, None if spec.optional and t is None else _FakeVar(t))
    return op


class FakeOpCall:
    """Just enough of OpCall to drive a kernel directly with parameters no builder or converter would accept.

    ``tensors`` are what ``tensor``/``raw`` return; keyword ``values`` are what the
    value accessors return (unconverted, but ``int``/``ints`` give ints as OpCall does).
    Values not given read as coremltools' declared defaults (iOS18 definition), as in OpCall.
    """

    accumulate = torch.float32
    compute_dtype = torch.float32

    def __init__(self, op_type, tensors=None, *, n_outputs=1, **values):
        self.op = definition_op(op_type, inputs=tensors)
        self._t, self._v = tensors or {}, values
        self.outputs = [None] * n_outputs

    def has(self, name):
        return name in self._t or name in self._v

    def tensor(self, name, default=None, dtype=None):
        t = self._t.get(name, default)
        return t.to(dtype) if dtype is not None and t is not None else t

    def raw(self, name, default=None):
        return self._t.get(name, default)

    def value(self, name, default=None):
        if name in self._v:
            return self._v[name]
        declared = declared_default(self.op, name)
        return default if declared is None else declared

    def ints(self, name, default=None):
        v = self.value(name)
        return default if v is None else [int(i) for i in np.asarray(v).reshape(-1)]

    def int(self, name, default=None):
        v = self.value(name)
        return default if v is None else int(v)

    float = bool = str = value

    def hazard(self, rule):
        return False

    def storage_dtype(self, i=0):
        return torch.float32


# ----------------------------------------------------------------------------- MIL builder programs


def _target(target):
    return getattr(ct.target, target) if isinstance(target, str) else target


def convert_program(prog, target="iOS17", precision="fp32", passes=True) -> ct.models.MLModel:
    """Convert a MIL program quietly: target ("iOS17" or ct.target), precision ("fp32"/"fp16" or ct.precision)."""
    if isinstance(precision, str):
        precision = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
    kwargs = {} if passes else {"pass_pipeline": ct.PassPipeline.EMPTY}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=_target(target),
                          compute_precision=precision, **kwargs)


def mil_program(build, specs: dict, target="iOS17") -> Program:
    """What ``@mb.program`` builds from ``build(*inputs)``, for inputs named by ``specs`` (name -> mb.TensorSpec)."""
    with Function(specs, opset_version=_target(target)) as func:
        outs = build(*[func.inputs[name] for name in specs])
        func.set_outputs(list(outs) if isinstance(outs, (list, tuple)) else [outs])
    prog = Program()
    prog.add_function("main", func)
    return prog


def tensor_specs(inputs: dict) -> dict:
    """An input spec per named numpy array, with its shape and MIL dtype."""
    return {name: mb.TensorSpec(shape=a.shape, dtype=types.numpy_type_to_builtin_type(a.dtype))
            for name, a in inputs.items()}


def mil_ops(mlmodel, op_type) -> list:
    """The ops of type ``op_type`` in the converted program, nested blocks included."""
    return [op for op in _all_ops(mlmodel) if op.op_type == op_type]


# -- inputs x0, x1, ... and a reference function (activation, elementwise)


def convert_mil(build, inputs, target="iOS17", precision="fp32", passes=True) -> ct.models.MLModel:
    """Build ``build(x0, x1, ...)`` over inputs shaped/typed like the numpy arrays ``inputs`` and convert it."""
    specs = tensor_specs({f"x{i}": np.asarray(a) for i, a in enumerate(inputs)})
    return convert_program(mil_program(build, specs, target), target, precision, passes)


def mil_outputs(mlmodel, inputs, compute_unit="CPU_ONLY") -> list:
    """Emulate ``mlmodel`` on ``inputs`` fed as x0, x1, ...; the outputs in program order."""
    out = EmulatedModel(mlmodel, compute_unit).predict({f"x{i}": a for i, a in enumerate(inputs)})
    names = [v.name for v in mlmodel._mil_program.functions["main"].outputs]
    return [out[n] for n in names]


def check_mil(build, inputs, reference, op, target="iOS17", rtol=1e-5, atol=1e-6, exact=False, fp16=True,
              passes=True):
    """FP32 CPU_ONLY vs ``reference`` (float64 for float inputs); FP16 GPU/NE profiles within FP16 tolerance."""
    inputs = [np.asarray(a) for a in inputs]
    ml = convert_mil(build, inputs, target, passes=passes)
    assert op in op_types(ml), f"program lost {op}: {sorted(op_types(ml))}"
    wide = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in inputs]
    want = reference(*wide)
    (got,) = mil_outputs(ml, inputs)
    if exact:
        np.testing.assert_array_equal(got, want, err_msg=f"FP32 {op}")
    else:
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol, err_msg=f"FP32 {op}")
    if not fp16:
        return ml
    ml16 = convert_mil(build, inputs, target, "fp16")
    assert op in op_types(ml16)
    want16 = reference(*[a.astype(np.float16).astype(np.float64) if a.dtype.kind == "f" else a for a in inputs])
    scale = max(float(np.max(np.abs(want16))), 1e-3)
    for cu in FP16_PROFILES:
        (got,) = mil_outputs(ml16, inputs, cu)
        np.testing.assert_allclose(got.astype(np.float64), want16, rtol=FP16_RTOL, atol=1e-2 * scale,
                                   err_msg=f"FP16 {cu} {op}")
    return ml


# -- one input named x and a fixed float64 reference (normalization, reduction)


def convert_unary_mil(build, shape, target="iOS17", precision="fp32", dtype=None) -> ct.models.MLModel:
    """Convert a one-input MIL program ``build(x)``; the input is named ``x`` (fp32 unless ``dtype``)."""
    return convert_program(mil_program(build, {"x": mb.TensorSpec(shape=shape, dtype=dtype)}, target),
                           target, precision)


def run_unary(mlmodel, x, compute_unit="CPU_ONLY") -> np.ndarray:
    """The single output of a model of ``convert_unary_mil`` for input ``x``."""
    return predict_one(mlmodel, {"x": x}, compute_unit)


def check_unary_mil(build, x, ref, op_type, target="iOS17", rtol=1e-5, atol=1e-6, fp16=True, fp16_rtol=FP16_RTOL):
    """FP32 program on CPU_ONLY vs ``ref`` (float64 numpy); FP16 program on GPU/NE within FP16 tolerance."""
    ml = convert_unary_mil(build, x.shape, target)
    assert op_type in op_types(ml), f"program lost {op_type}: {sorted(op_types(ml))}"
    got = run_unary(ml, x)
    ref = as_core_ml_shape(ref)
    assert got.shape == ref.shape, f"shape {got.shape} != {ref.shape}"
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=rtol, atol=atol)
    if not fp16:
        return
    ml16 = convert_unary_mil(build, x.shape, target, "fp16")
    assert op_type in op_types(ml16)
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    for cu in FP16_PROFILES:
        got = run_unary(ml16, x, cu)
        np.testing.assert_allclose(got.astype(np.float64), ref, rtol=fp16_rtol, atol=1e-2 * max(scale, 1e-3),
                                   err_msg=cu)


# -- named inputs, several compute units, expected outputs (recurrent, resize)


def emulate_mil(build, inputs: dict, target=ct.target.iOS17, fp16=False, compute_units=("CPU_ONLY",),
                expect_op=None) -> dict:
    """Build ``build(*inputs)`` over the named numpy ``inputs``, convert, emulate -> {compute_unit: [outputs]}."""
    ml = convert_program(mil_program(build, tensor_specs(inputs), target), target, "fp16" if fp16 else "fp32")
    if expect_op is not None:
        assert expect_op in op_types(ml), f"{expect_op} missing: {sorted(op_types(ml))}"
    in_names = [i.name for i in ml.get_spec().description.input]
    out_names = [o.name for o in ml.get_spec().description.output]
    feed = dict(zip(in_names, inputs.values()))
    return {cu: [EmulatedModel(ml, cu).predict(feed)[n] for n in out_names] for cu in compute_units}


def check_mil_outputs(build, inputs, want, target=ct.target.iOS17, expect_op=None, rtol=1e-5, atol=1e-6,
                      fp16=True, fp16_atol=1e-2, check_shape=False):
    """FP32 CPU_ONLY against the list ``want`` at rtol; FP16 GPU/NE within FP16_RTOL and ``fp16_atol`` * max|want|."""
    got = emulate_mil(build, inputs, target, False, ("CPU_ONLY",), expect_op)["CPU_ONLY"]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if check_shape:
            assert g.shape == np.shape(w), f"shape {g.shape} != {np.shape(w)}"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    if fp16:
        res = emulate_mil(build, inputs, target, True, FP16_PROFILES, expect_op)
        for cu, outs in res.items():
            for g, w in zip(outs, want):
                scale = max(float(np.max(np.abs(w))), 1e-3) if np.size(w) else 1.0
                np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=FP16_RTOL, atol=fp16_atol * scale,
                                           err_msg=cu)


# -- keyword inputs, no graph passes, FP16 by explicit casts (scatter_gather, tensor)


def run_mil(body, inputs: dict, target: str = "iOS17", fp16: bool = False, compute_unit: str = "CPU_ONLY") -> list:
    """Build ``body(**input_vars)`` as a MIL program, convert without graph passes, run the emulator.

    With ``fp16`` float inputs are cast to FP16 first and FP16 outputs back to FP32,
    so the ops under test are FP16-typed. Returns the outputs as a list.
    """
    specs = {n: mb.TensorSpec(shape=a.shape, dtype=types.int32 if a.dtype.kind in "iu" else types.fp32)
             for n, a in inputs.items()}
    with Function(specs, _target(target)) as func:
        args = {n: (mb.cast(x=v, dtype="fp16") if fp16 and v.dtype == types.fp32 else v)
                for n, v in func.inputs.items()}
        outs = body(**args)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        func.set_outputs([mb.cast(x=o, dtype="fp32") if o.dtype == types.fp16 else o for o in outs])
    prog = Program()
    prog.add_function("main", func)
    ml = convert_program(prog, target, "fp32", passes=False)
    data = {k: (v.astype(np.int32) if v.dtype.kind in "iu" else v.astype(np.float32)) for k, v in inputs.items()}
    got = EmulatedModel(ml, compute_unit).predict(data)
    return [got[v.name] for v in ml._mil_program.functions["main"].outputs]
