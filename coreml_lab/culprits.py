"""Culprit rules: why an op is to blame, as a table of named rules (name, test, score, reason).

:data:`RULES` is the policy behind :meth:`.report.Report.culprits`. Each rule looks at one row
of ``Report.layers`` (one op output on one compute unit) with its :class:`Context` (the FP16
range of the op's reference var, the constants it reads, the error at its inputs); its ``test``
gives the evidence (one item per blame, none when the rule does not apply), its ``score``
ranks it and its ``reason`` says it in words. An op is blamed when any rule applies; its score
is its strongest rule's, its reason every applying rule's, strongest first. The scores put the
rules in bands, so a stronger kind of evidence always outranks a weaker one:

=====================  =====  ============================================================
rule                   score  applies when
=====================  =====  ============================================================
nonfinite_onset        1000+  inf/NaN start at the op while its inputs are finite
fp16_overflow_onset     900+  its output exceeds 65504 while its inputs stay within range
translation_error       800+  the FP32 program already differs from torch (rel > 1e-3)
integer_flip            700+  its integer output (top-k, argmax) starts to differ
constant_out_of_range   650   a constant it reads flushes to zero or overflows in FP16
flush_to_zero           600+  its values fall below 2^-24 and flush to zero
compressed_weights      500+  it reads compressed weights and alone loses more than ``tolerance``
local_error             100+  the op alone loses more than ``tolerance`` relative
error_growth             50+  its error grows over 10x its inputs' (and not only inherited)
=====================  =====  ============================================================

To add a rule: append a :class:`Rule` to :data:`RULES` with a score in a free band, and a
test in ``tests/test_culprits.py`` that makes it apply and not apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd

from .fp16 import FP16_MAX

COLUMNS = ["compute_unit", "op", "op_type", "module", "reason", "score", "index", "output",
           "rel_err", "local_rel_err", "nonfinite_frac"]

#: a torch translation error is reported above this relative error at a module output
TRANSLATION_TOLERANCE = 1e-3
#: error "grows here" when it exceeds this multiple of the worst error at the op's inputs
GROWTH_FACTOR = 10.0


@dataclass(frozen=True)
class Context:
    """What the rules know beside a layer row."""

    tolerance: float
    #: reference var -> its ``fp16_range`` row (kind "activation")
    ranges: dict
    #: reference var -> ``fp16_range`` rows of the constants it reads that flush or overflow in FP16
    bad_constants: dict
    #: (compute unit, output var) -> rel_err: the error at an op's inputs
    rel_err_of: dict
    #: op name -> its rows of ``Report.compression`` (the compressed weights it reads)
    compressed: dict = None

    def compressed_weights(self, row) -> list:
        return list((self.compressed or {}).get(row.op, []))

    def range_of(self, row):
        return self.ranges.get(row.reference) if row.reference else None

    def bad_here(self, row) -> bool:
        """The op's output is wrong (non-finite, or beyond tolerance)."""
        return (row.nonfinite_frac or 0) > 0 or gt(row.rel_err, self.tolerance)

    def bad_alone(self, row) -> bool:
        """The op alone is wrong (local error beyond tolerance, or non-finite values start here)."""
        return gt(row.local_rel_err, self.tolerance) or bool(row.nonfinite_onset)

    def worst_input_error(self, row) -> float:
        errs = [self.rel_err_of.get((row.compute_unit, i)) for i in str(row.inputs).split(",") if i]
        errs = [x for x in errs if x is not None and not math.isnan(x)]
        return max(errs) if errs else 0.0


@dataclass(frozen=True)
class Rule:
    """One reason to blame an op: ``test(row, context)`` gives the evidence (an iterable, one item
    per blame), ``score`` and ``reason`` take (row, context, evidence item)."""

    name: str
    test: Callable[..., Iterable]
    score: Callable[..., float]
    reason: Callable[..., str]

    def apply(self, row, context: Context) -> list[tuple[float, str]]:
        return [(self.score(row, context, e), self.reason(row, context, e)) for e in self.test(row, context)]


