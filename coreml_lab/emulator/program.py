"""Getting the MIL program out of a Core ML model, walking its ops, and naming ops for people.

An in-memory MLModel from ``ct.convert`` carries its MIL program (with scopes that
name the torch module of each op). A model loaded from disk does not: its program
is rebuilt from the protobuf with coremltools' own milproto loader, without scopes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import coremltools as ct
from coremltools.converters.mil.frontend.milproto.load import load as _load_milproto
from coremltools.converters.mil.mil.scope import ScopeSource


class NotAnMLProgramError(TypeError):
    """The model is a neural network (or pipeline) rather than an ML Program."""


def load_mlmodel(model) -> ct.models.MLModel:
    """An MLModel from an MLModel or a path to a ``.mlpackage``, never loading Core ML itself."""
    if isinstance(model, ct.models.MLModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"no Core ML model at {str(path)!r} (expected a .mlpackage directory)")
        if path.suffix not in (".mlpackage", ".mlmodel"):
            raise ValueError(f"{str(path)!r} is not a Core ML model: expected a .mlpackage (or .mlmodel) path")
        return ct.models.MLModel(str(path), skip_model_load=True)
    raise TypeError(
        f"expected a coremltools MLModel or a path to a .mlpackage, got {type(model).__name__}"
    )


def mil_program(mlmodel: ct.models.MLModel):
    """The model's MIL program: the in-memory one if present, else rebuilt from the spec."""
    spec = mlmodel.get_spec()
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise NotAnMLProgramError(
            f"this model is a {kind!r}, not an ML Program: the emulator runs ML Programs only. "
            "Re-convert with convert_to='mlprogram' (or minimum_deployment_target >= iOS15), "
            "or run it with Core ML on macOS."
        )
    prog = getattr(mlmodel, "_mil_program", None)
    if prog is not None:
        return prog
    weights_dir = mlmodel.weights_dir or ""
    return _load_milproto(spec, specification_version=spec.specificationVersion, file_weights_dir=weights_dir)


def function_name(mlmodel: ct.models.MLModel) -> str:
    return getattr(mlmodel, "function_name", None) or "main"


def module_path(op) -> str | None:
    """Dotted torch module path recorded in the op's scopes (``blocks.0.bn``), or None.

    TorchScript scopes list the module attribute names followed by the torch value
    name (``['blocks', '0', 'bn', '24']``); the value name is dropped. Exported
    programs record stack traces instead: resolving those to module paths is the
    job of :mod:`coreml_lab.mapping`.
    """
    scopes = getattr(op, "scopes", None)
    if not scopes:
        return None
    names = scopes.get(ScopeSource.TORCHSCRIPT_MODULE_NAME)
    if not names or len(names) < 2:
        return None
    return ".".join(names[:-1])


def walk_ops(where, *, nested: bool, consts: bool = False) -> Iterator:
    """The MIL ops of a program, function or block, in program order: the one op walk of the kit.

    ``where``: a ``Program`` (every function, in order), a ``Function`` or a ``Block``.
    ``nested`` has no default, every caller chooses:

    * ``nested=False`` - the top level only. An op holding blocks (``cond``, ``while_loop``)
      is one op, the way the interpreter runs it as one step: use it wherever ops are paired
      with the interpreter's steps or with each other by position (a diagnosis's rows, the
      pairing of an FP16 program with its FP32 reference, module outputs, the FP16 range
      table).
    * ``nested=True`` - also the ops of nested blocks, each right after the op holding them
      (pre-order): use it for what the program contains (op counts, lint, scopes saved
      with a cached conversion).

    ``consts``: also yield ``const`` ops (default: skip them - they are weights, not work).
    """
    if hasattr(where, "functions"):
        for function in where.functions.values():
            yield from walk_ops(function, nested=nested, consts=consts)
        return
    for op in where.operations:
        if consts or op.op_type != "const":
            yield op
        if nested:
            for block in op.blocks:
                yield from walk_ops(block, nested=True, consts=consts)
