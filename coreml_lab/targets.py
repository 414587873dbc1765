"""The deployment-target matrix: one model converted for several targets, compared side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from .conversion import ConversionError
from .convert import convert, prepare
from .feeds import dataset
from .fixes import measure
from .lint import lint
from .options import ConversionOptions, as_options
from .reference import reference_outputs

MATRIX_COLUMNS = ["target", "ok", "error", "explanation", "spec_version", "input_dtypes", "output_dtypes", "op_types",
                  "op_type_changes", "max_rel_error", "findings"]


def target_matrix(model, example_inputs=None, options: ConversionOptions | dict | None = None,
                  targets: Sequence[str] = ("iOS15", "iOS16", "iOS17", "iOS18"), compute_unit: str = "CPU_AND_NE",
                  inputs=None) -> pd.DataFrame:
    """Convert for several deployment targets and compare them, one row per target.

    Columns: target, ok, error (the conversion error), explanation (what it means and the fix),
    spec_version, input_dtypes, output_dtypes (name -> Core ML type), op_types (sorted),
    op_type_changes (added/removed op types vs the previous target), max_rel_error (worst output
    error vs torch FP32 under ``compute_unit``, emulated), findings (static checks, see :func:`lint`).
    """
    opts = as_options(options)
    prep = prepare(model, example_inputs)
    feeds = dataset(inputs, prep.inputs) if prep.inputs is not None else []
    want = reference_outputs(prep.source.reference, prep.inputs, feeds) if prep.source.reference is not None else []
    rows, previous = [], None
    for target in targets:
        row = dict.fromkeys(MATRIX_COLUMNS)
        row["target"] = target
        try:
            conv = convert(None, options=opts.replace(target=target), prepared=prep)
        except ConversionError as exc:
            row.update(ok=False, error=str(exc).splitlines()[0],
                       explanation=(f"{exc.explanation.title}: {exc.explanation.fix}" if exc.explanation else
                                    "no known explanation: see the conversion messages"),
                       findings=[], op_types=[], op_type_changes="")
            rows.append(row)
            continue
        ins, outs = conv.io_dtypes()
        types = sorted(conv.op_types())
        changes = ""
        if previous is not None:
            added, removed = sorted(set(types) - set(previous)), sorted(set(previous) - set(types))
            changes = "; ".join(p for p in (f"+{added}" if added else "", f"-{removed}" if removed else "") if p)
        previous = types
        err = measure(conv, feeds, want, (compute_unit,)) if want else math.nan
        findings = lint(conv)
        row.update(ok=True, error="", explanation="", spec_version=conv.spec_version, input_dtypes=ins,
                   output_dtypes=outs, op_types=types, op_type_changes=changes, max_rel_error=err,
                   findings=[f"{f.severity}: {f.title}" for f in findings])
        rows.append(row)
    return pd.DataFrame(rows, columns=MATRIX_COLUMNS)