def _when(condition: bool, evidence=True) -> list:
    return [evidence] if condition else []


def _overflow_onset(row, c: Context) -> list:
    rng = c.range_of(row)
    return _when(rng is not None and rng.overflow_frac > 0 and not (rng.inputs_max_abs > FP16_MAX)
                 and c.bad_here(row), rng)


def _flush(row, c: Context) -> list:
    rng = c.range_of(row)
    return _when(rng is not None and rng.flush_frac > 0 and c.bad_alone(row), rng)


def _bad_constants(row, c: Context) -> list:
    return list(c.bad_constants.get(row.reference, [])) if c.bad_alone(row) else []


def _compressed(row, c: Context) -> list:
    weights = c.compressed_weights(row)
    if not weights or not gt(row.local_rel_err, c.tolerance):
        return []
    return [min(weights, key=lambda w: w.weight_snr_db if w.weight_snr_db == w.weight_snr_db else math.inf)]


def _compressed_reason(row, c: Context, w) -> str:
    snr = "" if w.weight_snr_db != w.weight_snr_db else f", weight SNR {w.weight_snr_db:.0f} dB"
    plain = getattr(w, "uncompressed_local_rel_err", math.nan)
    plain = "" if plain != plain else f"{plain:.2g} with its weights uncompressed; "
    return (f"compressed weights: {w.compression}{snr}, local error {row.local_rel_err:.2g} "
            f"({plain}rel err {c.worst_input_error(row):.2g} arrives from upstream)")


def _growth(row, c: Context) -> list:
    worst_in = c.worst_input_error(row)
    grows = gt(row.rel_err, c.tolerance) and not math.isinf(row.rel_err) \
        and row.rel_err > GROWTH_FACTOR * max(worst_in, 1e-12) \
        and not (row.local_rel_err == row.local_rel_err and row.local_rel_err < 0.1 * row.rel_err)
    return _when(grows, worst_in)


RULES: tuple[Rule, ...] = (
    Rule("nonfinite_onset",
         lambda r, c: _when(bool(r.nonfinite_onset)),
         lambda r, c, e: 1000 + 100 * (r.nonfinite_frac or 0),
         lambda r, c, e: f"non-finite values start here ({pct(r.nonfinite_frac)} inf/NaN) while its inputs are "
                         "finite"),
    Rule("fp16_overflow_onset", _overflow_onset,
         lambda r, c, rng: 900 + math.log10(max(rng.max_abs / FP16_MAX, 1.0)),
         lambda r, c, rng: f"FP16 overflow starts here: max |x| = {rng.max_abs:.3g} > 65504 while its inputs "
                           f"stay within FP16 range ({fmt(rng.inputs_max_abs)})"),
    Rule("integer_flip",
         lambda r, c: _when(bool(r.int_mismatch_onset) and gt(r.int_mismatch_frac, 0)),
         lambda r, c, e: 700 + r.int_mismatch_frac,
         lambda r, c, e: f"its integer output differs on {pct(r.int_mismatch_frac)} of elements: FP16 rounding "
                         "changes which elements it selects (a discrete op amplifies tiny errors)"),
    Rule("translation_error",
         lambda r, c: _when(gt(r.torch_rel_err, TRANSLATION_TOLERANCE)),
         lambda r, c, e: 800 + math.log10(r.torch_rel_err / TRANSLATION_TOLERANCE),
         lambda r, c, e: f"the FP32 program already differs from torch here (rel err {r.torch_rel_err:.2g}): "
                         "a translation error, not precision"),
    Rule("flush_to_zero", _flush,
         lambda r, c, rng: 600 + rng.flush_frac,
         lambda r, c, rng: f"{pct(rng.flush_frac)} of its values are below 2^-24 and flush to zero in FP16"),
    Rule("constant_out_of_range", _bad_constants,
         lambda r, c, w: 650,
         lambda r, c, w: f"its constant {w.output} (|x| = {fmt(w.min_abs_nonzero if w.flush_frac else w.max_abs)}) "
                         f"{'flushes to zero' if w.flush_frac > 0 else 'overflows'} in FP16"),
    Rule("compressed_weights", _compressed,
         lambda r, c, w: 500 + min(10 * math.log10(r.local_rel_err / c.tolerance), 90),
         _compressed_reason),
    Rule("local_error",
         lambda r, c: _when(gt(r.local_rel_err, c.tolerance)),
         lambda r, c, e: 100 + min(10 * math.log10(r.local_rel_err / c.tolerance), 400),
         lambda r, c, e: f"the op alone loses {r.local_rel_err:.2g} relative"),
    Rule("error_growth", _growth,
         lambda r, c, worst_in: 50 + min(math.log10(r.rel_err / max(worst_in, 1e-12)), 40),
         lambda r, c, worst_in: f"error grows here: rel err {r.rel_err:.2g} vs {worst_in:.2g} at its inputs"),
)


