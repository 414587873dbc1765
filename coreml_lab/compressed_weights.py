"""What a compressed ML Program holds: one row per compressed weight, with its weight error.

:func:`describe` lists each compressed const of a model compressed with
``coremltools.optimize.coreml`` (mode, nbits, granularity, sparsity, the constexpr ops involved)
with its weight error (SNR, max abs error) against the uncompressed weight; the decompressed
values come from coremltools' own ``materialized_val_inference`` of the constexpr ops.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import numpy as np


def _dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types

    dt = var.dtype
    return types.builtin_to_string(dt) if dt is not None else "?"


def _bits(var) -> int:
    m = re.search(r"(\d+)$", _dtype_name(var))
    return int(m.group(1)) if m else 0


def _granularity(data_shape, scale_shape) -> tuple[str, str]:
    data_shape = tuple(int(d) for d in data_shape)
    scale_shape = tuple(int(d) for d in scale_shape) if scale_shape else ()
    if not scale_shape or int(np.prod(scale_shape)) == 1:
        return "per_tensor", ""
    scale_shape = (1,) * (len(data_shape) - len(scale_shape)) + scale_shape
    blocks = [d // s for d, s in zip(data_shape, scale_shape)]
    if sum(b != 1 for b in blocks) <= len(blocks) - 1 and all(b in (1, d) for b, d in zip(blocks, data_shape)):
        return "per_channel", ""
    return "per_block", "x".join(str(b) for b in blocks)


def _chain(op):
    """The constexpr ops producing ``op``'s value, ``op`` first."""
    out, todo = [], [op]
    while todo:
        cur = todo.pop()
        if any(cur is o for o in out):
            continue
        out.append(cur)
        for v in cur.inputs.values():
            for var in (v if isinstance(v, (list, tuple)) else [v]):
                parent = getattr(var, "op", None)
                if parent is not None and parent.op_type.startswith("constexpr_"):
                    todo.append(parent)
    return out


