"""The FP16 (or mixed) program made from an FP32 conversion with coremltools' own FP16 pass: one conversion, not two.

coremltools converts a torch model at FP32 and then, for FP16, runs ``common::add_fp16_cast``
(with the ``op_selector`` of mixed precision) and the passes its default pipeline runs after it
(``update_output_dtypes``, ``cast_optimization``, the cleanup passes ...), then its ML Program
backend. :func:`derive` does the same from the FP32 program of a finished FP32 conversion: a copy
read back from that model's spec (names as users see them; scopes restored), those passes, the
backend (``ct.convert`` of a MIL program with exactly that pipeline). A diagnosis thus gets its
FP32 reference and the diagnosed program from one conversion from torch.

The torch frontend does one thing differently at FP16 from iOS16 on: outputs (and inputs and
states given without a dtype) default to FP16. Outputs are set here as it sets them; inputs or
states without a dtype are a case :func:`derivable` refuses (the caller converts again).
"""

from __future__ import annotations

import re

import coremltools as ct
import numpy as np
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
from coremltools.converters.mil.input_types import StateType, TensorType
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.scope import ScopeSource

from .emulator.program import walk_ops
from .options import ConversionOptions

#: names coremltools' sanitizer made of names starting with a digit (what :func:`_unsanitize_names` undoes)
_SANITIZED_OP = re.compile(r"op_[0-9]")
_SANITIZED_VAR = re.compile(r"var_[0-9]")

#: coremltools' default pipeline from its FP16 pass on (what a direct FP16 conversion runs after it)
FP16_PASS = "common::add_fp16_cast"


def fp16_passes() -> list[str]:
    """The passes of coremltools' default pipeline from ``common::add_fp16_cast`` to the end."""
    passes = list(ct.PassPipeline.DEFAULT.passes)
    return passes[passes.index(FP16_PASS):]


def wanted(options: ConversionOptions, source_kind: str) -> bool:
    """Whether a conversion of ``options`` from a ``source_kind`` source is made from its FP32 conversion:
    FP16 or mixed ML Programs (derived), and FP32 ones that are compressed (the FP32 conversion, compressed)."""
    return options.convert_to == "mlprogram" and source_kind != "mlpackage" and (
        options.precision != "fp32" or options.compression is not None)


def derivable(options: ConversionOptions) -> str | None:
    """Why ``options`` cannot be derived from their FP32 conversion (None when they can)."""
    if options.convert_to != "mlprogram":
        return "the derivation makes ML Programs only"
    if options.precision == "mixed":
        return ("fp32_ops name ops as a direct conversion names them, and a few ops coremltools names itself "
                "are named apart in a derived program")
    if _default_fp16_io(options):
        untyped = [s.name for s in (options.inputs or ()) if isinstance(s, (TensorType, StateType))
                   and getattr(s, "dtype", None) is None]
        if untyped:
            return (f"input(s) {', '.join(map(str, untyped))} have no dtype, which the torch frontend makes FP16 "
                    "at FP16 precision")
    return None


def _default_fp16_io(options: ConversionOptions) -> bool:
    target = options.ct_target
    return target is not None and target.value >= ct.target.iOS16.value


def derive(mlmodel32, options: ConversionOptions):
    """The ML Program of ``options`` (FP16 or mixed) made from ``mlmodel32``, the FP32 conversion of the same
    model with the same other options; returns an MLModel. Raises whatever coremltools raises."""
    spec = mlmodel32.get_spec()
    program = load_milproto(spec, specification_version=spec.specificationVersion,
                             file_weights_dir=mlmodel32.weights_dir or "")
    source = getattr(mlmodel32, "_mil_program", None)
    if source is not None:
        _copy_scopes(source, program)
    function = program.functions["main"]
    _unsanitize_names(function)
    _unguard_gathers(function)
    if _default_fp16_io(options):
        _default_outputs_to_fp16(function, options)
    pipeline = ct.PassPipeline(pass_names=fp16_passes(), pipeline_name="coreml_lab_fp16")
    derived = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=options.ct_target,
                         compute_units=options.ct_compute_units, compute_precision=options.compute_precision(),
                         pass_pipeline=pipeline)
    for key, value in spec.description.metadata.userDefined.items():  # the torch source, not "milinternal"
        derived.user_defined_metadata[key] = value
    return derived