def context(layers: pd.DataFrame, fp16_range: pd.DataFrame | None, tolerance: float,
            compression: pd.DataFrame | None = None) -> Context:
    """The rules' :class:`Context` from a Report's ``layers``, ``fp16_range`` and ``compression`` tables."""
    ranges, bad_constants = {}, {}
    if fp16_range is not None and len(fp16_range):
        ranges = {r.output: r for r in fp16_range[fp16_range["kind"] == "activation"].itertuples()}
        for w in fp16_range[fp16_range["kind"] == "weight"].itertuples():
            if w.flush_frac > 0 or w.overflow_frac > 0:
                for user in str(w.used_by).split(", "):
                    bad_constants.setdefault(user, []).append(w)
    rel_err_of = {(r.compute_unit, r.output): r.rel_err for r in layers.itertuples()}
    compressed: dict = {}
    if compression is not None and len(compression):
        seen = set()
        for w in compression.itertuples():
            if (w.op, w.weight) not in seen:  # the same weight on every unit
                seen.add((w.op, w.weight))
                compressed.setdefault(w.op, []).append(w)
    return Context(tolerance, ranges, bad_constants, rel_err_of, compressed)


def culprits(layers: pd.DataFrame, fp16_range: pd.DataFrame | None, n: int = 10, tolerance: float = 1e-2,
             rules: Iterable[Rule] = RULES, compression: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ops most to blame by ``rules``, best first (see :meth:`.report.Report.culprits`)."""
    if layers is None or not len(layers):
        return pd.DataFrame(columns=COLUMNS)
    c = context(layers, fp16_range, tolerance, compression)
    rules = tuple(rules)
    rows = []
    for r in layers.itertuples():
        reasons = [found for rule in rules for found in rule.apply(r, c)]
        if not reasons:
            continue
        reasons.sort(key=lambda x: -x[0])
        rows.append({"compute_unit": r.compute_unit, "op": r.op, "op_type": r.op_type, "module": r.module,
                     "reason": "; ".join(t for _, t in reasons), "score": round(reasons[0][0], 3),
                     "index": r.index, "output": r.output, "rel_err": r.rel_err,
                     "local_rel_err": r.local_rel_err, "nonfinite_frac": r.nonfinite_frac})
    df = pd.DataFrame(rows, columns=COLUMNS)
    if not len(df):
        return df
    # the same op blamed for the same reason on several compute units: one row
    merged = (df.groupby(["op", "reason"], sort=False, dropna=False)
              .agg({**{col: "first" for col in COLUMNS if col not in ("op", "reason", "compute_unit")},
                    "compute_unit": lambda units: ", ".join(units)})
              .reset_index())[COLUMNS]
    return (merged.sort_values(["score", "index"], ascending=[False, True], kind="stable").head(n)
            .reset_index(drop=True))


def gt(x, t) -> bool:
    """``x > t`` for a number that may be None or NaN (then False)."""
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and x > t


def pct(x) -> str:
    return f"{100 * (x or 0):.1f}%" if (x or 0) >= 0.001 else f"{100 * (x or 0):.2g}%"


def fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.3g}"
