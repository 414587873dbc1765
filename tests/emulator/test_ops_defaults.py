"""Kernels take the defaults of optional inputs from coremltools' op definitions, never restate them.

Every kernel in the registry is read (its function and the module helpers it calls) for the
inputs it asks of its ``OpCall``; every op class coremltools registers for that op type
(iOS15..iOS18) says which of them are optional and what ``default_inputs()`` declares.
No hand-kept list of values: both sides come from the registries.
"""

from __future__ import annotations

import ast
import inspect
import sys
from functools import cache

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.ops import defs  # noqa: F401 (registers the op classes)
from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry
from opcheck import convert_program, mil_program

from coreml_lab.emulator import EmulatedModel, registry
from coreml_lab.emulator.interpreter import Step
from coreml_lab.emulator.opcall import OpCall

ACCESSORS = {"value", "int", "ints", "float", "bool", "str", "tensor", "raw"}
OPSETS = [getattr(ct.target, name) for name in registry.OPSETS]


@cache
def _module_functions(module_name: str) -> dict:
    tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def kernel_reads(fn) -> list[tuple[ast.Call, str | None, bool]]:
    """``call.<accessor>(name[, default])`` in ``fn`` and the module functions it calls:
    (node, literal name or None, whether a default is passed)."""
    funcs = _module_functions(fn.__module__)
    seen, out = set(), []

    def walk(name):
        if name in seen or name not in funcs:
            return
        seen.add(name)
        for node in ast.walk(funcs[name]):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name):
                walk(f.id)
            if (isinstance(f, ast.Attribute) and f.attr in ACCESSORS and isinstance(f.value, ast.Name)
                    and f.value.id == "call" and node.args):
                first = node.args[0]
                literal = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
                has_default = len(node.args) > 1 or any(k.arg == "default" for k in node.keywords)
                out.append((node, literal, has_default))

    walk(fn.__name__)
    return out


class _Stand:
    """A required input as ``default_inputs()`` sees it (rank, shape, dtype)."""

    rank = 4
    shape = (2, 3, 4, 5)
    dtype = types.fp32
    val = None
    sym_type = None


def _bare(cls, present=None):
    """An instance of ``cls`` whose required inputs (those in ``present``, if given) are stand-ins."""
    op = cls.__new__(cls)
    for name, spec in cls.input_spec.input_types.items():
        given = not spec.optional and (present is None or name in present)
        setattr(op, name, _Stand() if given else None)
    return op


