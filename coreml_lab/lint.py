"""Deployment checks: static findings on a converted model (Core ML validator rules, field reports).

Static checks and their sources:

* FP16 inputs/outputs need specification version 7 (iOS16 / macOS13): Core ML's validator
  ("FLOAT16 ... only valid in specification version >= 7"), coremltools' converter.
* Conv strides with an iOS16+ target: a field report of an iPad failing with "Strides of Conv
  needs to be product of at most 2 interleave factors". *Heuristic* (the device rule is not
  published): strides above 4 or with more than two prime factors are flagged.
* Neural-Engine-hostile ops: control flow, dynamic shapes, NMS/top-k/sort post-processing and
  gather_nd/scatter_nd keep work off the NE (field reports and Apple's deployment guidance; the
  exact list is not published - see ``emulator.neural_engine.NE_UNSUPPORTED_OPS``).
* Output post-processing (reshape/slice/transpose/gather right before an output): reported to
  move models off the NE; keep it in app code.
* Tensors of rank above 5 (the NE handles up to rank 5; uncertain).
* FP32-typed programs never run on the NE (coremltools "Typed Execution" guide).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conversion import Conversion
from .emulator.neural_engine import NE_UNSUPPORTED_OPS
from .emulator.program import walk_ops

POSTPROCESS_OPS = {"reshape", "transpose", "slice_by_index", "slice_by_size", "gather", "gather_along_axis",
                   "gather_nd", "topk", "argsort", "non_maximum_suppression", "squeeze", "expand_dims", "tile",
                   "concat", "split"}


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str          # "error" | "warning" | "info"
    title: str
    message: str
    fix: str
    source: str
    ops: tuple = ()
    modules: tuple = ()
    score: float = 0.0


def _prime_factors(n: int) -> int:
    count, f = 0, 2
    while n > 1 and f * f <= n:
        while n % f == 0:
            n //= f
            count += 1
        f += 1
    return count + (1 if n > 1 else 0)


def _ops(conv: Conversion):
    """Every op the program holds, those of nested blocks too (a hostile op in a loop body counts)."""
    return walk_ops(conv.program, nested=True)


def lint(conv: Conversion) -> list[Finding]:
    """Static findings for a converted (or loaded) ML Program."""
    if conv.program is None:
        return []
    out: list[Finding] = []
    lm = conv.layer_map() if conv.source is not None or conv.layer_chains else None

    def mod(op):
        return lm.op_module(op) if lm is not None else None

    ins, outs = conv.io_dtypes()
    half = [n for n, t in {**ins, **outs}.items() if "FLOAT16" in t]
    if half and conv.spec_version < 7:
        out.append(Finding("fp16_io_spec", "error", "FP16 I/O below specification 7",
                           f"{half} are FLOAT16 but the model is specification {conv.spec_version}: Core ML will "
                           "refuse to load it ('FLOAT16 ... only valid in specification version >= 7')",
                           "target iOS16/macOS13 or later, or FP32 inputs/outputs", "Core ML validator", tuple(half),
                           score=95))
    target_value = getattr(conv.options, "ct_target", None)
    ios16 = target_value is not None and int(target_value.value) >= 7
    strided = []
    for op in _ops(conv):
        if op.op_type in ("conv", "conv_transpose") and "strides" in op.inputs:
            strides = [int(s) for s in np.asarray(op.inputs["strides"].val).reshape(-1)]
            if any(s > 4 or _prime_factors(s) > 2 for s in strides):
                strided.append((op, strides))
    if strided and ios16:
        out.append(Finding(
            "conv_stride_interleave", "warning", "Conv strides the iOS16 device compiler may reject",
            "convs with strides " + ", ".join(f"{s} ({op.name}, module {mod(op)!r})" for op, s in strided[:5]) +
            ": an iPad with minimum_deployment_target=iOS16 logged 'Strides of Conv needs to be product of at most "
            "2 interleave factors' and gave wrong results for such a model (heuristic: strides > 4 or with more "
            "than two prime factors)",
            "test on the device; or target iOS15; or split the stride into two convs (e.g. 8 -> 2 x 4)",
            "field report (P3)", tuple(op.name for op, _ in strided), tuple(m for m in (mod(o) for o, _ in strided)
                                                                          if m), score=80))
    hostile = sorted({op.op_type for op in _ops(conv) if op.op_type in NE_UNSUPPORTED_OPS})
    if hostile:
        ops = [op for op in _ops(conv) if op.op_type in NE_UNSUPPORTED_OPS]
        out.append(Finding("ne_hostile_ops", "warning", "Ops that keep work off the Neural Engine",
                           f"{hostile} ({len(ops)} ops) run on CPU/GPU, splitting the model and adding copies",
                           "move post-processing (top-k, NMS, sorting) and control flow out of the model",
                           "field reports; Apple deployment guidance (uncertain list)",
                           tuple(op.name for op in ops), tuple(m for m in map(mod, ops) if m), score=60))
    tail = _output_tail(conv)
    if tail:
        out.append(Finding("output_postprocessing", "warning", "Post-processing at the model's outputs",
                           f"the outputs are produced by {sorted({op.op_type for op in tail})} right before the end: "
                           "output reshapes/slicing/NMS were reported to make Core ML run models off the Neural "
                           "Engine", "return the raw head outputs and post-process in app code", "field report (P4)",
                           tuple(op.name for op in tail), tuple(m for m in map(mod, tail) if m), score=55))
    high = [op for op in _ops(conv) for v in op.outputs
            if getattr(v, "shape", None) is not None and len(v.shape) > 5]
    if high:
        out.append(Finding("high_rank", "warning", "Tensors of rank above 5",
                           f"{len(high)} ops produce rank > 5 tensors, which the Neural Engine is not known to handle",
                           "reshape to rank <= 5", "uncertain: not documented", tuple(op.name for op in high),
                           score=40))
    if conv.options is not None and conv.options.precision == "fp32" and conv.method != "loaded":
        out.append(Finding("fp32_no_ne", "info", "FP32 models do not run on the Neural Engine",
                           "an FP32-typed ML Program runs on CPU and GPU only", "use 'mixed' to keep only the "
                           "sensitive ops in FP32", "coremltools Typed Execution guide", score=20))
    return out


def _output_tail(conv: Conversion, depth: int = 3) -> list:
    """Post-processing ops among the last ``depth`` ops before each program output."""
    func = next(iter(conv.program.functions.values()))
    found, seen = [], set()
    frontier = [v.op for v in func.outputs if v.op is not None]
    for _ in range(depth):
        nxt = []
        for op in frontier:
            if op is None or id(op) in seen or op.op_type == "const":
                continue
            seen.add(id(op))
            if op.op_type in POSTPROCESS_OPS:
                found.append(op)
            if op.op_type == "cast" or op.op_type in POSTPROCESS_OPS:
                for vs in op.inputs.values():
                    for v in (vs if isinstance(vs, (list, tuple)) else (vs,)):
                        nxt.append(v.op)
        frontier = nxt
    return found
