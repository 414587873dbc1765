"""Compression in a diagnosis: what each compressed weight costs its layer (``Report.compression``).

A compressed conversion is diagnosed against the FP32 reference conversion of the same model
without compression (:mod:`.diagnosis`). Each compressed weight's consumer (a ``linear``,
``conv`` ...) is re-run alone on the reference inputs with the weight as the unit decompressed it
(:mod:`.local_error`): its ``local_rel_err`` is what the layer's compressed weights (and its
precision) add here, ``uncompressed_local_rel_err`` the same op re-run with its original weights
at the same precision (the precision's share alone), its inputs' ``rel_err`` what arrives from
upstream. :func:`compression_table`
joins that with the weight error of :func:`.compressed_weights.describe` (weight SNR and max abs
error against the uncompressed weight of the reference conversion).
"""

from __future__ import annotations

import math

import pandas as pd

from .compressed_weights import describe, original_of

COLUMNS = ["compute_unit", "op", "op_type", "module", "weight", "compression", "mode", "nbits", "granularity",
           "block", "sparsity", "weight_snr_db", "weight_max_abs_err", "local_rel_err", "uncompressed_local_rel_err", "upstream_rel_err",
           "rel_err", "index"]


def label(row) -> str:
    """A compressed weight in words: ``palettize 4-bit per_tensor``, ``prune 50%``, ``quantize 8-bit per_channel``."""
    parts = [str(row.mode)]
    if row.nbits:
        parts.append(f"{int(row.nbits)}-bit")
    if row.granularity:
        parts.append(str(row.granularity) + (f" {row.block}" if row.block else ""))
    if isinstance(row.sparsity, float) and not math.isnan(row.sparsity):
        parts.append(f"{100 * row.sparsity:.0f}% sparse")
    return " ".join(parts)


def _reference_op_names(conversion, reference, ref_of: dict) -> dict:
    """Diagnosed op name -> the name of the reference (uncompressed FP32) op it is paired with."""
    ref_op_of_var = {}
    for func in reference.program.functions.values():
        for op in func.operations:
            for v in op.outputs:
                ref_op_of_var[v.name] = op.name
    out = {}
    for func in conversion.program.functions.values():
        for op in func.operations:
            if op.outputs and ref_of.get(op.outputs[0].name) in ref_op_of_var:
                out[op.name] = ref_op_of_var[ref_of[op.outputs[0].name]]
    return out


def original_weights(conversion, reference, pairing) -> dict:
    """Compressed weight var of ``conversion`` -> its uncompressed value in ``reference`` (the FP32
    conversion without compression); empty when there is none to compare with (a loaded package)."""
    if reference is None or reference is conversion or not any(
            op.op_type.startswith("constexpr_") for f in conversion.program.functions.values() for op in f.operations):
        return {}
    return original_of(conversion.program, reference.program,
                       _reference_op_names(conversion, reference, pairing.ref_of))


def compression_table(layers: pd.DataFrame, conversion, reference, pairing,
                      uncompressed_local: dict | None = None) -> pd.DataFrame:
    """One row per (compute unit, compressed weight) of ``conversion``; empty when nothing is compressed.

    ``reference``: the uncompressed FP32 conversion (its weights are the originals; none when it
    is the diagnosed conversion itself, e.g. a loaded package: the weight error columns are NaN).
    ``upstream_rel_err`` is the worst accumulated error at the consumer's other inputs.
    ``uncompressed_local``: (compute unit, output var) -> the local ErrorStats of the consumer re-run
    with its original weights at the same precision (:class:`.local_error.LocalErrors`): the
    ``uncompressed_local_rel_err`` column, the precision's share of the local error.
    """
    original = None if reference is conversion or reference is None else reference
    paired = _reference_op_names(conversion, original, pairing.ref_of) if original is not None else None
    weights = describe(conversion, original.program if original is not None else None,
                       layer_map=pairing.layer_map, paired=paired)
    if not len(weights) or layers is None or not len(layers):
        return pd.DataFrame(columns=COLUMNS)
    rel_of = {(r.compute_unit, r.output): r.rel_err for r in layers.itertuples()}
    rows = []
    for r in layers.itertuples():
        for w in weights[weights["op"] == r.op].itertuples():
            upstream = [rel_of.get((r.compute_unit, i)) for i in str(r.inputs).split(",") if i and i != w.weight]
            upstream = [x for x in upstream if x is not None and not math.isnan(x)]
            rows.append({"compute_unit": r.compute_unit, "op": r.op, "op_type": r.op_type,
                         "module": r.module or w.module, "weight": w.weight, "compression": label(w), "mode": w.mode,
                         "nbits": w.nbits, "granularity": w.granularity, "block": w.block, "sparsity": w.sparsity,
                         "weight_snr_db": w.weight_snr_db, "weight_max_abs_err": w.max_abs_weight_error,
                         "local_rel_err": r.local_rel_err,
                         "uncompressed_local_rel_err": _rel(uncompressed_local, (r.compute_unit, r.output)),
                         "upstream_rel_err": max(upstream) if upstream else 0.0,
                         "rel_err": r.rel_err, "index": r.index})
    return pd.DataFrame(rows, columns=COLUMNS)


def _rel(stats: dict | None, key) -> float:
    st = (stats or {}).get(key)
    return st.result().get("rel_err", math.nan) if st is not None and st.n else math.nan


def mark_layers(layers: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``layers`` with a ``compression`` column: the compression of the weights an op reads ("" if none)."""
    layers = layers.copy()
    of = {}
    for r in table.itertuples():
        of.setdefault(r.op, []).append(r.compression)
    layers["compression"] = [", ".join(dict.fromkeys(of.get(op, []))) for op in layers["op"]] if len(layers) else []
    return layers


__all__ = ["compression_table", "mark_layers", "label", "COLUMNS"]
