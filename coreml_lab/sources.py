"""Loading what the user brings: nn.Module, TorchScript, ExportedProgram, .onnx, .mlpackage.

Every source becomes a :class:`Source` with a ``kind`` and, where one exists, a
torch callable for reference runs. Example inputs are normalised into
:class:`ExampleInputs` (ordered names and tensors) and checked against the model
before anything is converted, so a mismatch is reported in the user's terms.
The user's model and tensors are never modified.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .traceable import Traceable, fast_path_modules, is_huggingface, tensor_only_kwargs

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")
EXPORTED_SUFFIXES = (".pt2",)
ONNX_SUFFIXES = (".onnx",)
COREML_SUFFIXES = (".mlpackage", ".mlmodel")
ONNX_EXTRA_HINT = (
    "Loading .onnx files needs the optional 'onnx-import' extra (onnx2torch + torchvision): "
    "pip install 'coreml_lab[onnx-import]', or run `make test-onnx-import`, which builds .venv-onnx with it."
)


class ExampleInputsError(ValueError):
    """Example inputs that the model does not accept."""


class SourceError(ValueError):
    """A model source that cannot be loaded."""


class MissingExtraError(ImportError):
    """An optional dependency group is not installed."""


@dataclass(frozen=True)
class ExampleInputs:
    """Named example tensors in the order the model takes them."""

    names: tuple
    tensors: tuple

    def __post_init__(self):
        if len(self.names) != len(self.tensors):
            raise ExampleInputsError(f"{len(self.names)} names for {len(self.tensors)} example tensors")
        if len(set(self.names)) != len(self.names):
            raise ExampleInputsError(f"input names must be unique, got {self.names}")

    def __len__(self) -> int:
        return len(self.tensors)

    def describe(self) -> str:
        return ", ".join(f"{n}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                         for n, t in zip(self.names, self.tensors))

    def as_numpy(self) -> dict[str, np.ndarray]:
        """Feeds for Core ML / the emulator: int64 becomes int32 (Core ML has no int64 inputs)."""
        out = {}
        for n, t in zip(self.names, self.tensors):
            arr = t.detach().cpu().numpy()
            if arr.dtype == np.int64:
                arr = arr.astype(np.int32)
            elif arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            out[n] = arr
        return out

    def ct_inputs(self):
        """``ct.TensorType`` specs with these names, shapes and Core ML dtypes."""
        import coremltools as ct

        specs = []
        for n, t in zip(self.names, self.tensors):
            if t.dtype == torch.float16:
                dtype = np.float16  # FP16 I/O: needs target >= iOS16 (spec 7)
            elif t.is_floating_point():
                dtype = np.float32
            elif t.dtype == torch.bool:
                dtype = np.bool_
            else:
                dtype = np.int32
            specs.append(ct.TensorType(name=n, shape=tuple(t.shape), dtype=dtype))
        return specs

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> ExampleInputs:
        return ExampleInputs(self.names, tuple(tensors))


@dataclass
class Source:
    """A loaded model source.

    kind: ``module`` | ``torchscript`` | ``exported`` | ``onnx`` | ``mlpackage``.
    model: what coremltools converts (or the loaded MLModel for ``mlpackage``).
    reference: a torch callable for reference runs (None for ``mlpackage``).
    module: the ``nn.Module`` whose submodules name layers (None when unknown).
    """

    kind: str
    model: Any
    reference: Any = None
    module: Any = None
    path: Path | None = None
    onnx_path: Path | None = None
    notes: list = field(default_factory=list)


def _keyword_params(fn) -> tuple[list[str], list[str]] | None:
    """(names of the parameters ``fn`` takes by name, those without a default); None if unknown."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    named = [p for p in sig.parameters.values() if p.name != "self" and p.kind in
             (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in named], [p.name for p in named if p.default is p.empty]


def _forward_param_names(fn) -> list[str] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = []
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return None
        names.append(p.name)
    return names


