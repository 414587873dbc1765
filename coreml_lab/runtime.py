"""Runtimes behind one interface: Core ML itself (macOS) and the emulator (any OS).

Every result names the runtime that produced it. ``runtime="auto"`` is Core ML
on macOS (when coremltools can load models) and the emulator elsewhere.

The Core ML runtime predicts with ``MLModel(..., compute_units=...)`` and reads
intermediate values with coremltools' own ``MLModelInspector`` (experimental),
never with a re-implementation. It cannot run on Linux; its plumbing is tested
there with a test double standing in for Core ML's prediction.
"""

from __future__ import annotations

import asyncio
import itertools
import platform
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

import coremltools as ct
import numpy as np

from .emulator import EmulatedModel
from .emulator.interpreter import OpRecord
from .emulator.profiles import EXACT_FP32, PROFILES, get_profile

RUNTIMES = ("auto", "emulator", "coreml")


class Runtime(Protocol):
    name: str
    compute_unit: str

    def predict(self, feeds: dict, on_op: Callable[[OpRecord], None] | None = None) -> dict: ...


def coreml_available() -> bool:
    """True on macOS when coremltools can load models with Core ML."""
    if platform.system() != "Darwin":
        return False
    try:  # the Core ML bindings exist on macOS only
        from coremltools.libcoremlpython import _MLModelProxy  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def resolve(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "auto":
        return "coreml" if coreml_available() else "emulator"
    if runtime == "coreml" and not coreml_available():
        raise RuntimeError("runtime='coreml' needs macOS with Core ML (coremltools could not load its "
                           "Core ML bindings here); use runtime='emulator' or 'auto'")
    return runtime


class EmulatorRuntime:
    """The emulator under one compute unit's device profile."""

    name = "emulator"

    def __init__(self, mlmodel, compute_unit, module_of=None):
        """``compute_unit``: a name, a ``ct.ComputeUnit`` or a device profile (a variant of one)."""
        self.model = EmulatedModel(mlmodel, compute_unit, module_of=module_of)
        self.compute_unit = self.model.profile.compute_unit

    def predict(self, feeds: dict, on_op=None) -> dict:
        return self.model.predict(feeds, on_op=on_op)


class CoreMLRuntime:
    """Core ML on macOS: outputs from ``MLModel.predict``, intermediates from ``MLModelInspector``.

    ``on_op`` receives records for every op output Core ML returns (device "coreml", storage as
    returned). Core ML does not say which unit ran each op, so ``device`` is the compute unit.
    """

    name = "coreml"

    def __init__(self, mlmodel, compute_unit: str, module_of=None, load: Callable | None = None):
        self.compute_unit = getattr(compute_unit, "name", compute_unit)
        self.ct_compute_unit = getattr(ct.ComputeUnit, self.compute_unit)
        self.module_of = module_of
        self.source = mlmodel
        self._load = load or _load_mlmodel
        self.model = self._load(mlmodel, self.ct_compute_unit)
        self._inspector = None

    def predict(self, feeds: dict, on_op=None) -> dict:
        outputs = self.model.predict(dict(feeds))
        if on_op is not None:
            self._stream_intermediates(feeds, on_op)
        return outputs

    def stream(self, feeds: dict, on_value: Callable[[int, OpRecord], None]) -> dict:
        """Predict, handing every op output Core ML returns to ``on_value(order, record)`` as it
        comes (``order``: 0, 1, ... in the order Core ML returns them); returns the outputs.
        What a diagnosis measures on Core ML, against its emulated FP32 reference."""
        order = itertools.count()
        return self.predict(feeds, on_op=lambda record: on_value(next(order), record))

    def _stream_intermediates(self, feeds: dict, on_op) -> None:
        # experimental coremltools API, needed on macOS only
        from coremltools.models.ml_program.experimental.debugging_utils import MLModelInspector

        if self._inspector is None:
            self._inspector = MLModelInspector(self.model, compute_units=self.ct_compute_unit)
        ops = self._inspector.output_name_to_op_map
        names = list(ops)

        async def collect():
            async for name, value in self._inspector.inspect(inputs=dict(feeds), output_names=names):
                op = ops[name]
                if value is None:
                    continue
                arr = np.asarray(value)
                on_op(OpRecord(name=name, op_name=_attr_name(op), op_type=op.type, output_index=0,
                               dtype=str(arr.dtype), storage=str(arr.dtype), module=None,
                               device=self.compute_unit, value=arr))

        run_coroutine(collect())


def _attr_name(op) -> str:
    try:
        return op.attributes["name"].immediateValue.tensor.strings.values[0]
    except Exception:  # noqa: BLE001
        return op.outputs[0].name if op.outputs else op.type


def _load_mlmodel(mlmodel, compute_units):
    """The model loaded by Core ML with the given compute units (a fresh MLModel from the same package)."""
    path = mlmodel.package_path if getattr(mlmodel, "package_path", None) else None
    if path:
        return ct.models.MLModel(path, compute_units=compute_units)
    return ct.models.MLModel(mlmodel.get_spec(), weights_dir=mlmodel.weights_dir, compute_units=compute_units)


def run_coroutine(coro):
    """Run a coroutine to completion, also from inside Jupyter's running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: dict = {}

    def worker():
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def make_runtime(mlmodel, compute_unit: str, runtime: str = "auto", module_of=None) -> Runtime:
    kind = resolve(runtime)
    if kind == "coreml":
        return CoreMLRuntime(mlmodel, compute_unit, module_of=module_of)
    return EmulatorRuntime(mlmodel, compute_unit, module_of=module_of)


#: mlmodel -> compute unit -> its compiled emulator (a re-run diagnosis compiles nothing again)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_emulator(mlmodel, profile, module_of):
    """The emulated model of ``mlmodel`` under a compute unit's profile; default profiles are
    compiled once per mlmodel (``module_of``, the conversion's op -> module mapping, is the same
    for one mlmodel, so the first one compiled is kept). Variants are compiled per diagnosis."""
    profile = get_profile(profile)
    if PROFILES.get(profile.compute_unit) != profile and profile != EXACT_FP32:
        return EmulatorRuntime(mlmodel, profile, module_of=module_of).model
    per_unit = _COMPILED.setdefault(mlmodel, {})
    model = per_unit.get(profile.compute_unit)
    if model is None:
        model = per_unit[profile.compute_unit] = EmulatorRuntime(mlmodel, profile, module_of=module_of).model
    return model