def _describe_chain(chain) -> dict:
    types_ = [o.op_type for o in chain]
    info = {"constexpr_ops": "+".join(types_), "mode": "", "nbits": 0, "granularity": "", "block": "",
            "sparsity": math.nan}
    modes = []
    for op in chain:
        t = op.op_type
        if t == "constexpr_lut_to_dense" or t == "constexpr_lut_to_sparse":
            modes.append("palettize")
            lut = op.lut
            idx = op.inputs.get("indices") if "indices" in op.inputs else op.inputs.get("indices_nonzero_data")
            entries = lut.shape[0] if lut.rank == 1 else lut.shape[-2]
            info["nbits"] = int(math.log2(entries)) if entries else 0
            if lut.rank == 1 or all(int(d) == 1 for d in lut.shape[:-2]):
                info["granularity"] = "per_tensor"
            else:
                info["granularity"] = "per_grouped_channel"
                if idx is not None:
                    info["block"] = "x".join(str(int(d) // int(g)) for d, g in zip(idx.shape, lut.shape[:-2]))
            if lut.rank > 1 and int(lut.shape[-1]) > 1:
                info["granularity"] += f" (vector {int(lut.shape[-1])})"
        elif t == "constexpr_affine_dequantize":
            modes.append("quantize")
            info["nbits"] = _bits(op.quantized_data)
            info["granularity"] = "per_tensor" if op.scale.rank == 0 or int(np.prod(op.scale.shape)) == 1 \
                else "per_channel"
        elif t in ("constexpr_blockwise_shift_scale", "constexpr_sparse_blockwise_shift_scale"):
            data = op.data if t == "constexpr_blockwise_shift_scale" else op.nonzero_data
            parent = getattr(data, "op", None)
            if parent is not None and parent.op_type.startswith("constexpr_lut"):
                info["granularity"] += " + per-channel scale"
                continue
            modes.append("quantize")
            info["nbits"] = _bits(data)
            shape = op.data.shape if t == "constexpr_blockwise_shift_scale" else op.data_mask.shape
            info["granularity"], info["block"] = _granularity(shape, op.scale.shape)
        elif t == "constexpr_sparse_to_dense":
            modes.append("prune")
            mask = op.mask.val
            parent = getattr(op.mask, "op", None)
            if mask is None and parent is not None:  # joint: the mask comes from lut_to_sparse / sparse quantization
                held = parent.inputs.get("indices_mask", parent.inputs.get("data_mask"))
                mask = None if held is None else held.val
            if mask is not None:
                mask = np.asarray(mask)
                if "shape" in op.inputs:  # iOS16: bit-packed mask
                    n = int(np.prod(op.shape.val))
                    nnz = int(np.unpackbits(mask.astype(np.uint8)).sum())
                else:
                    n, nnz = mask.size, int(np.count_nonzero(mask))
                info["sparsity"] = 1 - nnz / n if n else math.nan
    order = {"prune": 0, "palettize": 1, "quantize": 2}
    info["mode"] = "+".join(sorted(dict.fromkeys(modes), key=order.get))
    return info


def compressed_weights(program) -> list[dict]:
    """One entry per compressed weight of a MIL program: the decompression chain's last op and its consumers.

    Keys: ``weight`` (the decompressed var's name), ``op``/``op_type`` (the first non-constexpr
    op consuming it - the name ``op_name_configs`` takes), ``input`` (which input of it),
    ``shape``, plus mode / nbits / granularity / block / sparsity / constexpr_ops.
    """
    out = []
    for func in program.functions.values():
        for op in func.operations:
            if not op.op_type.startswith("constexpr_") or op.op_type == "constexpr_cast":
                continue
            for var in op.outputs:
                consumers = [c for c in var.child_ops if not c.op_type.startswith("constexpr_")]
                if not consumers:
                    continue
                if op.op_type == "constexpr_lut_to_sparse" or op.op_type == "constexpr_sparse_blockwise_shift_scale":
                    continue  # feeds constexpr_sparse_to_dense, described there
                user = consumers[0]
                arg = next((k for k, v in user.inputs.items() if v is var), "")
                out.append({"weight": var.name, "op": user.name, "op_type": user.op_type, "input": arg,
                            "shape": tuple(int(d) for d in var.shape), "_op": op, "_var": var, "_user": user,
                            **_describe_chain(_chain(op))})
    return out


def _original_weights(program) -> dict:
    """(consumer op name, input name) -> the const value, for an uncompressed program."""
    out = {}
    for func in program.functions.values():
        for op in func.operations:
            if op.op_type in ("const",) or op.op_type.startswith("constexpr_"):
                continue
            for arg, v in op.inputs.items():
                if isinstance(v, (list, tuple)):
                    continue
                parent = getattr(v, "op", None)
                if parent is not None and parent.op_type == "const" and isinstance(v.val, np.ndarray):
                    out[(op.name, arg)] = v.val
    return out


def original_of(compressed_program, original_program, paired: dict | None = None) -> dict:
    """Compressed weight var name -> its uncompressed value in ``original_program`` (the same model
    converted without compression); ``paired`` as in :func:`describe`. Weights not found are left out."""
    orig = _original_weights(original_program)
    out = {}
    for e in compressed_weights(compressed_program):
        w = orig.get(((paired or {}).get(e["op"], e["op"]), e["input"]))
        if w is not None:
            out[e["weight"]] = w
    return out


def decompressed_values(program, mlmodel=None) -> dict:
    """Var name -> the weight coremltools' own decompression materialises.

    Runs coremltools' ``WeightDecompressor`` pass (what ``decompress_weights`` runs: each
    constexpr op's ``materialized_val_inference``, in program order, so chains of joint
    compression resolve) on a copy of ``program``; the program itself is not modified. With
    ``mlmodel`` (the model ``program`` belongs to) the copy is the program read again from the
    model's spec: ``copy.deepcopy`` of a deep program exceeds Python's recursion limit.
    """
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    if mlmodel is not None:
        from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

        spec = mlmodel.get_spec()
        prog = load_milproto(spec, specification_version=spec.specificationVersion,
                             file_weights_dir=mlmodel.weights_dir or "")
    else:
        prog = copy.deepcopy(program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        WeightDecompressor(op_selector=lambda op: True).apply(prog)
    out = {}
    for func in prog.functions.values():
        for op in func.operations:
            if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray):
                out[op.outputs[0].name] = op.outputs[0].val
    return out


def weight_error(original: np.ndarray, decompressed: np.ndarray) -> tuple[float, float]:
    """(weight SNR in dB, max abs weight error); SNR is inf for an exact weight."""
    w = np.asarray(original, np.float64)
    d = np.asarray(decompressed, np.float64).reshape(w.shape)
    noise = float(((w - d) ** 2).sum())
    signal = float((w ** 2).sum())
    snr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal else -math.inf)
    return snr, float(np.abs(w - d).max()) if w.size else 0.0


def describe(compressed, original=None, layer_map=None, paired: dict | None = None):
    """A DataFrame: one row per compressed const of ``compressed`` (an MLModel, MIL program or Conversion).

    Columns: op (consumer op name, the name ``op_name_configs`` takes), op_type, input, module
    (torch module path where known), weight, shape, mode, nbits, granularity, block, sparsity,
    constexpr_ops, weight_snr_db, max_abs_weight_error. The weight error columns need
    ``original`` (the uncompressed model/program/Conversion of the same model; NaN without it).
    ``paired``: compressed op name -> the name of the same op in ``original``, where the two
    differ (an FP16 program beside its FP32 reference: ``linear_0_cast_fp16`` -> ``linear_0``).
    """
    import pandas as pd

    from .emulator.program import mil_program

    def program_of(x):
        if x is None:
            return None
        if hasattr(x, "program") and hasattr(x, "mlmodel"):
            return x.program
        if hasattr(x, "functions"):
            return x
        return mil_program(x)

    if layer_map is None and hasattr(compressed, "layer_map") and getattr(compressed, "source", None) is not None:
        try:
            layer_map = compressed.layer_map()
        except (ValueError, KeyError, AttributeError):
            layer_map = None
    prog = program_of(compressed)
    orig = _original_weights(program_of(original)) if original is not None else {}
    rows = []
    entries = compressed_weights(prog)
    mlmodel = getattr(compressed, "mlmodel", None) if hasattr(compressed, "program") else (
        compressed if hasattr(compressed, "get_spec") else None)
    decompressed = decompressed_values(prog, mlmodel) if orig and entries else {}
    for e in entries:
        snr = err = math.nan
        w = orig.get(((paired or {}).get(e["op"], e["op"]), e["input"]))
        if w is not None and e["weight"] in decompressed:
            snr, err = weight_error(w, decompressed[e["weight"]])
        rows.append({"op": e["op"], "op_type": e["op_type"], "input": e["input"],
                     "module": _module_of(layer_map, e["_user"]), "weight": e["weight"], "shape": e["shape"],
                     "mode": e["mode"], "nbits": e["nbits"], "granularity": e["granularity"], "block": e["block"],
                     "sparsity": e["sparsity"], "constexpr_ops": e["constexpr_ops"], "weight_snr_db": snr,
                     "max_abs_weight_error": err})
    cols = ["op", "op_type", "input", "module", "weight", "shape", "mode", "nbits", "granularity", "block",
            "sparsity", "constexpr_ops", "weight_snr_db", "max_abs_weight_error"]
    return pd.DataFrame(rows, columns=cols)


def _module_of(layer_map, op) -> str:
    if layer_map is None:
        return ""
    return layer_map.op_module(op) or ""


__all__ = ["describe", "compressed_weights", "decompressed_values", "weight_error", "original_of"]
