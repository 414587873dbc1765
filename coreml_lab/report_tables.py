"""The Report's tables (layers, outputs, references, onsets, divergence, histograms) made from a diagnosis' Statistics.

:meth:`.report.Report.from_statistics` calls :func:`tables`; the column lists here are the
Report's (``Report.LAYER_COLUMNS`` ...), described in :mod:`.report`'s docstring.
"""

from __future__ import annotations

import math

import pandas as pd

LAYER_COLUMNS = ["compute_unit", "runtime", "index", "op", "output", "op_type", "module", "module_output",
                 "device", "shape", "max_abs", "max_abs_err", "mean_abs_err", "rel_err", "snr_db", "psnr_db",
                 "cosine", "nonfinite_frac", "nonfinite_onset", "local_max_abs_err", "local_rel_err",
                 "local_snr_db", "torch_rel_err", "inputs", "reference", "int_mismatch_frac",
                 "int_mismatch_onset", "compression"]
OUTPUT_COLUMNS = ["compute_unit", "runtime", "output", "shape", "max_abs_err", "mean_abs_err", "rel_err",
                  "snr_db", "psnr_db", "cosine", "nonfinite_frac", "top1_agree", "elements",
                  "golden_max_abs_err", "golden_rel_err", "golden"]
RANGE_COLUMNS = ["index", "op", "output", "op_type", "kind", "module", "inputs_max_abs", "max_abs",
                 "min_abs_nonzero", "overflow_frac", "subnormal_frac", "flush_frac", "nonfinite_frac",
                 "elements", "used_by"]
REFERENCE_COLUMNS = ["reference", "against", "output", "max_abs_err", "mean_abs_err", "rel_err", "snr_db",
                     "psnr_db", "cosine", "nonfinite_frac", "top1_agree", "elements"]
ONSET_COLUMNS = ["compute_unit", "index", "op", "output", "op_type", "module", "device"]
DIVERGENCE_COLUMNS = ["pair", "index", "op", "output", "op_type", "module", "max_abs_diff", "rel_diff",
                      "nonfinite_frac"]
STEP_COLUMNS = ["step", "compute_unit", "name", "kind", "index", "max_abs_err", "rel_err", "nonfinite_frac"]


def tables(stats, runtime: str) -> dict:
    """The Report's tables and histograms from a :class:`~.statistics.Statistics` (keyword arguments of Report)."""
    outs = stats.model_outputs
    note = outs.note()
    return dict(
        layers=layer_table(stats, runtime), outputs=output_table(stats, runtime),
        fp16_range=pd.DataFrame(stats.range_rows(), columns=RANGE_COLUMNS),
        references=pd.DataFrame([{"reference": k[0], "against": k[1], "output": k[2], **v.result()}
                                  for k, v in outs.references.items()], columns=REFERENCE_COLUMNS),
        first_nonfinite=onset_table(stats), torch_layers=torch_layer_table(stats),
        divergence=divergence_table(stats), histograms=histograms(stats),
        notes=sorted(stats.notes | ({note} if note else set())), runs=stats.runs,
        steps=pd.DataFrame(stats.step_rows, columns=STEP_COLUMNS),
    )


