"""EmulatedModel: run a Core ML ML Program like ``MLModel.predict``, on any OS.

Inputs are validated against the model's own description (names, shapes
including enumerated and ranged shapes, dtypes, image sizes) with errors that
name what was expected. The user's data is never modified: arrays are converted
into fresh tensors. Outputs come back with the model's declared names, shapes
and dtypes, shaped as Core ML returns them (a rank-0 output as shape ``(1,)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from coremltools.proto import FeatureTypes_pb2

from . import dtypes
from .interpreter import Interpreter, OnOp
from .profiles import DeviceProfile, get_profile
from .program import function_name, load_mlmodel, mil_program


class EmulatorInputError(ValueError):
    """Input data that does not match the model's description."""


_ARRAY_DTYPES = {
    FeatureTypes_pb2.ArrayFeatureType.FLOAT16: "fp16",
    FeatureTypes_pb2.ArrayFeatureType.FLOAT32: "fp32",
    FeatureTypes_pb2.ArrayFeatureType.DOUBLE: "fp64",
    FeatureTypes_pb2.ArrayFeatureType.INT32: "int32",
}


@dataclass
class InputSpec:
    """What one model input accepts (read from the model description)."""

    name: str
    kind: str                        # "array" | "image" | "state"
    dtype: str                       # MIL dtype name of the tensor fed to the program
    shape: tuple                     # default shape
    shapes: tuple = ()               # enumerated shapes, if any
    ranges: tuple = ()               # (lower, upper) per dim, upper -1 = unbounded
    color: str = ""                  # "RGB" | "BGR" | "GRAYSCALE" | "GRAYSCALE_FLOAT16"

    def describe(self) -> str:
        if self.kind == "image":
            return f"{self.name}: {self.color} image {self.shape[-1]}x{self.shape[-2]} (PIL.Image)"
        if self.shapes:
            shape = " or ".join(str(tuple(s)) for s in self.shapes)
        elif self.ranges:
            shape = "(" + ", ".join(
                str(lo) if lo == hi else f"{lo}..{'inf' if hi < 0 else hi}" for lo, hi in self.ranges
            ) + ")"
        else:
            shape = str(tuple(self.shape))
        return f"{self.name}: {self.dtype} {shape}"

    def accepts_shape(self, shape: tuple) -> bool:
        if self.shapes:
            return tuple(shape) in {tuple(s) for s in self.shapes}
        if self.ranges:
            return len(shape) == len(self.ranges) and all(
                lo <= s and (hi < 0 or s <= hi) for s, (lo, hi) in zip(shape, self.ranges)
            )
        return tuple(shape) == tuple(self.shape)


def _input_specs(spec) -> list[InputSpec]:
    out = []
    for inp in spec.description.input:
        which = inp.type.WhichOneof("Type")
        if which == "multiArrayType":
            t = inp.type.multiArrayType
            shapes = tuple(tuple(s.shape) for s in t.enumeratedShapes.shapes)
            ranges = tuple((r.lowerBound, r.upperBound) for r in t.shapeRange.sizeRanges)
            out.append(InputSpec(inp.name, "array", _ARRAY_DTYPES.get(t.dataType, "fp32"),
                                 tuple(t.shape), shapes, ranges))
        elif which == "imageType":
            t = inp.type.imageType
            color = FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(t.colorSpace)
            channels = 3 if color in ("RGB", "BGR") else 1
            out.append(InputSpec(inp.name, "image", "fp16" if color == "GRAYSCALE_FLOAT16" else "fp32",
                                 (1, channels, t.height, t.width), color=color))
        elif which == "stateType":
            t = inp.type.stateType.arrayType
            out.append(InputSpec(inp.name, "state", _ARRAY_DTYPES.get(t.dataType, "fp16"), tuple(t.shape)))
        else:
            raise EmulatorInputError(f"input {inp.name!r} has feature type {which!r}, which the emulator "
                                     "does not support (expected a multi-array, image or state)")
    return out


