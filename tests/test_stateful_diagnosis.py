"""Multi-step diagnosis: ``diagnose(..., steps=[...])`` on stateful decoders, plain packages and stateless models.

torch steps its own KV cache, every compute unit and the reference program their own
Core ML state; the report has a row per step, unit and output / state / layer, and the
first bad step per unit. The overflow sample's first bad step and layer are found and
the fix is verified the same way.
"""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure
from stateful_models import Accumulate, accumulate_package

import coreml_lab as cl
import sample_models
from coreml_lab.emulator import EmulatedModel
from coreml_lab.states import StepStates
from sample_models import kv_decoder

IOS18 = dict(target="iOS18")
STATES = {f"blocks_{i}_attn_{kv}_cache" for i in range(2) for kv in ("k", "v")}
UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def diagnose_steps(config="healthy", n=12, **options):
    model, example, _ = kv_decoder.build(config=config)
    return model, cl.diagnose(model, example, cl.ConversionOptions(**{**IOS18, **options}),
                              steps=kv_decoder.step_inputs(n), progress=False)


def test_fp32_conversion_stays_at_fp32_noise_at_every_step_and_leaves_the_model_alone():
    model, _, _ = kv_decoder.build()
    before = {n: b.clone() for n, b in model.named_buffers()}
    model, rep = diagnose_steps(n=10, precision="fp32")
    steps = rep.steps
    assert list(steps.columns[:4]) == ["step", "compute_unit", "name", "kind"]
    assert {"max_abs_err", "rel_err", "nonfinite_frac"} <= set(steps.columns)
    assert set(steps["step"]) == set(range(10)) and set(steps["compute_unit"]) == set(UNITS)
    states = steps[steps.kind == "state"]
    assert set(states["name"]) == STATES and len(states) == 10 * len(UNITS) * len(STATES)
    outputs = steps[steps.kind == "output"]
    assert len(outputs) == 10 * len(UNITS) and outputs.rel_err.max() < 1e-5, outputs.rel_err.max()
    assert states.rel_err.max() < 1e-3, "the FP16 caches agree up to an FP16 rounding flip"
    layers = steps[steps.kind == "layer"]
    assert {"blocks.0.attn", "blocks.1.attn"} <= set(layers["name"])
    assert rep.first_bad_step == {cu: None for cu in UNITS}
    assert "First bad step of 10: CPU_ONLY none" in rep.summary()
    for n, b in model.named_buffers():
        assert torch.equal(before[n], b), f"diagnose changed buffer {n}"


def test_healthy_fp16_decoder_is_within_tolerance_at_every_step(tmp_path):
    _, rep = diagnose_steps(n=16)
    assert rep.first_bad_step == {cu: None for cu in UNITS}
    out = rep.steps[rep.steps.kind == "output"]
    assert out.rel_err.max() < 5e-3 and (out.nonfinite_frac == 0).all()
    rep.save(tmp_path / "run.zip")
    back = cl.load_report(tmp_path / "run.zip")
    assert len(back.steps) == len(rep.steps) and back.first_bad_step == rep.first_bad_step
    assert list(back.steps["name"]) == list(rep.steps["name"])


def test_without_steps_each_input_of_a_stateful_model_is_a_first_step():
    model, example, _ = kv_decoder.build()
    rep = cl.diagnose(model, example, cl.ConversionOptions(**IOS18), progress=False)
    assert rep.ok and not len(rep.steps) and rep.first_bad_step == {}
    assert (rep.outputs.rel_err < 5e-3).all()


def test_overflow_config_first_bad_step_and_layer_are_found_and_the_fix_is_verified():
    _, rep = diagnose_steps("overflow", n=12)
    first = rep.first_bad_step
    assert first["CPU_ONLY"] is None, "the CPU computes this FP16 program's sums wider"
    for cu in ("CPU_AND_GPU", "CPU_AND_NE"):
        assert first[cu] is not None and 6 <= first[cu] <= 10, first
    bad = rep.first_bad().set_index("compute_unit")
    assert bad.loc["CPU_AND_GPU", "layer"] == kv_decoder.OVERFLOW_MODULE
    assert bad.loc["CPU_AND_GPU", "kind"] == "output"
    # the steps before the overflow are right, and the caches stay right throughout
    gpu = rep.steps[rep.steps.compute_unit == "CPU_AND_GPU"]
    out = gpu[gpu.kind == "output"].set_index("step").rel_err
    assert out[out.index < first["CPU_AND_GPU"]].max() < 5e-3 and out[first["CPU_AND_GPU"]] > 1e-2
    assert gpu[gpu.kind == "state"].rel_err.max() < 5e-3
    summary = rep.summary()
    assert f"CPU_AND_GPU step {first['CPU_AND_GPU']}" in summary and "'blocks.1.attn'" in summary
    # the fix: the hand-written softmax's ops in FP32
    _, fixed = diagnose_steps("overflow", n=12, precision="mixed", fp32_ops=("exp", "reduce_sum", "real_div"))
    assert fixed.first_bad_step == {cu: None for cu in UNITS}


