"""The culprit rules one at a time (coreml_lab/culprits.py): each applies on its evidence and not without it."""

from __future__ import annotations

import math
from collections import namedtuple

import pandas as pd
import pytest

from coreml_lab.culprits import RULES, Context, culprits
from coreml_lab.report import Report

Layer = namedtuple("Layer", Report.LAYER_COLUMNS)
Range = namedtuple("Range", Report.RANGE_COLUMNS)
RULE = {rule.name: rule for rule in RULES}
TOL = 1e-2


def layer(**values) -> Layer:
    row = dict.fromkeys(Report.LAYER_COLUMNS, math.nan)
    row.update(compute_unit="CPU_AND_NE", op="op_1", op_type="mul", output="v1", reference="v1", inputs="",
               nonfinite_frac=0.0, nonfinite_onset=False, int_mismatch_onset=False, module="m")
    row.update(values)
    return Layer(**row)


def rng(**values) -> Range:
    row = dict.fromkeys(Report.RANGE_COLUMNS, 0.0)
    row.update(output="v1", kind="activation", inputs_max_abs=1.0, max_abs=1.0, used_by="")
    row.update(values)
    return Range(**row)


def context(ranges=(), bad_constants=None, rel_err_of=None) -> Context:
    return Context(TOL, {r.output: r for r in ranges}, bad_constants or {}, rel_err_of or {})


def applies(name, row, ctx=None) -> list:
    return RULE[name].apply(row, ctx or context())


def test_the_table_names_each_rule_once_in_the_documented_bands():
    assert [r.name for r in RULES] == ["nonfinite_onset", "fp16_overflow_onset", "integer_flip", "translation_error",
                                       "flush_to_zero", "constant_out_of_range", "compressed_weights", "local_error",
                                       "error_growth"]


def test_nonfinite_onset():
    [(score, reason)] = applies("nonfinite_onset", layer(nonfinite_onset=True, nonfinite_frac=0.5))
    assert score == 1050 and "start here (50.0% inf/NaN)" in reason
    assert applies("nonfinite_onset", layer(nonfinite_onset=False, nonfinite_frac=0.5)) == []


def test_fp16_overflow_onset_needs_inputs_in_range_and_a_bad_output():
    over = rng(overflow_frac=0.1, max_abs=655040.0, inputs_max_abs=100.0)
    [(score, reason)] = applies("fp16_overflow_onset", layer(rel_err=1.0), context([over]))
    assert score == pytest.approx(901.0) and "max |x| = 6.55e+05 > 65504" in reason and "(100)" in reason
    assert applies("fp16_overflow_onset", layer(rel_err=1e-4), context([over])) == []  # output still fine
    inherited = rng(overflow_frac=0.1, max_abs=655040.0, inputs_max_abs=70000.0)
    assert applies("fp16_overflow_onset", layer(rel_err=1.0), context([inherited])) == []
    assert applies("fp16_overflow_onset", layer(rel_err=1.0, reference=None), context([over])) == []


def test_integer_flip():
    [(score, reason)] = applies("integer_flip", layer(int_mismatch_onset=True, int_mismatch_frac=0.25))
    assert score == 700.25 and "differs on 25.0% of elements" in reason
    assert applies("integer_flip", layer(int_mismatch_onset=False, int_mismatch_frac=0.25)) == []
    assert applies("integer_flip", layer(int_mismatch_onset=True, int_mismatch_frac=0.0)) == []


def test_translation_error():
    [(score, reason)] = applies("translation_error", layer(torch_rel_err=0.1))
    assert score == pytest.approx(802.0) and "a translation error" in reason
    assert applies("translation_error", layer(torch_rel_err=1e-4)) == []
    assert applies("translation_error", layer()) == []  # NaN: no torch comparison


def test_flush_to_zero_needs_the_op_alone_to_be_wrong():
    flushed = rng(flush_frac=0.3)
    [(score, reason)] = applies("flush_to_zero", layer(local_rel_err=0.5), context([flushed]))
    assert score == 600.3 and "30.0% of its values are below 2^-24" in reason
    assert applies("flush_to_zero", layer(local_rel_err=1e-4), context([flushed])) == []
    assert applies("flush_to_zero", layer(local_rel_err=0.5), context([rng()])) == []


