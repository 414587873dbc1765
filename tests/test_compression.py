"""Compression as conversion options, its description, and the verified compression fix (issue 15)."""

from __future__ import annotations

import math
import warnings

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
import pandas as pd
import pytest
import torch

import coreml_lab as cl
import sample_models
from coreml_lab.compressed_weights import describe
from coreml_lab.compression import CompressionError, as_compression
from coreml_lab.emulator import EmulatedModel

UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


@pytest.fixture(scope="module")
def sample():
    return sample_models.build("compression_outlier")


# ----------------------------------------------------------------------------- options

def test_spec_and_config_are_frozen_hashable_and_keyed():
    a = cl.ConversionOptions(compression="palettize4", target="iOS18")
    b = cl.ConversionOptions(compression=cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4)), target="iOS18")
    assert hash(a) == hash(cl.ConversionOptions(compression="palettize4", target="iOS18"))
    assert a.key() == b.key()  # same coremltools config, same cache key
    assert a.key() != cl.ConversionOptions(compression="palettize6", target="iOS18").key()
    assert a.key() != cl.ConversionOptions(target="iOS18").key()
    with pytest.raises(AttributeError):
        a.compression.spec = "x"
    assert cl.ConversionOptions(**a.to_dict()) == a  # the spec round-trips (report bundles)
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(a)) == a and copy.deepcopy(a) == a
    user = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig())
    c = cl.ConversionOptions(compression=user, target="iOS18")
    key = c.key()
    user.set_global(cto.OpLinearQuantizerConfig(dtype="int4"))  # the user's later edit does not leak in
    assert c.key() == key and c.compression.configs[0] is not user
    joint = cl.ConversionOptions(compression="prune50+palettize4", target="iOS18").compression
    assert [m for m, _ in joint.steps] == ["prune", "palettize"]


@pytest.mark.parametrize("spec,target,need", [("int4-per-block32", "iOS17", "iOS18"), ("prune50+int8", "iOS17", "iOS18"),
                                              ("palettize4", "iOS15", "iOS16"), ("int4-per-channel", "iOS16", "iOS18")])
def test_target_rejected_names_minimum_target(spec, target, need):
    with pytest.raises(CompressionError, match=f"minimum deployment target {need}"):
        cl.ConversionOptions(compression=spec, target=target)


@pytest.mark.parametrize("bad", ["palettize5", "int3", "foo", "prune100", "", 42])
def test_unknown_spec_names_accepted_forms(bad):
    with pytest.raises((CompressionError, ValueError), match="palettize|prune|quantization|compression"):
        cl.ConversionOptions(compression=bad, target="iOS18")
    with pytest.raises(CompressionError, match="expected|takes|must"):
        as_compression(bad)


# ----------------------------------------------------------------------------- convert + describe + emulate

MODES = [("palettize4", "iOS16", "palettize", "constexpr_lut_to_dense"),
         ("palettize4", "iOS18", "palettize", "constexpr_lut_to_dense"),
         ("int8-per-channel", "iOS17", "quantize", "constexpr_affine_dequantize"),
         ("int8-per-tensor", "iOS16", "quantize", "constexpr_affine_dequantize"),
         ("int4-per-block32", "iOS18", "quantize", "constexpr_blockwise_shift_scale"),
         ("prune50", "iOS17", "prune", "constexpr_sparse_to_dense"),
         ("prune50+palettize4", "iOS18", "prune+palettize", "constexpr_lut_to_sparse"),
         ("prune50+int8", "iOS18", "prune+quantize", "constexpr_sparse_blockwise_shift_scale"),
         ("palettize4+int8", "iOS18", "palettize+quantize", "constexpr_blockwise_shift_scale")]


@pytest.mark.parametrize("spec,target,mode,op_type", MODES)
def test_each_mode_converts_describes_and_emulates(sample, spec, target, mode, op_type):
    model, x, _ = sample
    opts = cl.ConversionOptions(compression=spec, target=target)
    conv = cl.convert(model, x, opts)
    plain = cl.convert(model, x, opts.replace(compression=None))
    assert op_type in conv.op_types() and not any(t.startswith("constexpr_") for t in plain.op_types())
    table = describe(conv, plain)
    assert len(table) == 4 and set(table["mode"]) == {mode}  # the four 64x64 blocks (head is below threshold)
    assert list(table.module) == [f"blocks.{i}" for i in range(4)]
    assert (table.weight_snr_db > 5).all() and (table.max_abs_weight_error > 0).all()
    if "prune" in mode:
        assert np.allclose(table.sparsity, 0.5, atol=0.01)
    if spec == "int4-per-block32":
        assert set(table.granularity) == {"per_block"} and set(table.nbits) == {4}
    with torch.no_grad():
        want = model(*x).numpy()
    for unit in UNITS:
        got = next(iter(EmulatedModel(conv.mlmodel, unit).predict({"x": x[0].numpy()}).values()))
        err = np.abs(got - want).max() / np.abs(want).max()
        assert 1e-4 < err < 1.5, (unit, err)  # compressed: not exact, still the same function


