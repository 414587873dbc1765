"""diagnose(): the numbers every notebook shows, checked on the pitfall samples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import coreml_lab as cl
import sample_models
from coreml_lab import metrics
from coreml_lab.diagnosis import pair_programs
from coreml_lab.report import Report
from coreml_lab.sources import ExampleInputsError

CUS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def diag(name, **kw):
    model, inputs, _ = sample_models.build(name)
    return model, inputs, cl.diagnose(model, inputs, cl.ConversionOptions(**kw.pop("opts", {})), progress=False, **kw)


@pytest.fixture(scope="module")
def overflow():
    return diag("fp16_overflow")


def test_report_frames_have_the_documented_columns(overflow):
    _, _, rep = overflow
    assert list(rep.layers.columns) == Report.LAYER_COLUMNS
    assert list(rep.outputs.columns) == Report.OUTPUT_COLUMNS
    assert list(rep.fp16_range.columns) == Report.RANGE_COLUMNS
    assert list(rep.culprits().columns) == Report.CULPRIT_COLUMNS
    assert set(rep.layers["compute_unit"]) == set(CUS) and set(rep.layers["runtime"]) == {"emulator"}
    assert len(rep.outputs) == 3 and rep.n_inputs == 1
    assert rep.layer_source == "coremltools"


def test_overflow_sample_top_culprit_is_the_module_that_overflows(overflow):
    _, _, rep = overflow
    top = rep.culprits(1).iloc[0]
    assert top.module == sample_models.fp16_overflow.OVERFLOW_MODULE
    assert top.op_type == "mul" and "non-finite values start here" in top.reason
    assert "CPU_AND_GPU" in top.compute_unit and "CPU_AND_NE" in top.compute_unit
    assert "CPU_ONLY" not in top.compute_unit
    onset = rep.first_nonfinite.set_index("compute_unit")
    assert onset.loc["CPU_AND_NE", "module"] == "energy" and "CPU_ONLY" not in onset.index
    out = rep.outputs.set_index("compute_unit")
    assert out.loc["CPU_AND_NE", "nonfinite_frac"] == 1.0 and out.loc["CPU_ONLY", "nonfinite_frac"] == 0.0
    rng = rep.fp16_range[(rep.fp16_range.kind == "activation") & (rep.fp16_range.module == "energy")]
    mul = rng[rng.op_type == "mul"].iloc[0]
    assert mul.overflow_frac > 0.9 and mul.inputs_max_abs < 65504 and mul.max_abs > 65504
    text = rep.summary()
    assert "BROKEN" in text and "'energy'" in text and "precision='fp32'" in text


def test_underflow_sample_flags_flush_to_zero_at_the_square():
    _, _, rep = diag("fp16_underflow")
    rng = rep.fp16_range[(rep.fp16_range.kind == "activation")]
    square = rng[(rng.op_type == "mul") & (rng.module == sample_models.fp16_underflow.UNDERFLOW_MODULE)].iloc[0]
    assert square.flush_frac == 1.0
    signal = rep.fp16_range[rep.fp16_range.kind == "input"].iloc[0]
    assert signal.output == "frames" and signal.subnormal_frac > 0.9, "the quiet signal itself is subnormal"
    weights = rep.fp16_range[rep.fp16_range.kind == "weight"]
    eps = weights[np.isclose(weights.max_abs, 1e-12, rtol=1e-3, atol=0)]
    assert len(eps) == 1 and eps.iloc[0].flush_frac == 1.0 and eps.iloc[0].module == "norm"
    culprits = rep.culprits(5)
    assert set(culprits.module) == {"norm"}
    assert any("flush to zero" in r or "flushes to zero" in r for r in culprits.reason)
    assert (rep.outputs.rel_err > 0.1).all(), "the normalised output is far off"


def test_compute_unit_sample_cpu_close_ne_divergence_grows_with_depth():
    _, _, rep = diag("deep_residual")
    out = rep.outputs.set_index("compute_unit")
    assert out.loc["CPU_ONLY", "max_abs_err"] < 1e-6
    assert out.loc["CPU_AND_NE", "max_abs_err"] > 10 * max(out.loc["CPU_ONLY", "max_abs_err"], 1e-7)
    ne = rep.layers[(rep.layers.compute_unit == "CPU_AND_NE") & rep.layers.module_output.fillna("").str.match(
        r"^blocks\.\d+$")]
    assert len(ne) == 12
    first, last = ne.rel_err.iloc[:4].mean(), ne.rel_err.iloc[-4:].mean()
    assert last > 1.2 * first, (first, last)
    cpu = rep.layers[rep.layers.compute_unit == "CPU_ONLY"]
    assert cpu.rel_err.max() < 1e-6
    assert rep.culprits().empty
    div = rep.divergence
    assert set(div.pair) == {"CPU_ONLY vs CPU_AND_GPU", "CPU_ONLY vs CPU_AND_NE", "CPU_AND_GPU vs CPU_AND_NE"}


def test_classifier_flip_is_reported_with_the_cpu_only_hint():
    _, _, rep = diag("cu_classifier")
    out = rep.outputs.set_index("compute_unit")
    assert out.loc["CPU_ONLY", "top1_agree"] == 1.0 and out.loc["CPU_AND_NE", "top1_agree"] == 0.0
    assert "CPU_ONLY" in rep.summary() and "top-1 class changes" in rep.summary()


def test_healthy_sample_has_no_culprits_above_tolerance():
    _, _, rep = diag("healthy")
    assert rep.culprits().empty
    assert (rep.outputs.rel_err < 1e-2).all() and (rep.outputs.nonfinite_frac == 0).all()
    assert "No op exceeds tolerance" in rep.summary()


def test_discrete_selection_flip_is_blamed_on_topk():
    _, _, rep = diag("ne_hostile")
    top = rep.culprits(1)
    assert len(top) and top.iloc[0].op_type == "topk" and "integer output differs" in top.iloc[0].reason


def test_references_separate_fp32_noise_from_conversion_error():
    _, _, rep = diag("fp16_overflow", golden=True)  # auto skips the FP64 run here: the FP32 program is right
    refs = rep.references.set_index("reference")
    assert refs.loc["torch fp32", "rel_err"] < 1e-5          # ordinary FP32 noise vs the FP64 golden run
    assert refs.loc["fp32 program (emulated, exact)", "rel_err"] < 1e-5
    assert not rep.outputs.golden_rel_err.isna().any()


def test_dataset_statistics_aggregate_over_all_inputs():
    model, inputs, _ = sample_models.build("healthy")
    g = torch.Generator().manual_seed(1)
    data = [{"image": torch.rand(1, 3, 32, 32, generator=g)} for _ in range(3)]
    rep = cl.diagnose(model, inputs, cl.ConversionOptions(), compute_units=("CPU_AND_GPU",), inputs=data,
                      progress=False)
    assert rep.n_inputs == 3
    assert (rep.outputs.elements == 3 * 10).all()
    one = cl.diagnose(model, inputs, cl.ConversionOptions(), compute_units=("CPU_AND_GPU",),
                      inputs=data[:1], progress=False)
    assert rep.outputs.max_abs_err.iloc[0] >= one.outputs.max_abs_err.iloc[0]


def test_translation_error_is_told_apart_from_precision():
    """A deliberately wrong converter translation (registered for this test) is off even at FP32."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    original = _TORCH_OPS_REGISTRY.get_func("hardsigmoid")

    @register_torch_op(override=True)
    def hardsigmoid(context, node):  # wrong on purpose: slope 1/5 instead of 1/6
        x = _get_inputs(context, node, expected=1)[0]
        context.add(mb.sigmoid_hard(x=x, alpha=1.0 / 5, beta=0.5, name=node.name))

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.gate = torch.nn.Hardsigmoid()

        def forward(self, x):
            return self.gate(self.fc(x)) * 2

    try:
        torch.manual_seed(0)
        model = Gate().eval()
        x = torch.randn(4, 8) * 2
        rep = cl.diagnose(model, (x,), cl.ConversionOptions(), progress=False)
    finally:
        _TORCH_OPS_REGISTRY.set_func_by_name(original, "hardsigmoid")
    refs = rep.references.set_index("reference")
    assert refs.loc["fp32 program (emulated, exact)", "rel_err"] > 1e-2
    gate = rep.layers[rep.layers.module_output == "gate"]
    assert len(gate) and (gate.torch_rel_err > 1e-2).all()
    top = rep.culprits(1).iloc[0]
    assert top.module == "gate" and "translation error" in top.reason
    assert "translation error" in rep.summary()