def test_a_stateless_model_takes_steps_as_ordered_inputs():
    model, (x,), _ = sample_models.build("healthy")
    g = torch.Generator().manual_seed(5)
    steps = [{"image": torch.randn(x.shape, generator=g)} for _ in range(3)]
    rep = cl.diagnose(model, (x,), steps=steps, progress=False)
    assert set(rep.steps["step"]) == {0, 1, 2} and not (rep.steps.kind == "state").any()
    assert (rep.steps.kind == "layer").any() and rep.n_inputs == 3
    assert rep.first_bad_step == {cu: None for cu in UNITS}


def test_steps_that_do_not_match_the_model_are_clear_errors():
    model, example, _ = kv_decoder.build()
    opts = cl.ConversionOptions(**IOS18)
    good = kv_decoder.step_inputs(2)
    with pytest.raises(ValueError, match=r"steps\[1\] has names \['pos', 'tok'\]; the model's inputs are "
                                         r"\['token', 'pos'\] \(shapes \{'token': \(1, 1\), 'pos': \(1,\)\}\)"):
        cl.diagnose(model, example, opts, steps=[good[0], {"tok": good[1]["token"], "pos": good[1]["pos"]}],
                    progress=False)
    with pytest.raises(ValueError, match=r"steps\[1\]: input 'token' has shape \(1, 2\); the model's inputs are "
                                         r"token: int32 \(1, 1\); pos: int32 \(1,\)"):
        cl.diagnose(model, example, opts, steps=[good[0], {"token": torch.tensor([[1, 2]]), "pos": good[1]["pos"]}],
                    progress=False)
    with pytest.raises(ValueError, match="steps must be a non-empty list of input dicts.*token: \\(1, 1\\) int64"):
        cl.diagnose(model, example, opts, steps=[], progress=False)
    with pytest.raises(ValueError, match="either inputs= .* or steps="):
        cl.diagnose(model, example, opts, steps=good, inputs=good, progress=False)


def test_a_state_shape_mismatch_names_the_expected_states():
    model, example, _ = kv_decoder.build()
    conv = cl.convert(model, example, cl.ConversionOptions(precision="fp32", **IOS18))
    ref = EmulatedModel(conv.mlmodel)
    other = kv_decoder.KVDecoder(max_len=8)  # caches of 8 slots where the program holds 16
    with pytest.raises(ValueError, match=r"state shape mismatch: the model's state 'blocks_0_attn_k_cache' holds "
                                         r"\(1, 4, 16, 16\), but torch buffer 'blocks.0.attn.k_cache' is "
                                         r"\(1, 4, 8, 16\)\. The model's states are blocks_0_attn_k_cache"):
        StepStates.of(ref, {"CPU_ONLY": ref}, other, conv)


def test_a_stateful_package_made_with_plain_coremltools_is_diagnosed_step_by_step(tmp_path):
    torch.manual_seed(0)
    model = Accumulate(gain=3.0).eval()
    example = (torch.randn(1, 1, 4), torch.tensor([0], dtype=torch.int32))
    path = accumulate_package(model, example, tmp_path / "acc.mlpackage")
    g = torch.Generator().manual_seed(1)
    steps = [{"x": torch.randn(1, 1, 4, generator=g), "pos": torch.tensor([i], dtype=torch.int32)} for i in range(6)]
    rep = cl.diagnose(str(path), {"x": example[0].numpy(), "pos": example[1].numpy()}, steps=steps, progress=False)
    states = rep.steps[rep.steps.kind == "state"]
    assert set(states["name"]) == {"k_cache"} and len(states) == 6 * len(UNITS)
    assert len(rep.steps[rep.steps.kind == "output"]) == 6 * len(UNITS)
    assert all(v is None or isinstance(v, int) for v in rep.first_bad_step.values())


def test_step_plots():
    _, rep = diagnose_steps("overflow", n=10)
    fig = rep.plot_step_errors()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert "CPU_AND_GPU" in ax.get_title() or "CPU_AND_NE" in ax.get_title()
    assert "blocks.1.attn" in [t.get_text() for t in ax.get_yticklabels()]
    assert any("first bad step" in t.get_text() for t in ax.get_legend().get_texts())
    fig = rep.plot_state_errors()
    assert len(fig.axes) == len(UNITS)
    labels = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert any(lbl.startswith("state blocks_0_attn_k_cache") for lbl in labels)
    empty = cl.diagnose(*sample_models.build("healthy")[:2], progress=False)
    assert "steps=" in empty.plot_step_errors().axes[0].texts[0].get_text()