def test_outside_package_loads_and_is_described(sample, tmp_path):
    model, x, _ = sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(torch.jit.trace(model, x), inputs=[ct.TensorType(name="x", shape=tuple(x[0].shape))],
                        minimum_deployment_target=ct.target.iOS18)
        pal = cto.palettize_weights(ml, cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=4)))
    pal.save(str(tmp_path / "pal.mlpackage"))
    conv = cl.convert(str(tmp_path / "pal.mlpackage"))
    table = describe(conv, ml)
    assert len(table) == 4 and set(table["mode"]) == {"palettize"} and set(table.nbits) == {4}
    assert table.weight_snr_db.between(10, 40).all()
    assert describe(conv).weight_snr_db.isna().all()  # no original at hand: no weight error, no guess


# ----------------------------------------------------------------------------- sensitivity and fix

@pytest.mark.parametrize("spec,target,tolerance", [("int8-per-channel", "iOS17", 0.02), ("int8-per-tensor", "iOS16", 0.05),
                                                  ("palettize4", "iOS18", 0.4)])
def test_sample_outlier_ranks_first_and_fix_is_verified(sample, spec, target, tolerance):
    model, x, _ = sample
    fix = cl.find_uncompressed_ops(model, x, cl.ConversionOptions(compression=spec, target=target),
                                   tolerance=tolerance, progress=False)
    top = fix.sensitivity.iloc[0]
    assert top["rank"] == 1 and top.module == sample_models.compression_outlier.OUTLIER_LAYER
    touched = fix.ops + fix.more_bits  # uncompressed, or at 8 bits instead where that is enough
    assert fix.found and 1 <= len(touched) <= 2 and top.op in touched
    assert fix.error_before > tolerance >= fix.error_after
    assert fix.conversion.options.compression == as_compression(fix.config)
    # verified: the fix's conversion has those ops uncompressed (or at 8 bits)
    left = describe(fix.conversion)
    assert set(left.op).isdisjoint(fix.ops) and len(left) == 4 - len(fix.ops)
    assert set(left.nbits[left.op.isin(fix.more_bits)]) <= {8}
    fig = fix.plot_sensitivity()
    assert len(fig.axes[0].patches) == 4


def test_fix_prefers_more_bits_where_enough(sample):
    model, x, _ = sample
    fix = cl.find_uncompressed_ops(model, x, cl.ConversionOptions(compression="int4-per-block32", target="iOS18"),
                                   tolerance=0.05, progress=False)
    outlier = fix.sensitivity.op[fix.sensitivity.module == "blocks.2"].iloc[0]
    assert fix.found and fix.ops == (outlier,) and len(fix.more_bits) >= 1
    left = describe(fix.conversion).set_index("op")
    assert (left.loc[list(fix.more_bits), "nbits"] == 8).all() and set(left.nbits) <= {4, 8}
    assert fix.error_after <= 0.05 < fix.error_before
    theirs = describe(run_snippet(fix, model, x)).set_index("op")  # the snippet gives the same bits per op
    assert theirs.nbits.to_dict() == left.nbits.to_dict()