def test_local_error_blames_the_lossy_op_not_the_ones_after_it():
    _, _, rep = diag("fp16_underflow")
    ne = rep.layers[rep.layers.compute_unit == "CPU_AND_NE"].set_index("op_type")
    # the linear head sees a badly normalised input (large accumulated error) but is itself fine
    head = ne.loc["linear"]
    assert head.rel_err > 0.1 and head.local_rel_err < 1e-2
    assert "linear" not in set(rep.culprits(10).op_type)


def test_model_that_fails_to_convert_gives_a_report_with_the_explained_error():
    model, inputs, _ = sample_models.build("fp16_io")
    rep = cl.diagnose(model, inputs, cl.ConversionOptions(target="iOS15"), progress=False)
    assert not rep.ok and rep.layers.empty and rep.outputs.empty
    assert rep.error_explanation.key == "fp16_io_needs_ios16"
    assert "Conversion FAILED" in rep.summary() and "iOS16" in rep.summary()
    assert rep.culprits().empty


def test_bad_inputs_are_clear_errors():
    model, inputs, _ = sample_models.build("healthy")
    with pytest.raises(ExampleInputsError, match="forward"):
        cl.diagnose(model, (torch.rand(1, 4, 32, 32),), progress=False)
    with pytest.raises(ValueError, match="inputs is empty"):
        cl.diagnose(model, inputs, inputs=[], progress=False)
    with pytest.raises(ValueError, match=r"inputs\[0\] has names \['img'\]; the model's inputs are \['image'\]"):
        cl.diagnose(model, inputs, inputs=[{"img": inputs[0]}], progress=False)
    with pytest.raises(ValueError, match="unknown compute unit"):
        cl.diagnose(model, inputs, compute_units=("TPU",), progress=False)
    with pytest.raises(ValueError, match="runtime must be one of"):
        cl.diagnose(model, inputs, runtime="gpu", progress=False)