def _as_tensor(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (int, float, list)):
        return torch.as_tensor(value)
    raise ExampleInputsError(f"example input {what} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def example_inputs(example, names: Sequence[str] | None = None, required: Sequence[str] | None = None) -> ExampleInputs:
    """Normalise a tensor, a sequence of tensors or a name -> tensor dict into ExampleInputs.

    A dict (or a Hugging Face ``BatchEncoding``) keeps its names, in the order of ``names``;
    it must hold every name of ``required`` (default: all of ``names``) and nothing else.
    """
    if isinstance(example, ExampleInputs):
        return example
    if example is None:
        raise ExampleInputsError("example inputs are required: a tensor, a tuple of tensors, "
                                 "or a dict of input name -> tensor")
    if isinstance(example, Mapping):
        if not example:
            raise ExampleInputsError("example inputs dict is empty")
        keys = list(example)
        if names is not None:
            unknown = [k for k in keys if k not in names]
            missing = [n for n in (names if required is None else required) if n not in example]
            if unknown or missing:
                raise ExampleInputsError(
                    f"example input names {keys} do not match the model's inputs {list(names)}"
                    + (f" (unknown: {unknown})" if unknown else "") + (f" (missing: {missing})" if missing else "")
                )
            keys = [n for n in names if n in example]
        return ExampleInputs(tuple(keys), tuple(_as_tensor(example[k], repr(k)) for k in keys))
    if isinstance(example, (torch.Tensor, np.ndarray)):
        example = (example,)
    if not isinstance(example, (tuple, list)):
        raise ExampleInputsError(f"example inputs must be a tensor, a tuple/list of tensors or a dict, "
                                 f"got {type(example).__name__}")
    if not example:
        raise ExampleInputsError("example inputs are empty")
    tensors = tuple(_as_tensor(v, f"#{i}") for i, v in enumerate(example))
    if names is not None and len(names) >= len(tensors):
        names = list(names[:len(tensors)])  # forward's own parameter names
    else:
        names = ["x"] if len(tensors) == 1 else [f"x{i}" for i in range(len(tensors))]
    return ExampleInputs(tuple(names), tensors)


def _check_runs(fn, inputs: ExampleInputs, what: str, expected: str) -> None:
    try:
        with torch.no_grad():
            fn(*inputs.tensors)
    except Exception as exc:
        raise ExampleInputsError(
            f"the example inputs do not match the {what}: it expects {expected}; got {inputs.describe()}. "
            f"torch raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def load_source(model, example=None) -> tuple[Source, ExampleInputs | None]:
    """Load ``model`` (object or path) and normalise/check ``example`` against it."""
    import coremltools as ct

    if isinstance(model, (str, os.PathLike)):
        return _load_path(Path(model), example)
    if isinstance(model, ct.models.MLModel):
        inputs = example_inputs(example, _mlmodel_input_names(model)) if example is not None else None
        return Source("mlpackage", model, notes=["loaded an existing Core ML model: nothing to convert"]), inputs
    if isinstance(model, torch.export.ExportedProgram):
        mod = model.module()
        names = _exported_input_names(model)
        inputs = example_inputs(example, names)
        _check_runs(mod, inputs, "exported program", f"inputs {names}")
        return Source("exported", model, reference=mod, module=mod), inputs
    if isinstance(model, torch.jit.ScriptModule):
        names = _forward_param_names(model.forward)
        inputs = example_inputs(example, names)
        _check_runs(model, inputs, "TorchScript module", f"forward({', '.join(names or ['...'])})")
        return Source("torchscript", model, reference=model, module=model), inputs
    if isinstance(model, torch.nn.Module):
        return _load_module(model, example)
    raise SourceError(
        f"unsupported model type {type(model).__name__}: expected a torch.nn.Module, a TorchScript module, "
        "a torch.export.ExportedProgram, a coremltools MLModel, or a path to a "
        f"{'/'.join(TORCHSCRIPT_SUFFIXES + EXPORTED_SUFFIXES + ONNX_SUFFIXES + COREML_SUFFIXES)} file"
    )


def _load_module(model: torch.nn.Module, example) -> tuple[Source, ExampleInputs]:
    """An eager module; called through :class:`~coreml_lab.traceable.Traceable` when tracing it as is would fail:
    a Hugging Face model, inputs given by keyword, or torch's fused MHA fast path."""
    names = _forward_param_names(model.forward)
    hf = is_huggingface(model)
    keyword = _keyword_params(model.forward) if isinstance(example, Mapping) or hf else None
    if keyword is not None and isinstance(example, Mapping):
        inputs = example_inputs(example, keyword[0], required=keyword[1])
    elif keyword is not None:
        inputs = example_inputs(example, keyword[0])
    else:
        inputs = example_inputs(example, names)
    notes = []
    ref = model
    if model.training:
        ref = copy.deepcopy(model).eval()
        notes.append("the model was in training mode; an eval-mode copy was converted "
                     "(your model was left as it was)")
    positional = names is not None and list(inputs.names) == names[:len(inputs)]
    fast = fast_path_modules(ref)
    if hf or not positional or fast:
        fixed = tensor_only_kwargs(ref) if hf else {}
        ref = Traceable(ref, inputs.names, fixed)
        call = ", ".join([f"{n}=..." for n in inputs.names] + [f"{k}={v}" for k, v in fixed.items()])
        if hf or not positional:
            notes.append(f"traced as {type(model).__name__}({call}), tensors out; the converted inputs keep "
                         "these names")
        if fast:
            notes.append("torch's fused fast path of nn.MultiheadAttention / nn.TransformerEncoderLayer "
                         "(aten::_native_multi_head_attention, aten::_transformer_encoder_layer_fwd), which "
                         "coremltools cannot convert, was switched off while tracing and in the reference runs "
                         f"(torch.backends.mha.set_fastpath_enabled(False), restored after; modules: "
                         f"{', '.join(fast[:4])}{' ...' if len(fast) > 4 else ''})")
    expected = ", ".join(inputs.names if not positional else (names or ["*args"]))
    _check_runs(ref, inputs, f"model {type(model).__name__}.forward", f"forward({expected})")
    if getattr(ref, "built_masks", False):
        notes.append("Hugging Face attention masks (transformers.masking_utils) were built by broadcasting "
                     "instead of torch.vmap, which tracing cannot record (the same values)")
    return Source("module", ref, reference=ref, module=ref, notes=notes), inputs


def _load_path(path: Path, example) -> tuple[Source, ExampleInputs | None]:
    import coremltools as ct

    suffix = path.suffix.lower()
    known = TORCHSCRIPT_SUFFIXES + EXPORTED_SUFFIXES + ONNX_SUFFIXES + COREML_SUFFIXES
    if not path.exists():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist (expected a {'/'.join(known)} file)")
    if suffix not in known:
        raise SourceError(f"unsupported model file type {suffix or '(no suffix)'!r} for {str(path)!r}: "
                          f"expected one of {', '.join(known)}")
    if suffix in COREML_SUFFIXES:
        ml = ct.models.MLModel(str(path), skip_model_load=True)
        inputs = example_inputs(example, _mlmodel_input_names(ml)) if example is not None else None
        return Source("mlpackage", ml, path=path, notes=["loaded an existing Core ML model: nothing to convert"]), inputs
    if suffix in TORCHSCRIPT_SUFFIXES:
        try:
            mod = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise SourceError(f"{str(path)!r} is not a TorchScript file torch.jit.load can read "
                              f"({type(exc).__name__}: {exc}); save models with torch.jit.save") from exc
        src, inputs = load_source(mod, example)
        src.path = path
        return src, inputs
    if suffix in EXPORTED_SUFFIXES:
        ep = torch.export.load(str(path))
        src, inputs = load_source(ep, example)
        src.path = path
        return src, inputs
    return _load_onnx(path, example)


def _load_onnx(path: Path, example) -> tuple[Source, ExampleInputs]:
    import onnx

    try:
        import onnx2torch
    except ImportError as exc:
        raise MissingExtraError(ONNX_EXTRA_HINT) from exc
    from .onnx_recurrent import register

    register()  # GRU / LSTM, which onnx2torch lacks
    proto = onnx.load(str(path))
    initializers = {i.name for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    module = onnx2torch.convert(proto).eval()
    inputs = example_inputs(example, names)
    _check_runs(module, inputs, f"ONNX model {path.name}", f"inputs {names}")
    return Source("onnx", module, reference=module, module=module, path=path, onnx_path=path,
                  notes=[f"imported {path.name} through onnx2torch; ONNX Runtime is the reference"]), inputs


def _exported_input_names(ep) -> list[str]:
    from torch.export.graph_signature import InputKind

    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]


def _mlmodel_input_names(ml) -> list[str]:
    return [i.name for i in ml.get_spec().description.input]


def export_onnx(module: torch.nn.Module, example, path, opset: int = 17, dynamic_axes=None,
                output_names: Sequence[str] | None = None) -> Path:
    """Export ``module`` to an ONNX file with the TorchScript-based exporter at ``opset``.

    Opset 17 keeps the file importable by onnx2torch (it fails on opset 19+ Constant nodes).
    """
    import warnings

    inputs = example_inputs(example, _forward_param_names(module.forward))
    path = Path(path)
    ref = module if not module.training else copy.deepcopy(module).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ref, inputs.tensors, str(path), dynamo=False, opset_version=opset,
                          input_names=list(inputs.names), output_names=list(output_names) if output_names else None,
                          dynamic_axes=dynamic_axes)
    return path
