"""ConversionOptions: the choices a user makes before converting, validated up front.

Options are frozen and hashable so they can key the conversion cache, and they
translate into ``ct.convert`` keyword arguments in one place.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

import coremltools as ct

PRECISIONS = ("fp16", "fp32", "mixed")
CONVERT_TO = ("mlprogram", "neuralnetwork")
COMPUTE_UNITS = tuple(ct.ComputeUnit.__members__)
TARGETS = tuple(ct.target.__members__)


def final_op_name(name: str) -> str:
    """The name coremltools gives an op at the end of conversion ("8" -> "op_8", "input.1" -> "input_1").

    Mirrors the renaming rule of coremltools' name sanitizer (invalid characters become "_",
    names not starting with a letter or "_" get the "op_" prefix); its rare uniqueness suffixes
    are not reproduced.
    """
    name = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return "op_" + name if re.match(r"[^a-zA-Z_]", name) else name


def _target_name(target) -> str:
    name = getattr(target, "name", target)
    if not isinstance(name, str) or name not in TARGETS:
        raise ValueError(f"unknown deployment target {target!r}; expected one of {', '.join(TARGETS)}")
    # aliases (macOS14 == iOS17) keep the name the user chose
    return name


def _compute_unit_name(cu) -> str:
    name = getattr(cu, "name", cu)
    if not isinstance(name, str) or name.upper() not in COMPUTE_UNITS:
        raise ValueError(f"unknown compute unit {cu!r}; expected one of {', '.join(COMPUTE_UNITS)}")
    return name.upper()


@dataclass(frozen=True)
class ConversionOptions:
    """How to convert a model.

    precision: ``"fp16"`` (Core ML's default for ML Programs), ``"fp32"``, or
        ``"mixed"`` = FP16 except the ops named in ``fp32_ops``.
    fp32_ops: op types (``"reduce_sum"``) or MIL op names kept in FP32 when mixed.
    target: any ``ct.target`` name (``"iOS15"``, ``"macOS14"`` ...).
    convert_to: ``"mlprogram"`` or ``"neuralnetwork"`` (a neural network has no compute
        precision: Core ML picks FP16 on GPU/NE and FP32 on CPU at run time, so
        ``precision`` is ignored for it).
    compute_units: the ``ct.ComputeUnit`` name the model is meant to run with.
    inputs: optional ``ct.TensorType`` / ``ct.ImageType`` specs (names, shapes,
        dtypes, flexible shapes); by default they are derived from example inputs.
    outputs: optional ``ct.TensorType`` specs for the outputs (e.g. FP16 outputs).
    states: torch buffer names that become Core ML states (``ct.StateType``, iOS18 on); None (the
        default) finds them: every float buffer the forward updates in place; ``()`` keeps every
        buffer a constant (see :mod:`coreml_lab.states`).
    compression: weight compression applied after conversion with ``coremltools.optimize.coreml``:
        a coremltools ``OptimizationConfig`` (or a list of them: joint compression, applied in
        order) or a short spec - ``"palettize4"`` (k-means, also 1/2/3/6/8 bits),
        ``"int8-per-channel"``, ``"int8-per-tensor"``, ``"int4-per-block32"`` (iOS18),
        ``"prune50"``, joint forms such as ``"prune50+palettize4"`` or ``"prune50+int8"``.
        Held as a frozen :class:`coreml_lab.compression.Compression`; a spec coremltools rejects
        for ``target`` raises an error naming the minimum target.
    """

    precision: str = "fp16"
    fp32_ops: tuple = ()
    target: str = "iOS17"
    convert_to: str = "mlprogram"
    compute_units: str = "ALL"
    inputs: tuple | None = None
    outputs: tuple | None = None
    states: tuple | None = None
    compression: Any = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        fp32_ops = self.fp32_ops
        if isinstance(fp32_ops, str):
            fp32_ops = (fp32_ops,)
        fp32_ops = tuple(fp32_ops or ())
        if not all(isinstance(o, str) and o for o in fp32_ops):
            raise ValueError(f"fp32_ops must be op type or op name strings, got {self.fp32_ops!r}")
        if fp32_ops and self.precision != "mixed":
            raise ValueError(f"fp32_ops={fp32_ops!r} only applies with precision='mixed' "
                             f"(got precision={self.precision!r})")
        object.__setattr__(self, "fp32_ops", fp32_ops)
        object.__setattr__(self, "target", _target_name(self.target))
        if self.convert_to not in CONVERT_TO:
            raise ValueError(f"convert_to must be one of {CONVERT_TO}, got {self.convert_to!r}")
        object.__setattr__(self, "compute_units", _compute_unit_name(self.compute_units))
        for field in ("inputs", "outputs"):
            specs = getattr(self, field)
            if specs is not None:
                specs = tuple(specs)
                for s in specs:
                    if not isinstance(s, (ct.TensorType, ct.ImageType, ct.StateType)):
                        raise TypeError(f"{field} must be ct.TensorType / ct.ImageType / ct.StateType, "
                                        f"got {type(s).__name__}")
                object.__setattr__(self, field, specs)
        if self.compression is not None:
            from .compression import as_compression, check_target

            compression = as_compression(self.compression)
            if self.convert_to != "mlprogram":
                raise ValueError("compression applies to ML Programs (convert_to='mlprogram'), "
                                 f"got convert_to={self.convert_to!r}")
            check_target(compression, self.target)
            object.__setattr__(self, "compression", compression)
        self._check_states()

    def _check_states(self) -> None:
        states = self.states
        if states is None:
            return
        if isinstance(states, str):
            states = (states,)
        states = tuple(states)
        if not all(isinstance(n, str) and n for n in states) or len(set(states)) != len(states):
            raise ValueError(f"states must be unique torch buffer names (e.g. ('layers.0.k_cache',)), "
                             f"None to find them, or () for none; got {self.states!r}")
        if states and (self.convert_to != "mlprogram" or getattr(ct.target, self.target).value
                       < ct.target.iOS18.value):
            raise ValueError(f"states={states!r}: Core ML states need convert_to='mlprogram' and target iOS18 "
                             f"(macOS15) or later; got convert_to={self.convert_to!r}, target={self.target!r}")
        object.__setattr__(self, "states", states)

    # ------------------------------------------------------------------ ct.convert
    @property
    def ct_target(self):
        return getattr(ct.target, self.target)

    @property
    def ct_compute_units(self):
        return getattr(ct.ComputeUnit, self.compute_units)

    def op_selector(self):
        """``op -> bool``: True for ops that may run in FP16 (the FP16ComputePrecision contract).

        ``fp32_ops`` names ops as they appear in the converted program; the selector runs
        before coremltools' final renaming, so names are compared after :func:`final_op_name`.
        """
        keep = set(self.fp32_ops)
        return lambda op: op.op_type not in keep and final_op_name(op.name) not in keep

    def compute_precision(self):
        if self.convert_to == "neuralnetwork":
            return None
        if self.precision == "fp32":
            return ct.precision.FLOAT32
        if self.precision == "fp16":
            return ct.precision.FLOAT16
        return ct.transform.FP16ComputePrecision(op_selector=self.op_selector())

    def convert_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "convert_to": self.convert_to,
            "minimum_deployment_target": self.ct_target,
            "compute_units": self.ct_compute_units,
        }
        cp = self.compute_precision()
        if cp is not None:
            kw["compute_precision"] = cp
        if self.outputs is not None:
            kw["outputs"] = self.spec_copies("outputs")
        return kw

    def spec_copies(self, field: str) -> list | None:
        """Fresh copies of the ``inputs`` or ``outputs`` specs, for one ``ct.convert`` call: coremltools
        sets names, dtypes and shapes on the spec objects it is given, and these are the user's."""
        specs = getattr(self, field)
        return copy.deepcopy(list(specs)) if specs is not None else None

    def replace(self, **changes) -> ConversionOptions:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ cache key
    def key(self) -> str:
        """Stable text for the conversion cache key and for reports."""
        extra = {"compression": self.compression.key()} if self.compression is not None else {}
        return json.dumps({**extra,
            "precision": self.precision, "fp32_ops": list(self.fp32_ops), "target": self.target,
            "convert_to": self.convert_to, "compute_units": self.compute_units,
            "inputs": [_spec_repr(s) for s in self.inputs] if self.inputs else None,
            "outputs": [_spec_repr(s) for s in self.outputs] if self.outputs else None,
            "states": list(self.states) if self.states is not None else None,
        }, sort_keys=True)

    def to_dict(self) -> dict:
        d = json.loads(self.key())
        if self.compression is not None:  # the spec round-trips through ConversionOptions(**d)
            d["compression"] = self.compression.spec
        return d


def _spec_repr(spec) -> str:
    """A stable description of a ct input/output spec (its repr has no memory addresses)."""
    parts = [type(spec).__name__, str(getattr(spec, "name", None))]
    shape = getattr(spec, "shape", None)
    if shape is not None:
        parts.append(repr(getattr(shape, "shape", shape)))
        enum = getattr(shape, "shapes", None)
        if enum:
            parts.append(repr([getattr(s, "shape", s) for s in enum]))
    dtype = getattr(spec, "dtype", None)
    parts.append(str(getattr(dtype, "__name__", dtype)))
    for attr in ("scale", "bias", "color_layout", "channel_first"):
        if hasattr(spec, attr):
            parts.append(f"{attr}={getattr(spec, attr)!r}")
    return "|".join(parts)


def as_options(options: ConversionOptions | dict | None) -> ConversionOptions:
    if options is None:
        return ConversionOptions()
    if isinstance(options, ConversionOptions):
        return options
    if isinstance(options, dict):
        return ConversionOptions(**options)
    raise TypeError(f"options must be a ConversionOptions or a dict of its fields, got {type(options).__name__}")


__all__ = ["ConversionOptions", "as_options", "PRECISIONS", "TARGETS", "COMPUTE_UNITS", "CONVERT_TO"]
