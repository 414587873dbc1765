"""Conversion and ConversionError: what one conversion made (model, program, messages), or why it failed.

A :class:`Conversion` keeps the MLModel, its MIL program, the spec version, the
options, the wall time, and every warning and log line coremltools emitted (each
explained where it is a known message). :func:`~.convert.convert` makes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import messages as msgs
from .emulator.program import walk_ops
from .messages import Message
from .options import ConversionOptions
from .sources import ExampleInputs, Source


class ConversionError(RuntimeError):
    """coremltools could not convert the model; carries the captured messages and an explanation."""

    def __init__(self, text: str, messages: list[Message], options: ConversionOptions, method: str):
        self.messages = messages
        self.options = options
        self.method = method
        self.explanation = msgs.explain(text)
        hint = f"\n  -> {self.explanation.title}: {self.explanation.fix}" if self.explanation else ""
        super().__init__(f"conversion failed ({method}, {options.precision}, {options.target}): {text}{hint}")


@dataclass
class Conversion:
    """The result of :func:`convert`.

    method: how the model became MIL - ``torch.jit.trace``, ``torch.export``,
    ``torchscript``, ``exported_program``, ``onnx2torch+torch.jit.trace`` or ``loaded``.
    """

    mlmodel: Any
    program: Any
    options: ConversionOptions
    spec_version: int
    wall_time: float
    messages: list
    method: str
    source_kind: str
    example_inputs: ExampleInputs | None = None
    cache_key: str | None = None
    from_cache: bool = False
    onnx_path: Path | None = None
    source: Source | None = field(default=None, repr=False)
    #: the trace/export this conversion came from (lets diagnose() convert siblings without re-tracing)
    prepared: Any = field(default=None, repr=False, compare=False)
    #: MIL output name -> enclosing torch module paths, innermost first (from the TorchScript, or coremltools' op mapping)
    layer_chains: dict = field(default_factory=dict, repr=False)
    #: the program before coremltools' FP16 pass, kept for a diagnosis' FP32 reference (:mod:`.fp32_reference`)
    fp32_fork: Any = field(default=None, repr=False, compare=False)

    @property
    def explained(self) -> list[Message]:
        return [m for m in self.messages if m.explanation is not None]

    def layer_map(self):
        """Which torch module produced each MIL op, and which op carries each module's output."""
        from .mapping import build_layer_map

        module = self.source.module if self.source is not None else None
        return build_layer_map(self.program, module, self.layer_chains)

    def op_types(self) -> dict[str, int]:
        """Count of each MIL op type (nested blocks included, consts excluded)."""
        counts: dict[str, int] = {}
        for op in walk_ops(self.program, nested=True):
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
        return dict(sorted(counts.items()))

    def io_dtypes(self) -> tuple[dict, dict]:
        """(input name -> dtype, output name -> dtype) as the model description declares them."""
        return _io_dtypes(self.mlmodel.get_spec())

    def summary(self) -> str:
        lines = [f"{self.method} -> {self.options.convert_to} ({self.options.precision}, target {self.options.target}, "
                 f"spec {self.spec_version}) in {self.wall_time:.2f}s{' [cached]' if self.from_cache else ''}"]
        for m in self.explained:
            lines.append(f"  {m.explanation.title}: {m.text[:120]}")
        return "\n".join(lines)


def _io_dtypes(spec) -> tuple[dict, dict]:
    from coremltools.proto import FeatureTypes_pb2 as ft

    def kind(f):
        which = f.type.WhichOneof("Type")
        if which == "multiArrayType":
            return ft.ArrayFeatureType.ArrayDataType.Name(f.type.multiArrayType.dataType)
        if which == "imageType":
            return "IMAGE_" + ft.ImageFeatureType.ColorSpace.Name(f.type.imageType.colorSpace)
        return which

    return ({f.name: kind(f) for f in spec.description.input}, {f.name: kind(f) for f in spec.description.output})