def layer_table(stats, runtime: str) -> pd.DataFrame:
    module_of = stats.pairing.layer_map.module_of
    layer_rows = []
    nan = math.nan
    for cu in stats.units:
        for name, st in stats.ops[cu].items():
            if st.info is None:
                continue
            info = st.info
            acc = st.acc.result() if st.acc.n else {}
            loc = st.local.result() if st.local.n else {}
            key = stats.ref_of.get(name)
            mod_out = stats.pairing.module_vars.get(key)
            torch_layer = stats.torch_layers[mod_out].result() if mod_out in stats.torch_layers else {}
            layer_rows.append({
                "compute_unit": cu, "runtime": runtime, "index": info.index, "op": info.op, "output": name,
                "op_type": info.op_type, "module": module_of(name), "module_output": mod_out,
                "device": info.device, "shape": stats.shapes.get(name), "max_abs": st.max_abs,
                "max_abs_err": acc.get("max_abs_err", nan), "mean_abs_err": acc.get("mean_abs_err", nan),
                "rel_err": acc.get("rel_err", nan), "snr_db": acc.get("snr_db", nan),
                "psnr_db": acc.get("psnr_db", nan), "cosine": acc.get("cosine", nan),
                "nonfinite_frac": acc.get("nonfinite_frac", 1.0 if st.nonfinite else 0.0),
                "nonfinite_onset": st.nonfinite and not st.nonfinite_from_inputs,
                "local_max_abs_err": loc.get("max_abs_err", nan), "local_rel_err": loc.get("rel_err", nan),
                "local_snr_db": loc.get("snr_db", nan), "torch_rel_err": torch_layer.get("rel_err", nan),
                "inputs": ",".join(info.inputs), "reference": key if (st.acc.n or st.ints) else None,
                "int_mismatch_frac": st.ints_differ / st.ints if st.ints else nan,
                "int_mismatch_onset": bool(st.ints_differ) and not st.ints_from_inputs,
            })
    layers = pd.DataFrame(layer_rows, columns=LAYER_COLUMNS)
    if len(layers):
        layers = layers.sort_values(["compute_unit", "index"], kind="stable").reset_index(drop=True)
    return layers


def output_table(stats, runtime: str) -> pd.DataFrame:
    """Per (unit, model output): the errors against torch FP32, against FP64 where the golden run was
    made, and (``golden``) whether it was and why not."""
    outs = stats.model_outputs
    rows = []
    for cu in stats.units:
        for name in stats.output_names:
            if (cu, name) not in outs.outputs:
                continue
            gold = outs.outputs_golden[(cu, name)].result() if (cu, name) in outs.outputs_golden else {}
            rows.append({"compute_unit": cu, "runtime": runtime, "output": name,
                         "shape": stats.shapes.get(("output", name)), **outs.outputs[(cu, name)].result(),
                         "golden_max_abs_err": gold.get("max_abs_err", math.nan),
                         "golden_rel_err": gold.get("rel_err", math.nan), "golden": outs.status(name)})
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def onset_table(stats) -> pd.DataFrame:
    module_of = stats.pairing.layer_map.module_of
    onset = []
    for cu, name in stats.first_nonfinite.items():
        info = stats.ops[cu][name].info
        onset.append({"compute_unit": cu, "index": info.index, "op": info.op, "output": name,
                      "op_type": info.op_type, "module": module_of(name), "device": info.device})
    return pd.DataFrame(onset, columns=ONSET_COLUMNS)


def torch_layer_table(stats) -> pd.DataFrame:
    return pd.DataFrame([{"module": m, **s.result()} for m, s in stats.torch_layers.items()]
                        + [{"module": m, "shape_mismatch": f"{a} vs torch {b}"}
                           for m, (a, b) in stats.torch_mismatch.items()])


def divergence_table(stats) -> pd.DataFrame:
    module_of = stats.pairing.layer_map.module_of
    nan = math.nan
    rows = []
    first = stats.ops[stats.units[0]] if stats.units else {}
    for (a, b, name), st in stats.pairs.items():
        info = first[name].info if name in first and first[name].info else None
        rows.append({"pair": f"{a} vs {b}", "index": info.index if info else nan, "op": info.op if info else "",
                     "output": name, "op_type": info.op_type if info else "", "module": module_of(name),
                     **st.result()})
    return pd.DataFrame(rows, columns=DIVERGENCE_COLUMNS)


def histograms(stats) -> dict:
    found = {("layer", cu, name): st.hist.to_dict() for cu in stats.units
             for name, st in stats.ops[cu].items()
             if st.hist.counts.sum() or st.hist.exact or st.hist.nonfinite}
    found.update({("output", cu, name): h.to_dict() for (cu, name), h in stats.model_outputs.output_hist.items()})
    return found
