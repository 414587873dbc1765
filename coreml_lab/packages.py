"""Existing Core ML packages: loading one to diagnose, checking feeds against its inputs, checking its pairing.

A package is diagnosed in one of two ways (:func:`coreml_lab.diagnosis.diagnose`):

* on its own: its own program executed exactly in FP32 (the :data:`~.emulator.profiles.EXACT_FP32`
  profile) is the reference, paired by identity. No framework reference exists, so what the
  package already bakes in (weights rounded to FP16, compressed) is not visible: :data:`NO_FRAMEWORK_NOTE`;
* with the torch model it came from: the kit's FP32 conversion of that model is the reference,
  paired by structure (:func:`.pairing.pair_programs`); :func:`check_paired` refuses a model that
  is not the package's source.

Every refusal is a :class:`PackageError` naming what was expected.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import coremltools as ct
import numpy as np
import torch

from . import messages as msgs
from .conversion import Conversion
from .emulator.model import input_specs
from .emulator.program import mil_program
from .options import ConversionOptions
from .sources import ExampleInputs, Source

#: why a package diagnosed on its own has no framework reference, and what that hides
NO_FRAMEWORK_NOTE = ("no framework reference: errors are measured against the package's own program executed "
                     "exactly in FP32 (every FP16 tensor and weight widened), so weight rounding or compression "
                     "already baked into the package is not visible; pass the torch model it came from "
                     "(diagnose(torch_model, inputs, mlmodel=package)) to see it")

#: Core ML specification version -> the deployment target that introduced it
_TARGET_OF_SPEC = {6: "iOS15", 7: "iOS16", 8: "iOS17", 9: "iOS18"}

#: fewer paired ops than this (fraction of the package's ops) means the model is not the package's source
MIN_PAIRED = 0.5

_RECONVERT = ("diagnose needs an ML Program: re-convert the source model with "
              "ct.convert(..., convert_to='mlprogram') (or minimum_deployment_target=ct.target.iOS15 or later), "
              "or pass the torch model itself to coreml_lab.diagnose")


class PackageError(ValueError):
    """A model, folder, feeds or source model that cannot be diagnosed as a Core ML package."""


def is_package(model) -> bool:
    """Whether ``model`` is meant as an existing Core ML model: an MLModel, a folder, or a
    ``.mlpackage`` / ``.mlmodel`` path."""
    if isinstance(model, ct.models.MLModel):
        return True
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        return path.suffix.lower() in (".mlpackage", ".mlmodel") or path.is_dir()
    return False


def load_package(model) -> ct.models.MLModel:
    """The ML Program of ``model`` (MLModel or path), carrying its MIL program built once.

    Every compute unit's emulator then runs the very same program object. An in-memory
    MLModel that already carries its program is returned as it is; otherwise a new MLModel
    is made (the user's object is never modified).
    """
    if isinstance(model, ct.models.MLModel):
        ml, where = model, "this MLModel"
    elif isinstance(model, (str, os.PathLike)):
        ml, where = _load_path(Path(model)), repr(str(model))
    else:
        raise PackageError(f"expected a .mlpackage path or a coremltools MLModel, got {type(model).__name__}")
    spec = ml.get_spec()
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise PackageError(f"{where} is a {kind!r} Core ML model, not an ML Program: {_RECONVERT}")
    if getattr(ml, "_mil_program", None) is not None:
        return ml
    program = mil_program(ml)
    return ct.models.MLModel(spec, weights_dir=ml.weights_dir, mil_program=program, skip_model_load=True)


def _load_path(path: Path) -> ct.models.MLModel:
    if not path.exists():
        raise FileNotFoundError(f"no Core ML model at {str(path)!r} (expected a .mlpackage directory)")
    if path.is_dir():
        if not (path / "Manifest.json").is_file():
            raise PackageError(f"{str(path)!r} is a folder but not a Core ML package: it has no Manifest.json "
                               "(expected a .mlpackage directory as MLModel.save writes it)")
        if path.suffix.lower() != ".mlpackage":
            raise PackageError(f"{str(path)!r} holds a Manifest.json but is not named *.mlpackage: "
                               "expected a .mlpackage directory (rename it)")
    elif path.suffix.lower() != ".mlmodel":
        raise PackageError(f"{str(path)!r} is not a Core ML model: expected a .mlpackage directory")
    try:
        return ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as exc:
        raise PackageError(f"coremltools cannot read {str(path)!r} as a Core ML model "
                           f"({type(exc).__name__}: {str(exc)[:200]}); expected a .mlpackage saved by "
                           "MLModel.save") from exc


def expected_inputs(mlmodel) -> str:
    """The package's inputs as people read them: ``x: fp32 (1, 3, 32, 32); ids: int32 (1, 8)``."""
    return "; ".join(s.describe() for s in input_specs(mlmodel))


def check_feeds(mlmodel, feeds: dict, what: str = "the feeds") -> dict:
    """``feeds`` (input name -> array or tensor) checked against the package's inputs: names,
    shapes and dtype kinds (float inputs take floats, integer inputs integers). Returns the feeds
    as numpy arrays (new arrays, the caller's untouched); raises a PackageError listing what
    the package expects."""
    if not isinstance(feeds, dict):
        raise PackageError(f"{what} must be a dict of input name -> array; the package expects "
                           f"{expected_inputs(mlmodel)}")
    specs = input_specs(mlmodel)
    problems = []
    names = [s.name for s in specs]
    missing = [n for n in names if n not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    out = {}
    for spec in specs:
        if spec.name not in feeds:
            continue
        value = feeds[spec.name]
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if spec.kind == "image":
            problems.append(f"{spec.name!r} is an image input, which diagnose does not take yet")
            continue
        float_input = spec.dtype.startswith("fp")
        if arr.dtype.kind not in "biuf" or (float_input and arr.dtype.kind != "f") or \
                (not float_input and arr.dtype.kind == "f"):
            problems.append(f"{spec.name!r} has dtype {arr.dtype} (expected {spec.dtype})")
        elif not spec.accepts_shape(arr.shape):
            problems.append(f"{spec.name!r} has shape {tuple(arr.shape)}")
        else:
            out[spec.name] = np.array(arr, copy=True)
    if problems:
        raise PackageError(f"{what} do not match the package's inputs ({'; '.join(problems)}). "
                           f"The package expects: {expected_inputs(mlmodel)}")
    return out


def package_inputs(mlmodel, example) -> ExampleInputs:
    """The example inputs of a package diagnosed on its own, from one dict of feeds."""
    if example is None:
        raise PackageError("diagnosing a Core ML package needs example inputs: a dict of input name -> array; "
                           f"the package expects {expected_inputs(mlmodel)}")
    names = [s.name for s in input_specs(mlmodel)]
    if isinstance(example, ExampleInputs):
        example = dict(zip(example.names, example.tensors))
    if isinstance(example, (torch.Tensor, np.ndarray)):
        example = (example,)
    if isinstance(example, (tuple, list)):  # in the package's input order
        if len(example) != len(names):
            raise PackageError(f"{len(example)} example input(s) for a package with {len(names)} input(s); "
                               f"the package expects {expected_inputs(mlmodel)}")
        example = dict(zip(names, example))
    feeds = check_feeds(mlmodel, example, "the example inputs")
    return ExampleInputs(tuple(names), tuple(torch.from_numpy(feeds[n]) for n in names))


def renamed_inputs(mlmodel, inputs: ExampleInputs) -> ExampleInputs:
    """The torch model's example inputs under the package's input names (matched in order), so that
    its FP32 conversion takes the same inputs as the package; refuses inputs that differ."""
    specs = input_specs(mlmodel)
    shapes = [tuple(t.shape) for t in inputs.tensors]
    if len(specs) != len(shapes) or not all(s.accepts_shape(shape) for s, shape in zip(specs, shapes)):
        raise PackageError(
            "the torch model is not the one the package came from: its inputs differ. The model takes "
            f"{inputs.describe()}; the package expects {expected_inputs(mlmodel)}")
    return ExampleInputs(tuple(s.name for s in specs), inputs.tensors)


def target_of(mlmodel) -> str:
    """The deployment target the package was made for (from its specification version)."""
    version = mlmodel.get_spec().specificationVersion
    return _TARGET_OF_SPEC.get(version, "iOS18" if version > 9 else "iOS15")


def package_conversion(mlmodel, inputs: ExampleInputs, options: ConversionOptions | None = None,
                       source: Source | None = None, path=None) -> Conversion:
    """A :class:`~.convert.Conversion` standing for an existing package (nothing converted).

    ``source``: the torch source it came from, when known (its runs are then the references).
    """
    options = options or ConversionOptions(target=target_of(mlmodel))
    spec = mlmodel.get_spec()
    note = msgs.make("info", "loaded an existing Core ML model: nothing was converted; options other than "
                     "compute_units do not apply", "coreml_lab")
    if source is None:
        source = Source("mlpackage", mlmodel, path=Path(path) if path is not None else None,
                        notes=["loaded an existing Core ML model: nothing to convert"])
    return Conversion(mlmodel=mlmodel, program=mlmodel._mil_program, options=options,
                      spec_version=spec.specificationVersion, wall_time=0.0,
                      messages=msgs.import_messages() + [note], method="loaded", source_kind="mlpackage",
                      example_inputs=inputs, source=source,
                      onnx_path=source.onnx_path if source.kind != "mlpackage" else None)


def check_paired(package: Conversion, reference: Conversion, ref_of: dict, unpaired: list) -> None:
    """Refuse a torch model whose FP32 conversion does not pair with the package: outputs differ,
    or most of the package's ops have no counterpart. The error says what differed."""
    dev_f = next(iter(package.program.functions.values()))
    ref_f = next(iter(reference.program.functions.values()))
    problems = []
    ref_outs = {v.name: v for v in ref_f.outputs}
    unmatched = [v for v in dev_f.outputs if ref_of.get(v.name) not in ref_outs]
    differ = [v for v in dev_f.outputs if v not in unmatched and tuple(v.shape) != tuple(ref_outs[ref_of[v.name]].shape)]
    if len(dev_f.outputs) != len(ref_outs) or unmatched or differ:
        def shapes(vs):
            return ", ".join(f"{v.name} {tuple(v.shape)}" for v in vs)
        problems.append(f"the outputs differ (the package's: {shapes(dev_f.outputs)}; the torch model's "
                        f"conversion: {shapes(ref_f.outputs)}"
                        + (f"; no counterpart for {[v.name for v in unmatched]}" if unmatched else "") + ")")
    ops = [op for op in dev_f.operations if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
    if ops and len(unpaired) > (1 - MIN_PAIRED) * len(ops):
        kinds = sorted({op.op_type for op in unpaired})
        problems.append(f"{len(unpaired)} of the package's {len(ops)} ops have no counterpart in the torch "
                        f"model's conversion (op types {kinds[:8]})")
    if problems:
        raise PackageError("the torch model is not the one the package came from (its structure does not pair "
                           "with the package's): " + "; ".join(problems)
                           + ". Pass the model the package was converted from, or diagnose the package on its own")


def with_names(prepared, inputs: ExampleInputs):
    """``prepared`` (:class:`~.convert.Prepared`) with its example inputs renamed."""
    return dataclasses.replace(prepared, inputs=inputs)