def _plain(v):
    if isinstance(v, range):
        return list(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def expected_default(op_type: str, target, name: str):
    """What coremltools declares for ``name``: the opset's own class, or the first later class
    that adds the input (its default keeps the earlier behaviour) where that class can judge the
    op from the inputs the opset has; None if nothing is declared."""
    versions = sorted(SSAOpRegistry.core_ops[op_type].items())
    own = dict(versions)[max(v for v, _ in versions if v <= target)]
    if name in own.input_spec.input_types:
        return _plain(dict(own.default_inputs(_bare(own)).items()).get(name))
    for v, cls in versions:
        if v > target and name in cls.input_spec.input_types:
            try:
                declared = dict(cls.default_inputs(_bare(cls, own.input_spec.input_types)).items())
            except AttributeError:  # its default needs an input this opset does not have
                return None
            return _plain(declared.get(name))
    return None


def _cases():
    registry._load_kernels()
    for op_type, k in sorted(registry._KERNELS.items()):
        versions = SSAOpRegistry.core_ops.get(op_type, {})
        for target in OPSETS:
            if any(v <= target for v in versions):
                yield op_type, k, target


CASES = list(_cases())


def test_the_registries_meet():
    # the check below is only as good as its coverage: most kernels, every opset, many reads
    assert len({op for op, _, _ in CASES}) > 150
    assert {t for _, _, t in CASES} == set(OPSETS)
    assert sum(len(kernel_reads(k.fn)) for _, k, _ in CASES) > 1000


def test_no_kernel_restates_a_declared_default():
    restated, unnamed = [], []
    for op_type, k, target in CASES:
        for node, name, has_default in kernel_reads(k.fn):
            if not has_default or node.func.attr in ("tensor", "raw"):
                continue  # tensor(name, dtype=...) converts; it never supplies a value
            if name is None:
                unnamed.append(f"{k.fn.__module__}:{node.lineno}")
                continue
            declared = expected_default(op_type, target, name)
            if declared is not None:
                restated.append(f"{op_type} ({target.name}) {name!r}: coremltools declares {declared!r}, "
                                f"{k.fn.__module__}:{node.lineno} passes {ast.unparse(node.args[1])}")
    assert not unnamed, f"accessors forwarding a default under a computed name: {sorted(set(unnamed))}"
    assert not restated, "\n".join(sorted(set(restated)))


def _absent(op):
    step = Step()
    step.op, step.inputs = op, {}
    return OpCall(step)


def test_absent_inputs_read_as_declared_defaults():
    checked = 0
    for op_type, k, target in CASES:
        versions = sorted(SSAOpRegistry.core_ops[op_type].items())
        own = dict(versions)[max(v for v, _ in versions if v <= target)]
        call = _absent(_bare(own))
        for _node, name, has_default in kernel_reads(k.fn):
            if name is None or has_default:
                continue
            spec = own.input_spec.input_types.get(name)
            if spec is not None and not spec.optional:
                continue
            want = expected_default(op_type, target, name)
            got = _plain(call.value(name))
            assert got == want, f"{op_type} ({target.name}) input {name!r}: absent reads {got!r}, " \
                                f"coremltools declares {want!r}"
            checked += want is not None
    assert checked > 300


def _run_without(ml, op_type: str, names: tuple[str, ...], feeds: dict):
    """Emulate ``ml`` with and without the materialised inputs ``names`` of its ``op_type`` ops."""
    full = EmulatedModel(ml).predict(feeds)
    model = EmulatedModel(ml)
    dropped = 0
    for step in model.interpreter.steps():
        if step.op.op_type == op_type:
            for name in names:
                dropped += step.inputs.pop(name, None) is not None
    assert dropped == len(names), f"{op_type} did not carry {names}"
    return full, model.predict(feeds)


@pytest.mark.parametrize("op_type, target, build, shape, names", [
    # epsilon in x's dtype: fp16(1e-4) for an FP16 inverse
    ("inverse", "iOS17", lambda x: mb.cast(x=mb.inverse(x=mb.cast(x=x, dtype="fp16")), dtype="fp32"),
     (2, 3), ("epsilon",)),
    ("max_pool", "iOS15", lambda x: mb.max_pool(x=x, kernel_sizes=[2, 2], pad_type="valid"),
     (1, 2, 4, 4), ("strides", "pad", "ceil_mode")),
    ("layer_norm", "iOS16", lambda x: mb.layer_norm(x=x, axes=[0, 1, 2]), (2, 3, 4), ("axes", "epsilon")),
    ("conv", "iOS17", lambda x: mb.conv(x=x, weight=np.ones((2, 2, 3, 3), np.float32), pad_type="same"),
     (1, 2, 5, 5), ("strides", "dilations", "groups", "pad")),
    ("crop_resize", "iOS17", lambda x: mb.crop_resize(
        x=x, boxes=np.array([[0, 0, 2, 2], [1, 1, 3, 3]], np.float32), target_height=2, target_width=2),
     (2, 1, 4, 4), ("box_indices", "spatial_scale", "pad_value")),
    ("topk", "iOS17", lambda x: mb.topk(x=x, k=2), (3, 5), ("axis", "ascending", "output_indices_dtype")),
])
def test_a_program_without_the_default_inputs_runs_the_same(op_type, target, build, shape, names):
    """The builder materialises declared defaults as constants; dropping them from the compiled
    op (a program from another producer) must not change what the kernel computes."""
    rng = np.random.default_rng(0)
    x = (rng.random(shape, dtype=np.float32) + 0.5).astype(np.float32)
    ml = convert_program(mil_program(build, {"x": mb.TensorSpec(shape=shape)}, target), target, passes=False)
    full, without = _run_without(ml, op_type, names, {"x": x})
    assert full.keys() == without.keys()
    for key in full:
        np.testing.assert_array_equal(without[key], full[key], err_msg=f"{op_type} output {key}")


def test_an_input_a_later_opset_added_reads_as_its_default():
    # iOS15 gather has no batch_dims / validate_indices: it behaves as their later defaults
    ml = convert_program(mil_program(lambda x: mb.gather(x=x, indices=np.array([2, 0], np.int32), axis=1),
                                     {"x": mb.TensorSpec(shape=(2, 3))}, "iOS15"), "iOS15", passes=False)
    (op,) = [s.op for s in EmulatedModel(ml).interpreter.steps() if s.op.op_type == "gather"]
    assert "batch_dims" not in op.inputs
    assert registry.declared_default(op, "batch_dims") == 0
    assert registry.declared_default(op, "validate_indices") is False
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (got,) = EmulatedModel(ml).predict({"x": x}).values()
    np.testing.assert_array_equal(got, x[:, [2, 0]])