def test_constant_out_of_range_one_blame_per_constant():
    tiny = rng(output="w_tiny", kind="weight", flush_frac=0.2, min_abs_nonzero=1e-9)
    huge = rng(output="w_huge", kind="weight", overflow_frac=0.1, max_abs=1e6)
    ctx = context(bad_constants={"v1": [tiny, huge]})
    found = applies("constant_out_of_range", layer(local_rel_err=0.5), ctx)
    assert [s for s, _ in found] == [650, 650]
    assert "w_tiny (|x| = 1e-09) flushes to zero" in found[0][1] and "w_huge (|x| = 1e+06) overflows" in found[1][1]
    assert applies("constant_out_of_range", layer(local_rel_err=1e-4), ctx) == []


def test_compressed_weights_names_the_mode_and_ranks_by_local_error():
    from coreml_lab.compression_report import COLUMNS

    Weight = namedtuple("Weight", COLUMNS)
    w = Weight(**{**dict.fromkeys(COLUMNS, math.nan), "op": "op_1", "weight": "w_palettized",
                  "compression": "palettize 4-bit per_tensor", "mode": "palettize", "nbits": 4,
                  "weight_snr_db": 18.2})
    ctx = Context(TOL, {}, {}, {("CPU_AND_NE", "x"): 0.03}, {"op_1": [w]})
    [(score, reason)] = RULE["compressed_weights"].apply(layer(op_type="linear", inputs="x", local_rel_err=0.12), ctx)
    assert reason == ("compressed weights: palettize 4-bit per_tensor, weight SNR 18 dB, local error 0.12 "
                      "(rel err 0.03 arrives from upstream)")
    assert score == pytest.approx(500 + 10 * math.log10(12))
    # with the precision's share measured (the op re-run with its original weights) the reason says it
    measured = RULE["compressed_weights"].apply(layer(op_type="linear", inputs="x", local_rel_err=0.12), Context(
        TOL, {}, {}, {("CPU_AND_NE", "x"): 0.03}, {"op_1": [w._replace(uncompressed_local_rel_err=0.0004)]}))
    assert "local error 0.12 (0.0004 with its weights uncompressed; rel err 0.03 arrives" in measured[0][1]
    [(worse, _)] = RULE["compressed_weights"].apply(layer(op_type="linear", local_rel_err=0.5), ctx)
    assert worse > score  # the layer whose compression costs more ranks first
    assert 500 < score < worse <= 590  # its band: below flush_to_zero, above local_error
    # not without compressed weights, nor within tolerance
    assert RULE["compressed_weights"].apply(layer(op="op_2", local_rel_err=0.5), ctx) == []
    assert RULE["compressed_weights"].apply(layer(local_rel_err=0.005), ctx) == []
    assert RULE["compressed_weights"].apply(layer(local_rel_err=0.5), context()) == []


def test_local_error_is_capped():
    [(score, reason)] = applies("local_error", layer(local_rel_err=0.1))
    assert score == pytest.approx(110.0) and "the op alone loses 0.1 relative" in reason
    assert applies("local_error", layer(local_rel_err=1e300))[0][0] == 500
    assert applies("local_error", layer(local_rel_err=TOL)) == []


def test_error_growth_is_not_blamed_on_an_op_that_only_inherits():
    ctx = context(rel_err_of={("CPU_AND_NE", "a"): 1e-3, ("CPU_AND_NE", "b"): 2e-3})
    [(score, reason)] = applies("error_growth", layer(rel_err=0.2, inputs="a,b"), ctx)
    assert score == pytest.approx(52.0) and "rel err 0.2 vs 0.002 at its inputs" in reason
    assert applies("error_growth", layer(rel_err=0.015, inputs="a,b"), ctx) == []  # under 10x its inputs'
    assert applies("error_growth", layer(rel_err=0.2, local_rel_err=0.001, inputs="a,b"), ctx) == []
    assert applies("error_growth", layer(rel_err=math.inf, inputs="a,b"), ctx) == []


def test_the_strongest_rule_scores_and_every_rule_is_named_in_the_reason():
    layers = pd.DataFrame([layer(nonfinite_onset=True, nonfinite_frac=1.0, local_rel_err=0.1, index=3)._asdict(),
                           layer(op="op_2", output="v2", reference="v2", local_rel_err=0.1, index=4)._asdict(),
                           layer(op="op_3", output="v3", reference="v3", index=5)._asdict()])
    table = culprits(layers, None, n=10, tolerance=TOL)
    assert list(table.op) == ["op_1", "op_2"] and list(table.score) == [1100, 110]
    assert table.reason[0].startswith("non-finite values start here") and "the op alone loses" in table.reason[0]