def input_specs(mlmodel) -> list[InputSpec]:
    """What each (non-state) input of ``mlmodel`` accepts, from its description."""
    return [s for s in _input_specs(mlmodel.get_spec()) if s.kind != "state"]


class EmulatedState:
    """State buffers of a stateful (iOS18) model, like ``MLModel.make_state()``.

    Buffers start as zeros and are updated in place by ``coreml_update_state``.
    """

    def __init__(self, specs: Iterable[InputSpec]):
        self.buffers = {s.name: torch.zeros(s.shape, dtype=dtypes.torch_dtype(s.dtype)) for s in specs}

    def read(self, name: str) -> np.ndarray:
        return self.buffers[name].numpy().copy()


class EmulatedModel:
    """A Core ML ML Program executed by the emulator under one compute unit's profile.

    ``model``: a coremltools MLModel (ML Program) or a path to a ``.mlpackage``.
    ``compute_unit``: ``ct.ComputeUnit``, its name, or a :class:`DeviceProfile`.
    ``module_of``: optional ``op -> torch module path`` (see :mod:`coreml_lab.mapping`).
    """

    def __init__(self, model, compute_unit="CPU_ONLY", module_of=None):
        self.mlmodel = load_mlmodel(model)
        self.profile: DeviceProfile = get_profile(compute_unit)
        self.program = mil_program(self.mlmodel)
        fname = function_name(self.mlmodel)
        if fname not in self.program.functions:
            raise ValueError(f"function {fname!r} not in the model; it has {list(self.program.functions)}")
        self.function = self.program.functions[fname]
        spec = self.mlmodel.get_spec()
        self.input_specs = [s for s in _input_specs(spec) if s.kind != "state"]
        # coremltools describes state features apart from the inputs
        self.state_specs = [s for s in _input_specs(spec) if s.kind == "state"] + [
            InputSpec(st.name, "state", _ARRAY_DTYPES.get(st.type.stateType.arrayType.dataType, "fp16"),
                      tuple(st.type.stateType.arrayType.shape))
            for st in spec.description.state
        ]
        self.output_dtypes = {}
        for out in spec.description.output:
            if out.type.WhichOneof("Type") == "multiArrayType":
                self.output_dtypes[out.name] = _ARRAY_DTYPES.get(out.type.multiArrayType.dataType)
        self.output_names = [out.name for out in spec.description.output]
        self.interpreter = Interpreter(self.function, self.profile, module_of=module_of)

    @property
    def compute_unit(self) -> str:
        return self.profile.compute_unit

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.input_specs)
        return f"EmulatedModel({self.profile.compute_unit}; inputs {ins}; outputs {self.output_names})"

    # ------------------------------------------------------------------ predict
    def make_state(self) -> EmulatedState:
        if not self.state_specs:
            raise ValueError("this model has no state inputs; make_state() is for stateful (iOS18) models")
        return EmulatedState(self.state_specs)

    def predict(self, data, state: EmulatedState | None = None, on_op: OnOp | None = None):
        """Outputs for one input dict (returns a dict) or a list of them (returns a list).

        ``on_op`` receives an :class:`OpRecord` for every op output as it is produced.
        """
        if isinstance(data, list):
            if not all(isinstance(d, dict) for d in data):
                raise TypeError('"data" list must contain only dictionaries of input name -> value')
            if state is not None:
                raise ValueError("state can only be used for single (unbatched) predictions")
            return [self._predict_one(d, None, on_op) for d in data]
        if not isinstance(data, dict):
            raise TypeError(f'"data" must be a dict of input name -> value, or a list of such dicts; '
                            f'got {type(data).__name__}')
        return self._predict_one(data, state, on_op)

    def _predict_one(self, data: dict, state, on_op):
        feeds = self.prepare_inputs(data)
        if self.state_specs:
            if state is None:
                raise ValueError("this model is stateful: pass state=model.make_state()")
            if not isinstance(state, EmulatedState):
                raise TypeError(f"state must come from EmulatedModel.make_state(), got {type(state).__name__}")
            feeds.update(state.buffers)
        elif state is not None:
            raise ValueError("this model has no state; do not pass state=")
        outs = self.interpreter.run(feeds, on_op=on_op)
        return {name: self._output_value(name, outs[name]) for name in self.output_names}

    def _output_value(self, name: str, value) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        arr = value.detach().numpy()
        declared = self.output_dtypes.get(name)
        if declared is None:
            var = next(v for v in self.function.outputs if v.name == name)
            declared = dtypes.var_dtype(var)
        want = dtypes.numpy_dtype(declared)
        arr = arr.astype(want) if arr.dtype != want else arr.copy()
        # Core ML has no rank-0 multi-array: MLModel.predict returns a rank-0 output as shape (1,).
        # coremltools' own op tests allow exactly that (converters/mil/testing_utils.py,
        # compare_shapes: "Core ML does not support scalar as output ... expected.shape == ()
        # and coreml_out.shape == (1,)"); code written against the emulator must meet the same.
        return arr.reshape(1) if arr.ndim == 0 else arr

    # ------------------------------------------------------------------- inputs
    def prepare_inputs(self, data: dict) -> dict[str, torch.Tensor]:
        """Validated, freshly allocated tensors for the program's inputs (user data untouched)."""
        expected = {s.name: s for s in self.input_specs}
        missing = [n for n in expected if n not in data]
        extra = [n for n in data if n not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unexpected {extra}")
            raise EmulatorInputError(
                f"input names do not match the model ({'; '.join(parts)}). Expected: "
                + "; ".join(s.describe() for s in self.input_specs)
            )
        return {name: self._convert(spec, data[name]) for name, spec in expected.items()}

    def _convert(self, spec: InputSpec, value) -> torch.Tensor:
        if spec.kind == "image":
            return _image_to_tensor(spec, value)
        if isinstance(value, torch.Tensor):
            arr = value.detach().cpu().numpy()
        else:
            try:
                arr = np.asarray(value)
            except Exception as exc:
                raise EmulatorInputError(f"input {spec.name!r}: cannot read {type(value).__name__} as an array "
                                         f"(expected {spec.describe()})") from exc
        if arr.dtype.kind not in "biuf":
            raise EmulatorInputError(f"input {spec.name!r} has dtype {arr.dtype}; expected numbers "
                                     f"({spec.describe()})")
        if spec.dtype == "int32" and arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise EmulatorInputError(f"input {spec.name!r} is int32 but got non-integer floats "
                                         f"({arr.dtype}); expected {spec.describe()}")
        if not spec.accepts_shape(arr.shape):
            raise EmulatorInputError(f"input {spec.name!r} has shape {tuple(arr.shape)}; expected "
                                     f"{spec.describe()}")
        want = dtypes.numpy_dtype(spec.dtype)
        return torch.from_numpy(np.array(arr, dtype=want, copy=True))

    # ------------------------------------------------------------ introspection
    def ops(self):
        """Compiled steps (op, device, precision, module) in program order."""
        return list(self.interpreter.steps())


def _image_to_tensor(spec: InputSpec, value) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a dependency
        raise EmulatorInputError("image inputs need pillow installed") from exc
    if not isinstance(value, Image.Image):
        raise EmulatorInputError(f"image input {spec.name!r} must be a PIL.Image.Image, got {type(value).__name__}")
    mode = {"RGB": "RGB", "BGR": "RGB", "GRAYSCALE": "L", "GRAYSCALE_FLOAT16": "F"}[spec.color]
    if value.mode != mode:
        raise EmulatorInputError(f"{spec.color} image input {spec.name!r} needs PIL mode {mode!r}, got {value.mode!r}")
    h, w = spec.shape[-2], spec.shape[-1]
    if value.size != (w, h):
        raise EmulatorInputError(f"image input {spec.name!r} is {value.size[0]}x{value.size[1]}; expected {w}x{h}")
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
        if spec.color == "BGR":
            arr = arr[::-1]
    arr = np.ascontiguousarray(arr[None])
    return torch.from_numpy(arr.astype(dtypes.numpy_dtype(spec.dtype)))