def _default_outputs_to_fp16(function, options: ConversionOptions) -> None:
    """As the torch frontend does at FP16 from iOS16: an FP32 output the user gave no dtype for becomes FP16."""
    given = {}
    for spec in options.outputs or ():
        if isinstance(spec, TensorType) and spec.name is not None and spec.dtype is not None:
            given[spec.name] = spec.dtype
    out_types = []
    for i, var in enumerate(function.outputs):
        user = given.get(var.name)
        if user is None and options.outputs is not None and i < len(options.outputs):
            user = getattr(options.outputs[i], "dtype", None)
        dtype = user if user is not None else (types.fp16 if var.dtype == types.fp32 else var.dtype)
        out_types.append(TensorType(name=var.name, dtype=dtype))
    function.set_output_types(out_types)


def _unsanitize_names(function) -> None:
    """Give back the torch names coremltools' name sanitizer prefixed (op ``op_42`` / var ``var_42`` -> ``42``).

    A direct FP16 conversion casts ops under their torch names and sanitizes after (op
    ``op_42_cast_fp16``, var ``var_42_cast_fp16``); the FP32 program has been sanitized already,
    so without this its casts would be named ``op_42_cast_fp16`` twice. The backend sanitizes the
    result again, so the names users see are a direct conversion's.
    """
    outputs = {id(v) for v in function.outputs}
    for op in walk_ops(function, nested=True, consts=True):
        if _SANITIZED_OP.match(op.name or ""):
            op.name = op.name[len("op_"):]
        for var in op.outputs:
            if id(var) not in outputs and _SANITIZED_VAR.match(var.name):
                var.name = var.name[len("var_"):]


def _guarded_indices(op):
    """The indices ``guard_negative_gather_indices`` guarded for the gather ``op``, or None.

    The guard it writes: ``select(cond=greater_equal(x=i, y=0), a=i, b=add(x=i, y=size))``.
    """
    select = op.inputs.get("indices")
    select = select.op if select is not None else None
    if select is None or select.op_type != "select":
        return None
    cond, a, b = select.inputs["cond"].op, select.inputs["a"], select.inputs["b"].op
    if cond is None or cond.op_type != "greater_equal" or b is None or b.op_type != "add":
        return None
    zero = cond.inputs["y"].val
    if cond.inputs["x"] is not a or b.inputs["x"] is not a or zero is None or np.any(zero != 0):
        return None
    return a


def _unguard_gathers(function) -> None:
    """Gathers on the indices as they were before coremltools guarded them against negative values.

    The FP32 program was guarded (``guard_negative_gather_indices`` runs after the FP16 pass); a direct
    FP16 conversion guards the indices after casting them to INT16, so the guard is taken off here and
    the FP16 passes put it back where a direct conversion has it. The guard ops left unused go with
    dead-code elimination, which those passes run.
    """
    from coremltools.converters.mil import Builder as mb

    for op in list(walk_ops(function, nested=True)):
        if op.op_type not in ("gather", "gather_nd"):
            continue
        indices = _guarded_indices(op)
        if indices is None:
            continue
        kwargs = {name: var for name, var in op.inputs.items() if name != "indices"}
        with op.enclosing_block:
            new = getattr(mb, op.op_type)(**kwargs, indices=indices, name=op.name, before_op=op)
        new.op.scopes.update(op.scopes)
        op.enclosing_block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
        name = op.outputs[0].name
        op.enclosing_block.remove_ops([op])
        new.name = name


def _copy_scopes(source, program) -> None:
    """Scopes of the FP32 program's ops onto the same ops read back from its spec (the spec keeps none)."""
    scopes = {op.name: op.scopes for op in walk_ops(source, nested=True, consts=True) if getattr(op, "scopes", None)}
    for op in walk_ops(program, nested=True, consts=True):
        saved = scopes.get(op.name)
        if saved:
            for src, values in saved.items():
                if isinstance(src, ScopeSource):
                    op.scopes[src] = list(values)
