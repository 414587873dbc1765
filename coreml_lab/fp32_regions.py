"""FP32 regions: which ops must run in FP32 together because the values between them leave FP16 range.

What ``FP16ComputePrecision``'s ``op_selector`` sees of a program (:func:`selector_view`), the value
ranges of the FP32 program (:func:`fp32_ranges`), and the regions grown from every value FP16 cannot
hold (:func:`fp32_regions`): forward through consumers until values are back in range, backward to
the producers of out-of-range inputs. :mod:`.fixes` starts its search for a mixed-precision fix
from these regions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import coremltools as ct
import numpy as np

from .conversion import ConversionError
from .emulator import EmulatedModel
from .fp16 import FP16_MAX, RangeStats
from .options import ConversionOptions, final_op_name


@dataclass(frozen=True)
class SelectorOp:
    """One op of the program as ``FP16ComputePrecision``'s ``op_selector`` sees it.

    name: the key ``fp32_ops`` and the snippet use (the selector's op name after coremltools'
    final renaming rule, :func:`final_op_name`); a later pass may still rename the op in the
    saved program (e.g. a transpose becomes ``transpose_1``), its output names stay.
    inputs / consts / outputs: var names as in the converted program (non-constant inputs,
    constant inputs, outputs).
    """

    name: str
    op_type: str
    index: int
    inputs: tuple
    consts: tuple
    outputs: tuple


def _var_name(name: str) -> str:
    """A var's name in the converted program (coremltools' sanitizer, "var_" prefix: "31" -> "var_31")."""
    name = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return "var_" + name if re.match(r"[^a-zA-Z_]", name) else name


def selector_view(prep, options: ConversionOptions) -> tuple[list[SelectorOp], dict, Any]:
    """The ops ``op_selector`` is asked about, in program order, the FP16 range of their constants,
    and the converted FP32 model.

    Recorded from one conversion through ``FP16ComputePrecision`` whose selector keeps every op in
    FP32 (so the pass rewires nothing while the names are read): the names a fix must use are the
    ones the selector sees, which are not always the saved program's. Returns (ops, const var
    name -> :class:`RangeStats`, the FP32 MLModel).
    """
    from . import messages as msgs

    seen: dict = {}
    consts: dict = {}

    def record(op) -> bool:
        if op.op_type == "const" or op.name in seen:
            return False
        ins, cins = [], []
        for param, value in op.inputs.items():
            for var in value if isinstance(value, (list, tuple)) else (value,):
                if not hasattr(var, "name"):
                    continue
                if var.op is not None and var.op.op_type == "const":
                    name = _var_name(var.name)
                    cins.append(name)
                    if name not in consts and var.val is not None:
                        arr = np.asarray(var.val)
                        if np.issubdtype(arr.dtype, np.floating) and arr.size:
                            consts[name] = RangeStats()
                            # an epsilon guarding log/rsqrt (coremltools' default 1e-45) may flush harmlessly
                            consts[name].add(np.minimum(np.abs(arr), FP16_MAX * 2) if param != "epsilon"
                                             else np.where(np.abs(arr) > FP16_MAX, arr, 0))
                else:
                    ins.append(_var_name(var.name))
        seen[op.name] = SelectorOp(final_op_name(op.name), op.op_type, len(seen), tuple(dict.fromkeys(ins)),
                                   tuple(dict.fromkeys(cins)), tuple(_var_name(v.name) for v in op.outputs))
        return False

    kw = options.replace(precision="fp16", fp32_ops=()).convert_kwargs()
    kw["compute_precision"] = ct.transform.FP16ComputePrecision(op_selector=record)
    ct_inputs = options.spec_copies("inputs") if options.inputs is not None else prep.inputs.ct_inputs()
    with msgs.capture():
        try:
            mlmodel = ct.convert(prep.take_convertible(), inputs=ct_inputs, **kw)
        except Exception as exc:
            raise ConversionError(f"recording the ops of the FP16 conversion failed: {type(exc).__name__}: {exc}",
                                  [], options, prep.method) from exc
    return list(seen.values()), consts, mlmodel


def fp32_ranges(mlmodel, feeds: list) -> dict:
    """var name -> :class:`RangeStats` of its values in an FP32 program (run exactly, over all feeds);
    model inputs included, non-float vars with empty stats."""
    stats: dict = {}

    def add(name, value):  # every var seen gets an entry (a non-float one stays empty): "observed"
        s = stats.setdefault(name, RangeStats())
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            s.add(value)

    em = EmulatedModel(mlmodel, "CPU_ONLY")
    for feed in feeds:
        for name, value in feed.items():
            add(name, np.asarray(value))
        em.predict(feed, on_op=lambda r: add(r.name, r.value))
    return stats


def leaves_fp16(stats: RangeStats) -> bool:
    """True when FP16 cannot hold these values: |x| > 65504, or over 1% of them flush to zero (< 2^-24)."""
    return stats.max_abs > FP16_MAX or (stats.n > 0 and stats.flush / stats.n > 0.01)


def fp32_regions(ops: list[SelectorOp], ranges: dict, const_ranges: dict | None = None) -> list[tuple]:
    """Groups of ops that can only work in FP32 together, each in program order.

    A value FP16 cannot hold (:func:`leaves_fp16`) must never be stored in FP16: the op that
    produces it and every op that consumes it run in FP32. The region therefore grows forward
    through consumers while outputs stay out of range - it ends at the first op whose output is
    back within FP16 range - and backward to the producer of an out-of-range input. A model
    input or constant out of range pulls in its consumers. A value the FP32 program does not
    show (fused away there) is assumed to carry the problem on, in both directions.
    """
    const_ranges = const_ranges or {}
    producer = {v: op for op in ops for v in op.outputs}
    users: dict = {}
    for op in ops:
        for v in op.inputs + op.consts:
            users.setdefault(v, []).append(op)
    bad = [v for v, s in ranges.items() if leaves_fp16(s)] + [v for v, s in const_ranges.items() if leaves_fp16(s)]
    parent: dict = {}

    def root(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    seen, queue = set(), list(dict.fromkeys(bad))
    while queue:
        v = queue.pop()
        if v in seen:
            continue
        seen.add(v)
        touching = list(users.get(v, ())) + ([producer[v]] if v in producer else [])
        first = None
        for op in touching:
            if op.name not in parent:
                parent[op.name] = op.name
                queue += [o for o in op.outputs + op.inputs if o not in ranges]
            if first is None:
                first = root(op.name)
            elif root(op.name) != first:
                parent[root(op.name)] = first
    index = {op.name: op.index for op in ops}
    groups: dict = {}
    for name in sorted(parent, key=index.get):
        groups.setdefault(root(name), []).append(name)
    return sorted((tuple(g) for g in groups.values()), key=lambda g: index[g[0]])