def test_pairing_matches_ops_renamed_between_fp16_and_fp32_programs():
    model, inputs, _ = sample_models.build("fp16_overflow")
    c16 = cl.convert(model, inputs, cl.ConversionOptions())
    c32 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"))
    pairs = pair_programs(c16.program, c32.program)
    lin16 = [op.outputs[0].name for op in c16.program.functions["main"].operations if op.op_type == "linear"]
    lin32 = [op.outputs[0].name for op in c32.program.functions["main"].operations if op.op_type == "linear"]
    assert [pairs[n] for n in lin16] == lin32 and lin16 != lin32  # renamed, yet paired
    out16 = c16.program.functions["main"].outputs[0].name
    assert pairs[out16] == c32.program.functions["main"].outputs[0].name


# ----------------------------------------------------------------------------- metrics

def test_psnr_does_not_change_with_tensor_shape():
    rng = np.random.default_rng(0)
    r = rng.standard_normal(100)
    a = r + 1e-3 * rng.standard_normal(100)
    small = metrics.compare(a, r)
    big = metrics.compare(np.tile(a, 50), np.tile(r, 50))
    assert small["psnr_db"] == pytest.approx(big["psnr_db"]) and small["snr_db"] == pytest.approx(big["snr_db"])


def test_metric_formulas():
    r = np.array([1.0, -2.0, 4.0])
    a = np.array([1.0, -2.5, 4.0])
    m = metrics.compare(a, r, classifier=False)
    assert m["max_abs_err"] == 0.5 and m["mean_abs_err"] == pytest.approx(0.5 / 3)
    assert m["rel_err"] == pytest.approx(0.5 / 4)
    assert m["snr_db"] == pytest.approx(10 * math.log10(21 / 0.25))
    assert m["psnr_db"] == pytest.approx(10 * math.log10(16 / (0.25 / 3)))
    assert m["cosine"] == pytest.approx(np.dot(a, r) / np.linalg.norm(a) / np.linalg.norm(r))
    nan = metrics.compare(np.array([1.0, np.nan, 4.0]), r, classifier=False)
    assert nan["nonfinite_frac"] == pytest.approx(1 / 3) and nan["max_abs_err"] == math.inf
    assert nan["snr_db"] == -math.inf
    assert metrics.compare(r, r)["snr_db"] == math.inf
    top = metrics.compare(np.array([[0.1, 0.9], [0.6, 0.4]]), np.array([[0.2, 0.8], [0.3, 0.7]]))
    assert top["top1_agree"] == 0.5