def run_snippet(fix, model, x):
    scope = {"traced_model": torch.jit.trace(model, x),
             "inputs": [ct.TensorType(name="x", shape=tuple(x[0].shape))]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(fix.snippet, scope)
    return scope["mlmodel"]


def test_snippet_reproduces_the_verified_config(sample):
    model, x, _ = sample
    fix = cl.find_uncompressed_ops(model, x, cl.ConversionOptions(compression="int8-per-channel", target="iOS17"),
                                   tolerance=0.02, progress=False)
    scope = {"mlmodel": run_snippet(fix, model, x)}
    mine = next(iter(EmulatedModel(scope["mlmodel"], "CPU_ONLY").predict({"x": x[0].numpy()}).values()))
    kit = next(iter(EmulatedModel(fix.conversion.mlmodel, "CPU_ONLY").predict({"x": x[0].numpy()}).values()))
    # the same ops compressed the same way; outputs equal up to FP16 rounding of the two traces
    theirs, ours = describe(scope["mlmodel"]), describe(fix.conversion)
    assert list(theirs.op) == list(ours.op) and set(theirs.op).isdisjoint(fix.ops)
    assert list(theirs["mode"]) == list(ours["mode"])
    np.testing.assert_allclose(mine.astype(np.float32), kit.astype(np.float32), rtol=0, atol=4e-3)
    assert "op_name_configs" in fix.snippet and all(op in fix.snippet for op in fix.ops)


@pytest.mark.slow
@pytest.mark.parametrize("spec,target", [(m[0], m[1]) for m in MODES if m[0] not in ("int8-per-channel",)])
def test_every_mode_sensitivity_and_fix(sample, spec, target):
    model, x, _ = sample
    fix = cl.find_uncompressed_ops(model, x, cl.ConversionOptions(compression=spec, target=target),
                                   tolerance=0.05, progress=False, time_budget=120)
    assert len(fix.sensitivity) == 4 and fix.sensitivity.error_alone.notna().all()
    assert fix.found, fix.message
    assert fix.error_after <= 0.05 and (fix.error_before > 0.05 or not fix.ops)
    assert math.isfinite(fix.error_uncompressed)


def test_fix_needs_compression():
    with pytest.raises(ValueError, match="compression"):
        cl.find_uncompressed_ops(torch.nn.Linear(4, 4).eval(), (torch.randn(1, 4),), cl.ConversionOptions())


# ----------------------------------------------------------------------------- CLI

def test_cli_compression_diagnose_fix_and_bad_target(capsys):
    from coreml_lab import cli

    model_spec = "sample_models.compression_outlier:build"
    code = cli.main(["diagnose", model_spec, "--compression", "int8-per-channel", "--quiet",
                     "--compute-units", "CPU_ONLY", "--tolerance", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "OK: worst output error" in out
    code = cli.main(["fix", model_spec, "--compression", "int8-per-channel", "--tolerance", "0.02", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "blocks.2" in out and "cto.linear_quantize_weights" in out
    assert cli.main(["diagnose", model_spec, "--compression", "int4-per-block32", "--target", "iOS17"]) == 2
    err = capsys.readouterr().err
    assert "minimum deployment target iOS18" in err and "Traceback" not in err


def test_spent_budget_says_so_and_measures_nothing_it_did_not(sample):
    model, x, _ = sample
    fix = cl.find_uncompressed_ops(model, x, cl.ConversionOptions(compression="int8-per-tensor", target="iOS16"),
                                   tolerance=0.02, time_budget=0, progress=False)
    assert not fix.found and "budget" in fix.message and fix.ops == ()
    assert fix.sensitivity.error_alone.isna().all() and fix.error_before > 0.02


# ----------------------------------------------------------------------------- diagnosis of compressed conversions

@pytest.mark.parametrize("spec,target", [("palettize4", "iOS18"), ("int8-per-tensor", "iOS18")])
def test_diagnosis_blames_the_outlier_layers_compression(sample, spec, target):
    model, x, _ = sample
    report = cl.diagnose(model, x, cl.ConversionOptions(precision="fp16", target=target, compression=spec),
                         progress=False)
    table = report.compression
    assert len(table) == 4 * len(UNITS) and set(table.compute_unit) == set(UNITS)
    cpu = table[table.compute_unit == "CPU_ONLY"].set_index("module")
    assert list(cpu.index) == [f"blocks.{i}" for i in range(4)]
    # weights compared with the uncompressed FP32 reference's: finite SNR, positive error
    assert cpu.weight_snr_db.between(5, 60).all() and (cpu.weight_max_abs_err > 0).all()
    # every compressed layer's local error is measured (the decompressed weight enters the re-run)
    assert cpu.local_rel_err.notna().all() and (cpu.local_rel_err > 1e-3).all()
    assert cpu.local_rel_err.idxmax() == sample_models.compression_outlier.OUTLIER_LAYER
    # compression error separated from precision error: the same ops re-run with their original weights
    assert (table.uncompressed_local_rel_err < 2e-3).all() and (table.local_rel_err > 3 * table.uncompressed_local_rel_err).all()
    assert cpu.loc["blocks.0", "upstream_rel_err"] < 1e-3 < cpu.loc["blocks.3", "upstream_rel_err"]
    # the layer rows of compressed ops carry the mode; the others do not
    layers = report.layers[report.layers.compute_unit == "CPU_ONLY"]
    marked = layers[layers.compression != ""]
    assert set(marked.module) == set(cpu.index) and set(marked.op_type) == {"linear"}
    mode = "palettize 4-bit" if spec == "palettize4" else "quantize 8-bit per_tensor"
    assert all(mode in c for c in marked.compression)
    top = report.culprits(3).iloc[0]
    assert top.module == sample_models.compression_outlier.OUTLIER_LAYER
    assert top.reason.startswith(f"compressed weights: {mode}") and "weight SNR" in top.reason
    assert "with its weights uncompressed" in top.reason
    assert "find_uncompressed_ops" in report.summary()
    fig = report.plot_compression()  # a bar per (layer, unit) of local error, a weight-SNR bar per layer
    assert len(fig.axes[0].patches) == 4 * len(UNITS) and len(fig.axes[1].patches) == 4
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == list(cpu.index)


def test_uncompressed_diagnosis_has_an_empty_compression_table(sample):
    model, x, _ = sample
    report = cl.diagnose(model, x, cl.ConversionOptions(precision="fp16", target="iOS18"), progress=False,
                         compute_units=("CPU_ONLY",))
    assert report.compression.empty and (report.layers.compression == "").all()
    assert not report.culprits()["reason"].str.contains("compressed weights").any()
    assert "no compressed weights" in report.plot_compression().axes[0].texts[0].get_text()


@pytest.mark.slow
@pytest.mark.parametrize("spec,target,mode,op_type", MODES)
def test_every_mode_end_to_end_diagnose_culprits_sensitivity_verified_fix(sample, spec, target, mode, op_type):
    """compress -> diagnose -> culprits -> sensitivity -> fix -> the fix diagnosed again."""
    model, x, _ = sample
    units, tolerance = ("CPU_ONLY", "CPU_AND_NE"), 0.05
    opts = cl.ConversionOptions(precision="fp16", target=target, compression=spec)
    report = cl.diagnose(model, x, opts, compute_units=units, progress=False)
    table = report.compression[report.compression.compute_unit == "CPU_AND_NE"].set_index("module")
    assert len(table) == 4 and set(table["mode"]) == {mode} and op_type in report.layers.op_type.values
    assert table.weight_snr_db.notna().all() and table.local_rel_err.notna().all()
    culprits = report.culprits(4)
    assert culprits.reason.iloc[0].startswith(f"compressed weights: {mode}")
    outlier = sample_models.compression_outlier.OUTLIER_LAYER
    others = table.local_rel_err.drop(outlier).median()
    if "prune" in mode:  # magnitude pruning keeps the outlier channel: blocks.2 is no worse than the rest
        assert table.local_rel_err[outlier] < 2 * others
    else:
        assert culprits.module.iloc[0] == outlier and table.local_rel_err[outlier] > 2 * others
    fix = cl.find_uncompressed_ops(model, x, opts, tolerance=tolerance, compute_units=units, progress=False,
                                   time_budget=120)
    assert fix.found, fix.message
    assert len(fix.sensitivity) == 4 and fix.sensitivity.error_alone.notna().all()
    fixed = cl.diagnose(model, x, opts.replace(compression=fix.config), compute_units=units, progress=False)
    assert fixed.outputs.rel_err.max() <= tolerance < report.outputs.rel_err.max()
    assert set(fixed.compression.op).isdisjoint(fix.ops)


def test_a_saved_compressed_diagnosis_keeps_its_compression_table_and_culprits(sample, tmp_path):
    model, x, _ = sample
    report = cl.diagnose(model, x, cl.ConversionOptions(target="iOS18", compression="int8-per-tensor"),
                         compute_units=("CPU_ONLY",), progress=False)
    back = cl.load_report(report.save(tmp_path / "run.zip"))
    pd_cols = ["op", "module", "compression", "weight_snr_db", "local_rel_err"]
    pd.testing.assert_frame_equal(back.compression[pd_cols].reset_index(drop=True),
                                  report.compression[pd_cols].reset_index(drop=True), check_dtype=False)
    assert back.options.compression == report.options.compression
    assert list(back.culprits(3).reason) == list(report.culprits(3).reason)
    assert back.culprits(1).reason.iloc[0].startswith("compressed weights: quantize 8-bit per_tensor")
    page = back.to_html()  # the shared page shows them too
    assert "<h2>Compressed weights</h2>" in page and "quantize 8-bit per_tensor" in page
    assert "<h2>Compressed weights</h2>" not in cl.diagnose(model, x, compute_units=("CPU_ONLY",),
                                                             progress=False).to_html()
