"""Suggestions for a Report: ranked changes to try, each with its measured effect where it can be measured.

Precision suggestions (convert in FP32, keep a few ops in FP32 with :func:`.fixes.find_fp32_ops`)
are verified by converting and re-running when the model is given, else derived from the report's
own numbers; the CPU suggestion uses the report's own runs; the lint findings of the conversion
follow with their scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .convert import convert, prepare
from .fixes import CHECK_UNITS, find_fp32_ops, measure
from .lint import lint
from .options import ConversionOptions
from .reference import reference_outputs


@dataclass
class Suggestion:
    """One change to try, with its measured (or, where it cannot be measured here, expected) effect."""

    title: str
    change: str           # what to change, in code terms
    effect: str           # the measured (or, where unmeasurable here, expected) effect
    measured: bool
    error: float = math.nan
    score: float = 0.0
    details: Any = None


def suggest_fixes(report, model=None, example_inputs=None, tolerance: float = 1e-2, verify: bool = True,
                  time_budget: float = 120.0) -> list[Suggestion]:
    """Ranked suggestions for a Report, each with its measured effect where it can be measured.

    With ``model`` (and its example inputs) the precision suggestions are verified by converting
    and re-running; without it they are derived from the report's own numbers.
    """
    out: list[Suggestion] = []
    opts = report.options or ConversionOptions()
    worst = {r.compute_unit: (math.inf if r.nonfinite_frac > 0 else r.rel_err) for r in report.outputs.itertuples()}
    bad = {cu: e for cu, e in worst.items() if not e <= tolerance}
    top1 = {r.compute_unit: r.top1_agree for r in report.outputs.itertuples() if r.top1_agree == r.top1_agree}
    flips = {cu for cu, v in top1.items() if v < 1}
    if not bad and not flips and report.ok:
        out.append(Suggestion("Nothing to fix", "keep the current options",
                              f"every compute unit is within tolerance {tolerance:g}", True, max(worst.values() or [0])))
    if report.ok and opts.precision != "fp32" and (bad or flips):
        if verify and model is not None:
            conv = convert(model, example_inputs, opts.replace(precision="fp32", fp32_ops=(), compression=None))
            prep = prepare(model, example_inputs)
            feeds = [prep.inputs.as_numpy()]
            e = measure(conv, feeds, reference_outputs(prep.source.reference, prep.inputs, feeds), CHECK_UNITS)
            out.append(Suggestion("Convert in FP32", "ConversionOptions(precision='fp32') "
                                  "(compute_precision=ct.precision.FLOAT32)",
                                  f"worst output error {_fmt(max(bad.values() or [0]))} -> {_fmt(e)} (measured, "
                                  "emulated GPU/NE); FP32 models do not run on the Neural Engine", True, e, 90))
            fix = find_fp32_ops(model, example_inputs, opts, tolerance=tolerance, time_budget=time_budget,
                                progress=False)
            if fix.found and fix.n_fp32:
                out.append(Suggestion("Mixed precision", f"ConversionOptions(precision='mixed', fp32_ops={fix.ops!r})",
                                      f"{fix.message}", True, fix.error_after, 100 - 50 * fix.fraction_fp32, fix))
        else:
            culprits = report.culprits(5, tolerance)
            ops = tuple(dict.fromkeys(culprits.op_type)) if len(culprits) else ()
            out.append(Suggestion("Convert in FP32", "ConversionOptions(precision='fp32')",
                                  "expected to remove FP16 overflow/underflow (not verified: pass the model to "
                                  "measure)", False, math.nan, 60))
            if ops:
                out.append(Suggestion("Mixed precision", f"find_fp32_ops(...) starting from {ops}",
                                      "expected to fix the culprits with fewer FP32 ops (not verified)", False,
                                      math.nan, 55))
    cpu = worst.get("CPU_ONLY")
    if cpu is not None and cpu <= tolerance and (bad or flips) and "CPU_ONLY" not in flips:
        out.append(Suggestion("Run on the CPU", "MLModel(path, compute_units=ct.ComputeUnit.CPU_ONLY)",
                              f"CPU_ONLY error {_fmt(cpu)} vs {_fmt(max(list(bad.values()) or [0]))} on "
                              f"{', '.join(sorted(set(bad) | flips))} (measured on this report's runs); "
                              "slower, no GPU/NE", True, cpu, 70))
    if report.conversion is not None:
        for f in lint(report.conversion):
            out.append(Suggestion(f.title, f.fix, f.message, False, math.nan, f.score, f))
    return sorted(out, key=lambda s: -s.score)


def _fmt(x: float) -> str:
    return "inf/NaN" if not (x == x) or math.isinf(x) else f"{x:.3g}"