def test_fast_torch_statistics_match_the_exact_numpy_path():
    from coreml_lab.fp16 import RangeStats
    g = torch.Generator().manual_seed(0)
    r = torch.randn(70000, generator=g) * 3
    a = (r + torch.randn(70000, generator=g) * 1e-3).half().float()
    a[:5] = r[:5]  # some exact matches
    fast, exact = metrics.ErrorStats(), metrics.ErrorStats()
    fast.add(a, r, classifier=False)
    exact.add(a.numpy(), r.numpy(), classifier=False)
    f, e = fast.result(), exact.result()
    for k in ("max_abs_err", "mean_abs_err", "rel_err", "snr_db", "psnr_db", "cosine"):
        assert f[k] == pytest.approx(e[k], rel=1e-4), k
    hf, he = metrics.ErrorHistogram(), metrics.ErrorHistogram()
    small_a, small_r = a[:60000], r[:60000]
    hf.add(small_a, small_r)
    he.add(small_a.numpy(), small_r.numpy())
    assert hf.to_dict() == he.to_dict()
    x = torch.tensor([0.0, 1e-9, 3e-5, 1.0, 7e4, float("inf")])
    rf, re_ = RangeStats(), RangeStats()
    rf.add(x)
    re_.add(x.numpy())
    assert rf.result() == pytest.approx(re_.result(), nan_ok=True)


def test_large_tensors_measured_chunk_by_chunk_give_the_whole_tensor_statistics(monkeypatch):
    """Above tensor_passes.LARGE elements the statistics go chunk by chunk (no full-size temporaries):
    maxima, counts and the histogram are the same as in one pass, sums equal to FP32 rounding."""
    from coreml_lab import tensor_passes
    from coreml_lab.fp16 import RangeStats
    g = torch.Generator().manual_seed(3)
    r = torch.randn(70001, generator=g) * 3
    r[100:140] = 0.0
    r[-7:] = 1e-6  # subnormal in FP16, in the last chunk only
    a = (r + torch.randn(70001, generator=g) * 1e-2).half()
    b = (r * 1.001).half()

    def measured():
        stats, hist, ranges = metrics.ErrorStats(), metrics.ErrorHistogram(), RangeStats()
        stats.add(a, r, classifier=False, hist=hist)
        ranges.add(r)
        return stats, hist.to_dict(), ranges.result(), metrics.DiffStats.measure(a, b).result()

    whole = measured()
    monkeypatch.setattr(tensor_passes, "LARGE", 1000)
    monkeypatch.setattr(tensor_passes, "CHUNK", 4096 + 11)  # chunks that do not line up with the histogram's stride
    assert len(tensor_passes.chunks(a.numel())) == 18
    chunked = measured()
    for k in ("n", "max_abs", "max_ref", "n_nonfinite"):
        assert getattr(chunked[0], k) == getattr(whole[0], k), k
    for k in ("sum_abs", "sum_sq_err", "sum_sq_ref", "sum_sq_val", "sum_prod"):
        assert getattr(chunked[0], k) == pytest.approx(getattr(whole[0], k), rel=1e-6), k
    assert chunked[1] == whole[1] and sum(whole[1]["counts"]) > 4000
    assert chunked[2] == whole[2] and whole[2]["subnormal_frac"] > 0
    assert chunked[3] == whole[3]
    a[-3] = math.nan  # in the last chunk: the pair is counted, not lost by a running max
    div = metrics.DiffStats.measure(a, b)
    assert div.nonfinite == 1 and math.isfinite(div.max_abs) and div.max_abs > 0


@pytest.mark.parametrize("scale", [3.0, 1e25])  # 1e25: FP32 sums overflow, the float64 path takes over
def test_statistics_with_inf_and_nan_match_the_exact_numpy_path(scale, monkeypatch):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(8, 128, 128, generator=g) * scale
    r.masked_fill_(torch.ones(128, 128, dtype=torch.bool).triu(1), -math.inf)  # a causal attention mask
    a = (r + torch.randn(8, 128, 128, generator=g) * 1e-3 * scale).half() if scale < 1e4 else r * (1 + 1e-6)
    a = a.float()
    a[0, 5, :3] = math.nan  # the result broke where the reference is finite
    a[1, 0, 0] = math.inf
    r[2, 9, 1] = math.nan  # and the reference itself is not finite once
    fast, exact = metrics.ErrorStats(), metrics.ErrorStats()
    hf, he = metrics.ErrorHistogram(), metrics.ErrorHistogram()
    exact._add_exact(a.numpy(), r.numpy(), False, he)
    took_exact = []
    real = metrics.ErrorStats._add_exact
    monkeypatch.setattr(metrics.ErrorStats, "_add_exact", lambda *args: took_exact.append(1) or real(*args))
    fast.add(a, r, classifier=False, hist=hf)
    assert bool(took_exact) == (scale > 1e4)
    assert (fast.n, fast.n_nonfinite, fast.ref_nonfinite) == (exact.n, exact.n_nonfinite, exact.ref_nonfinite) \
        == (a.numel(), 4, 8 * 128 * 127 // 2 + 1)
    for k in ("sum_abs", "max_abs", "sum_sq_err", "sum_sq_ref", "sum_sq_val", "sum_prod", "max_ref"):
        assert getattr(fast, k) == pytest.approx(getattr(exact, k), rel=1e-5), k
    assert hf.to_dict() == he.to_dict()


def test_divergence_and_largest_value_skip_non_finite_elements():
    from coreml_lab.statistics import max_abs_finite as _max_abs

    a = torch.tensor([1.0, -math.inf, 3.0, math.nan, -7.0, 2.0])
    b = torch.tensor([1.5, -math.inf, 3.0, 4.0, 9.0, math.inf]).half()
    div = metrics.DiffStats.measure(a, b)
    # compared where both are finite: |1 - 1.5|, |3 - 3|, |-7 - 9|; two pairs finite on one side only
    assert (div.max_abs, div.max_ref, div.nonfinite, div.n) == (16.0, 9.0, 2, 6)
    assert _max_abs(a) == (7.0, False) and _max_abs(torch.tensor([math.nan, math.inf])) == (0.0, False)
    assert _max_abs(torch.tensor([-2.0, 1.0])) == (2.0, True)


def _frames(rep):
    return {"layers": rep.layers, "outputs": rep.outputs, "divergence": rep.divergence,
            "fp16_range": rep.fp16_range, "references": rep.references, "torch_layers": rep.torch_layers}


@pytest.mark.parametrize("name,precision", [("deep_residual", "fp16"), ("transformer_mask", "fp16"),
                                            ("ne_hostile", "fp16"), ("fp16_overflow", "fp16"),
                                            ("cu_classifier", "fp32")])
def test_computing_shared_steps_once_changes_no_number(name, precision, monkeypatch):
    """Steps several units (or a unit and the reference) compute identically run once: the report
    must be bit for bit the one where every unit runs every step."""
    from coreml_lab.emulator.lockstep import SharedRun

    model, inputs, _ = sample_models.build(name)
    conv = cl.convert(model, inputs, cl.ConversionOptions(precision=precision))
    counts = []
    real_step = SharedRun.step

    def counting_step(self, index, reuse=None):
        out = real_step(self, index, reuse)
        counts.append((self.shared_steps, self.reused_steps))
        return out

    monkeypatch.setattr(SharedRun, "step", counting_step)
    fast = cl.diagnose(conv, progress=False)
    shared, reused = counts[-1]
    slow = cl.diagnose(conv, progress=False, reuse=False)
    assert counts[-1] == (0, 0)
    assert shared + reused > 0  # the fast run really took shortcuts
    for key, frame in _frames(fast).items():
        pd.testing.assert_frame_equal(frame, _frames(slow)[key], check_exact=True, obj=key)
    assert fast.histograms.keys() == slow.histograms.keys()
    for k in fast.histograms:
        assert fast.histograms[k] == slow.histograms[k], k


def test_a_conversion_is_diagnosed_as_made():
    model, inputs, _ = sample_models.build("fp16_overflow")
    opts = cl.ConversionOptions(precision="fp16")
    conv = cl.convert(model, inputs, opts)
    via_model = cl.diagnose(model, inputs, opts, progress=False)
    via_conv = cl.diagnose(conv, progress=False)
    pd.testing.assert_frame_equal(via_model.layers, via_conv.layers)
    assert via_conv.culprits(1).iloc[0].module == sample_models.fp16_overflow.OVERFLOW_MODULE
    with pytest.raises(ValueError, match="diagnoses the conversion as made"):
        cl.diagnose(conv, options=cl.ConversionOptions(precision="fp32"), progress=False)
    with pytest.raises(ValueError, match="own example inputs"):
        cl.diagnose(conv, inputs, progress=False)


def test_torch_pump_hands_module_outputs_to_a_waiting_consumer():
    from coreml_lab.reference import TorchPump

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    x = torch.randn(5, 4)
    seen = []

    def consumer(pump):
        for path in ("2", "0", "missing"):  # out of torch's order, and a module that never runs
            seen.append((path, (yield from pump.take(path))))
        return "done"

    pump = TorchPump(model, [x], {"0", "2"})
    assert pump.run(consumer(pump)) == "done"
    with torch.no_grad():
        want0 = model[0](x)
        want2 = model(x)
    assert [p for p, _ in seen] == ["2", "0", "missing"]
    assert torch.equal(seen[0][1], want2) and torch.equal(seen[1][1], want0) and seen[2][1] is None
    np.testing.assert_array_equal(pump.outputs.outputs[0], want2.numpy())


def test_statistics_with_infinities_match_a_plain_float64_computation():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(4, 64, generator=g) * 10
    r[0, :8] = -3.4e38          # a finite FP32 mask value ...
    a = r.half()                # ... that overflows FP16 to -inf
    a[1, 3] = float("nan")
    r[2, 5] = float("inf")      # a non-finite reference element is not compared
    got = metrics.ErrorStats()
    got.add(a, r, classifier=False)
    res = got.result()
    a64, r64 = a.double().numpy().ravel(), r.double().numpy().ravel()
    ok = np.isfinite(a64) & np.isfinite(r64)
    d = a64[ok] - r64[ok]
    assert res["nonfinite_frac"] == pytest.approx((np.isfinite(r64) & ~np.isfinite(a64)).sum() / r64.size)
    assert res["max_abs_err"] == math.inf  # any non-finite value where the reference is finite
    assert got.max_abs == pytest.approx(np.abs(d).max()) and got.sum_abs == pytest.approx(np.abs(d).sum())
    assert got.sum_prod == pytest.approx((a64[ok] * r64[ok]).sum(), rel=1e-6)  # each tensor's own pass is FP32
    assert got.ref_nonfinite == 1


def test_fp16_range_counts_match_a_brute_force_count():
    from coreml_lab.fp16 import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, RangeStats

    x = torch.tensor([0.0, -0.0, 1e-9, -3e-5, 2e-8, 1.0, -7e4, 1e5, float("inf"), float("nan")] * 3)
    got = RangeStats()
    got.add(x)
    got.add(x[:4].numpy().astype(np.float16))  # FP16 arrays count too
    v = np.concatenate([x.numpy(), x[:4].numpy().astype(np.float16).astype(np.float32)]).astype(np.float64)
    f = v[np.isfinite(v)]
    a = np.abs(f)
    nz = a[a > 0]
    res = got.result()
    n = v.size
    assert res["elements"] == n
    assert res["nonfinite_frac"] == pytest.approx((~np.isfinite(v)).sum() / n)
    assert res["max_abs"] == pytest.approx(a.max())
    assert res["min_abs_nonzero"] == pytest.approx(nz.min(), rel=1e-6)
    assert res["overflow_frac"] == pytest.approx((a > FP16_MAX).sum() / n)
    assert res["subnormal_frac"] == pytest.approx((nz < FP16_MIN_NORMAL).sum() / n)
    assert res["flush_frac"] == pytest.approx((nz < FP16_MIN_SUBNORMAL).sum() / n)


def test_golden_run_makes_fp64_weights_one_module_at_a_time():
    from coreml_lab.reference import double_copy, lazy_double_copy, run_torch

    model, inputs, _ = sample_models.build("transformer_mask")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = lazy_double_copy(model)
    live = []
    for m in twin.modules():
        m.register_forward_hook(lambda mod, i, o: live.append(
            sum(t.numel() for t in twin.parameters() if t.dtype == torch.float64)))
    lazy = run_torch(model, list(inputs), dtype=torch.float64, double_model=twin).outputs[0]
    full = run_torch(model, list(inputs), dtype=torch.float64, double_model=double_copy(model)).outputs[0]
    np.testing.assert_array_equal(lazy, full)
    assert lazy.dtype == np.float64
    total = sum(p.numel() for p in model.parameters())
    assert max(live) < total / 2  # never the whole model in FP64 at once
    assert all(torch.equal(v, model.state_dict()[k]) and v.dtype == model.state_dict()[k].dtype
               for k, v in before.items())  # the user's model is untouched


def test_golden_falls_back_to_a_full_copy_when_a_forward_reads_another_modules_weights():
    class ReadsAcross(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(x @ self.lin.weight.t() + self.lin.bias)

    torch.manual_seed(0)
    model = ReadsAcross().eval()
    rep = cl.diagnose(model, (torch.randn(2, 8),), progress=False, golden=True)
    gold = rep.references.set_index("reference")
    assert np.isfinite(gold.loc["torch fp32", "max_abs_err"]) and gold.loc["torch fp32", "max_abs_err"] < 1e-5
    assert not any("golden run failed" in n for n in rep.notes)


def test_a_forward_running_under_autocast_does_not_change_the_emulated_numbers():
    """The lockstep runs inside torch's forward hooks: the model's own autocast must not reach it."""
    class Autocast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.a(x).float()
            return self.b(torch.relu(h))

    class Plain(Autocast):
        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    auto = Autocast().eval()
    plain = Plain().eval()
    plain.load_state_dict(auto.state_dict())
    x = torch.randn(3, 16)
    conv = cl.convert(plain, (x,), cl.ConversionOptions(precision="fp16"))
    want = cl.diagnose(conv, progress=False).layers
    conv.source.reference = auto  # the same program, checked against the autocast forward
    got = cl.diagnose(conv, progress=False).layers
    cols = ["compute_unit", "output", "max_abs_err", "local_max_abs_err"]
    pd.testing.assert_frame_equal(got[cols], want[cols], check_exact=True)


def test_profile_variants_are_diagnosed_as_given():
    from coreml_lab.emulator import ne_fp16_accumulation

    model, inputs, _ = sample_models.build("deep_residual")
    variant = ne_fp16_accumulation()
    rep = cl.diagnose(model, inputs, compute_units=("CPU_AND_NE", variant), progress=False)
    out = rep.outputs.set_index("compute_unit")
    assert list(out.index) == ["CPU_AND_NE", "CPU_AND_NE, FP16 accumulation"]
    # FP16 sums in every dot product: the variant really ran, and loses more
    assert out.loc["CPU_AND_NE, FP16 accumulation", "max_abs_err"] > 2 * out.loc["CPU_AND_NE", "max_abs_err"]
    assert set(rep.divergence.pair) == {"CPU_AND_NE vs CPU_AND_NE, FP16 accumulation"}
    with pytest.raises(ValueError, match="twice"):
        cl.diagnose(model, inputs, compute_units=("CPU_AND_NE", "CPU_AND_NE"), progress=False)
    with pytest.raises(ValueError, match="variants describe the emulator"):
        cl.diagnose(model, inputs, compute_units=(variant,), runtime="coreml", progress=False)


def test_a_local_rerun_that_fails_is_reported_not_dropped(monkeypatch):
    """An op whose re-run alone fails leaves its local_* columns empty, and the Report says which
    op, on which unit, and why; every other op's local error is unchanged."""
    from coreml_lab.local_error import LocalErrors

    model, inputs, _ = sample_models.build("fp16_overflow")
    conv = cl.convert(model, inputs, cl.ConversionOptions(precision="fp16"))
    units = ("CPU_AND_GPU",)
    before = cl.diagnose(conv, compute_units=units, progress=False)
    measured = before.layers.dropna(subset=["local_rel_err"])
    victim = measured.iloc[len(measured) // 2]
    real = LocalErrors.run_alone

    def failing(self, step, env):
        if step.op.name == victim.op:
            raise RuntimeError("shapes only line up with device values")
        return real(self, step, env)

    monkeypatch.setattr(LocalErrors, "run_alone", failing)
    after = cl.diagnose(conv, compute_units=units, progress=False)
    notes = [n for n in after.notes if repr(victim.op) in n]
    assert len(notes) == 1, after.notes
    assert victim.op_type in notes[0] and "CPU_AND_GPU" in notes[0]
    assert "RuntimeError: shapes only line up with device values" in notes[0]
    assert not [n for n in before.notes if repr(victim.op) in n]
    assert "Note: " + notes[0] in after.summary()
    hit = after.layers.op == victim.op
    assert after.layers[hit].local_rel_err.isna().all()
    pd.testing.assert_series_equal(after.layers[~hit].local_rel_err, before.layers[~hit].local_rel_err)


@pytest.mark.parametrize("b_dtype", [torch.float16, torch.float32])
def test_divergence_of_fp16_values_is_their_exact_fp32_difference(b_dtype):
    """DiffStats subtracts into one FP32 copy (memory): max |a - b| is still the FP32 difference of
    the FP16 values, and a pair with inf on one side only is counted, not measured."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(64, 33, generator=g) * 300).half()
    b = (a.float() + torch.randn(64, 33, generator=g)).to(b_dtype)
    d = metrics.DiffStats.measure(a, b)
    assert d.max_abs == float((a.float() - b.float()).abs().max())
    assert d.max_ref == float(b.float().abs().max()) and d.nonfinite == 0
    a[3, 4] = math.inf
    d = metrics.DiffStats.measure(a.t(), b.t())  # transposed views: the same pairs
    finite = torch.ones_like(a, dtype=torch.bool)
    finite[3, 4] = False
    assert d.nonfinite == 1
    assert d.max_abs == float((a.float() - b.float()).abs()[finite].max())
    assert a.dtype == torch.float16 and math.isinf(float(a[3, 4])), "the values measured are left as they are"
