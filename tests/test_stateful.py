"""Stateful models: the KV-cache sample, states found from in-place buffer updates, and step-by-step emulation.

The converted decoder runs in the emulator one decoding step at a time with its own
state (``make_state()``), next to torch stepping its own cache; at FP32 both must
agree on every compute unit, and the overflow configuration must go wrong at FP16
only after several steps. A stateful package made with plain coremltools code runs
through the emulator step by step too.
"""

from __future__ import annotations

import coremltools as ct
import numpy as np
import pytest
import torch
from stateful_models import Accumulate, accumulate_package

import coreml_lab as cl
import sample_models
from coreml_lab.emulator import EmulatedModel
from coreml_lab.states import StateError, feature_name, find_updated_buffers
from sample_models import kv_decoder

CUS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")
CACHES = tuple(f"blocks.{i}.attn.{kv}_cache" for i in range(2) for kv in ("k", "v"))
IOS18 = dict(target="iOS18")


def torch_steps(model, steps):
    """Outputs and cache contents after every step, torch stepping its own cache (from empty)."""
    model.reset_cache()
    buffers = dict(model.named_buffers())
    outs, caches = [], []
    with torch.no_grad():
        for feed in steps:
            outs.append(model(feed["token"], feed["pos"]).numpy())
            caches.append({n: buffers[n].float().numpy().copy() for n in CACHES})
    model.reset_cache()
    return outs, caches


def emulated_steps(mlmodel, cu, steps):
    em = EmulatedModel(mlmodel, cu)
    state = em.make_state()
    (name,) = em.output_names
    outs, caches = [], []
    for feed in steps:
        feeds = {k: v.numpy().astype(np.int32) for k, v in feed.items()}
        outs.append(em.predict(feeds, state=state)[name])
        caches.append({n: state.read(feature_name(n)).astype(np.float32) for n in CACHES})
    return outs, caches


def rel_err(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


_CONVERSIONS: dict = {}


def converted(config="healthy", **options):
    key = (config, tuple(sorted(options.items())))
    if key not in _CONVERSIONS:
        model, example, _ = kv_decoder.build(config=config)
        _CONVERSIONS[key] = cl.convert(model, example, cl.ConversionOptions(**{**IOS18, **options}))
    return _CONVERSIONS[key]


# ----------------------------------------------------------------------------- the sample

def test_sample_is_registered_with_a_pitfall_configuration():
    assert "kv_decoder" in sample_models.STATEFUL and "kv_decoder" not in sample_models.SAMPLES
    (row,) = sample_models.catalog(stateful=True)
    assert row["name"] == "kv_decoder" and row["pitfall"] == "P1" and "KV cache" in row["symptom"]
    for config in kv_decoder.CONFIGS:
        m1, x1, d1 = sample_models.build("kv_decoder", config=config)
        m2, x2, d2 = sample_models.build("kv_decoder", config=config)
        assert d1 == d2 and all(torch.equal(a, b) for a, b in zip(x1, x2))
        assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(ValueError, match="config must be one of 'healthy', 'overflow'"):
        kv_decoder.build(config="big")
    with pytest.raises(ValueError, match="between 1 and max_len=16"):
        kv_decoder.step_inputs(17)


def test_overflow_config_denominator_passes_fp16_range_only_after_several_steps():
    """The hand-written softmax's sum over filled slots grows with every step (torch FP32, no Core ML)."""
    model, _, _ = kv_decoder.build(config="overflow")
    attn = dict(model.named_modules())[kv_decoder.OVERFLOW_MODULE]
    sums = []
    real_exp = torch.Tensor.exp

    def spy(t):
        e = real_exp(t)
        sums.append(float(e.sum(-1).max()))
        return e

    with torch.no_grad():
        torch.Tensor.exp = spy
        try:
            outs, _ = torch_steps(model, kv_decoder.step_inputs(16))
        finally:
            torch.Tensor.exp = real_exp
    assert attn.naive_softmax and len(sums) == 16
    assert all(np.isfinite(o).all() for o in outs), "FP32 torch is fine at every step"
    first_over = next(i for i, s in enumerate(sums) if s > 65504)
    assert 6 <= first_over <= 10, sums
    assert all(b > a for a, b in zip(sums, sums[1:])), "each filled slot adds to the sum"


# ----------------------------------------------------------------------------- states found

def test_buffers_updated_in_place_become_states_and_the_model_is_left_as_it_was():
    model, example, _ = kv_decoder.build()
    before = {n: b.clone() for n, b in model.named_buffers()}
    conv = cl.convert(model, example, cl.ConversionOptions(precision="fp32", **IOS18), cache=False)
    states = conv.mlmodel.get_spec().description.state
    assert [s.name for s in states] == [feature_name(n) for n in CACHES]
    assert all(s.type.stateType.arrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
               for s in states)
    assert {"read_state", "coreml_update_state"} <= set(conv.op_types())
    assert any("became Core ML states" in m.text and "blocks.1.attn.v_cache" in m.text for m in conv.messages)
    # the rotary tables are read, never written: they stay constants
    assert "cos" not in {s.name for s in states}
    for n, b in model.named_buffers():
        assert torch.equal(before[n], b), f"{n} was changed by convert()"


def test_finder_sees_in_place_writes_and_reassignments():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("sum", torch.zeros(3))
            self.register_buffer("table", torch.ones(3))
            self.register_buffer("last", torch.zeros(3))

        def forward(self, x):
            self.sum.add_(x)
            self.last = x * 1.0
            return self.sum * self.table

    from coreml_lab.sources import load_source

    model = Mixed()
    source, inputs = load_source(model, (torch.ones(3),))
    found = {u.name: u.how for u in find_updated_buffers(source, inputs.tensors)}
    assert found == {"sum": "in place", "last": "reassigned"}
    assert torch.equal(model.sum, torch.zeros(3)) and torch.equal(model.last, torch.zeros(3))
    conv = cl.convert(model, (torch.ones(3),), cl.ConversionOptions(precision="fp32", **IOS18), cache=False)
    assert [s.name for s in conv.mlmodel.get_spec().description.state] == ["sum"]
    (warn,) = [m for m in conv.messages if "replaces buffer 'last'" in m.text]
    assert warn.explanation is not None and warn.explanation.key == "buffer_reassigned"
    assert torch.equal(model.sum, torch.zeros(3)), "the user's buffer keeps its value"


def test_states_named_explicitly():
    model, example, _ = kv_decoder.build()
    only = ("blocks.0.attn.k_cache", "blocks.0.attn.v_cache")
    conv = cl.convert(model, example, cl.ConversionOptions(precision="fp32", states=only, **IOS18), cache=False)
    assert [s.name for s in conv.mlmodel.get_spec().description.state] == [feature_name(n) for n in only]
    none = cl.convert(model, example, cl.ConversionOptions(precision="fp32", states=(), **IOS18), cache=False)
    assert not none.mlmodel.get_spec().description.state
    assert any("states=()" in m.text for m in none.messages)


def test_bad_states_are_clear_errors():
    model, example, _ = kv_decoder.build()
    with pytest.raises(StateError, match=r"names \['blocks.0.k_cache'\].*buffers are: cos \(16, 8\).*"
                                         r"blocks.0.attn.k_cache \(1, 4, 16, 16\)"):
        cl.convert(model, example, cl.ConversionOptions(states=("blocks.0.k_cache",), **IOS18), cache=False)
    with pytest.raises(ValueError, match="states need convert_to='mlprogram' and target iOS18"):
        cl.ConversionOptions(states=("blocks.0.attn.k_cache",), target="iOS17")
    with pytest.raises(ValueError, match="unique torch buffer names"):
        cl.ConversionOptions(states=("a", "a"), **IOS18)


def test_an_update_a_state_cannot_hold_is_a_clear_error():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

        def forward(self, x):
            self.calls += 1
            return x * 2

    with pytest.raises(StateError, match=r"calls \(\) int64 in place, but Core ML states hold FP16 tensors only.*"
                                         r"states=\(\)"):
        cl.convert(Counter(), (torch.ones(2),), cl.ConversionOptions(**IOS18), cache=False)
    conv = cl.convert(Counter(), (torch.ones(2),), cl.ConversionOptions(states=(), **IOS18), cache=False)
    assert not conv.mlmodel.get_spec().description.state


def test_older_target_converts_without_states_and_says_why():
    model, example, _ = kv_decoder.build()
    conv = cl.convert(model, example, cl.ConversionOptions(precision="fp32"), cache=False)
    assert not conv.mlmodel.get_spec().description.state
    (warn,) = [m for m in conv.messages if "need deployment target iOS18" in m.text]
    assert warn.explanation.key == "states_need_ios18"
    # without state, one prediction is the first step from an empty cache
    out = EmulatedModel(conv.mlmodel).predict({k: v.numpy().astype(np.int32) for k, v in
                                               kv_decoder.step_inputs(1)[0].items()})
    want, _ = torch_steps(model, kv_decoder.step_inputs(1))
    # the frozen cache is an FP16 constant written through an FP16 cast, which the CPU profile may keep wider
    # (declared types are a minimum): FP16-rounding-level differences, not a wrong cache (that would be O(1))
    np.testing.assert_allclose(next(iter(out.values())), want[0], rtol=5e-3, atol=5e-4)


def test_target_matrix_of_a_stateful_model_measures_each_target():
    model, example, _ = kv_decoder.build()
    m = cl.target_matrix(model, example).set_index("target")
    assert m.loc["iOS18", "ok"] and "read_state" in m.loc["iOS18", "op_types"]
    assert m.loc["iOS17", "ok"] and "read_state" not in m.loc["iOS17", "op_types"]
    assert m.max_rel_error.max() < 1e-2, m.max_rel_error


def test_exported_program_with_a_mutated_buffer_steps_with_its_state():
    class Acc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("acc", torch.zeros(2, 3, dtype=torch.float16))

        def forward(self, x):
            self.acc.add_(x.half())
            return self.acc.float() * 2

    ep = torch.export.export(Acc(), (torch.ones(2, 3),))
    conv = cl.convert(ep, (torch.ones(2, 3),), cl.ConversionOptions(precision="fp32", **IOS18), cache=False)
    assert [s.name for s in conv.mlmodel.get_spec().description.state] == ["acc"]
    em = EmulatedModel(conv.mlmodel)
    state = em.make_state()
    got = [next(iter(em.predict({"x": np.full((2, 3), 0.5, np.float32)}, state=state).values())) for _ in range(3)]
    np.testing.assert_array_equal([g[0, 0] for g in got], [1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------- stepping

@pytest.mark.parametrize("cu", CUS)
def test_fp32_program_steps_like_torch_on_every_compute_unit(cu):
    model, _, _ = kv_decoder.build()
    steps = kv_decoder.step_inputs(16)
    want_out, want_cache = torch_steps(model, steps)
    got_out, got_cache = emulated_steps(converted(precision="fp32").mlmodel, cu, steps)
    for i, (g, w) in enumerate(zip(got_out, want_out)):
        assert rel_err(g, w) < 1e-5, f"{cu} step {i}"
        for n in CACHES:
            # the caches hold FP16 values in torch and in the state alike
            np.testing.assert_allclose(got_cache[i][n], want_cache[i][n], rtol=2e-3, atol=1e-6,
                                       err_msg=f"{cu} step {i} {n}")
    assert not np.array_equal(got_cache[-1][CACHES[0]], 0 * got_cache[-1][CACHES[0]]), "the state was written"


@pytest.mark.parametrize("cu", CUS)
def test_fp16_healthy_config_stays_right_at_every_step(cu):
    model, _, _ = kv_decoder.build()
    steps = kv_decoder.step_inputs(16)
    want, _ = torch_steps(model, steps)
    got, _ = emulated_steps(converted(precision="fp16").mlmodel, cu, steps)
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) < 1e-2, errs


def first_bad(errs, tol=1e-2):
    return next((i for i, e in enumerate(errs) if not e < tol), None)


@pytest.mark.parametrize("cu", ["CPU_AND_GPU", "CPU_AND_NE"])
def test_fp16_overflow_config_goes_wrong_after_several_steps_and_the_fix_holds(cu):
    model, _, _ = kv_decoder.build(config="overflow")
    steps = kv_decoder.step_inputs(16)
    want, _ = torch_steps(model, steps)
    got, _ = emulated_steps(converted("overflow", precision="fp16").mlmodel, cu, steps)
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    bad = first_bad(errs)
    assert bad is not None and 6 <= bad <= 10, errs
    assert all(e > 1e-2 for e in errs[bad:]), "once the sum overflows it stays wrong"
    # fix 1: the hand-written softmax's ops in FP32
    fixed = converted("overflow", precision="mixed", fp32_ops=("exp", "reduce_sum", "real_div"))
    got, _ = emulated_steps(fixed.mlmodel, cu, steps)
    assert first_bad([rel_err(g, w) for g, w in zip(got, want)]) is None


# ----------------------------------------------------------------------------- plain coremltools

def test_stateful_package_from_plain_coremltools_steps_in_the_emulator(tmp_path):
    torch.manual_seed(0)
    model = Accumulate().eval()
    example = (torch.randn(1, 1, 4), torch.tensor([0], dtype=torch.int32))
    path = accumulate_package(model, example, tmp_path / "acc.mlpackage", compute_precision=ct.precision.FLOAT32)
    model.k_cache.zero_()
    xs = [torch.randn(1, 1, 4) for _ in range(6)]
    for cu in CUS:
        em = EmulatedModel(str(path), cu)
        assert [s.name for s in em.state_specs] == ["k_cache"]
        state = em.make_state()
        model.k_cache.zero_()
        for i, x in enumerate(xs):
            pos = torch.tensor([i], dtype=torch.int32)
            with torch.no_grad():
                want = model(x, pos).numpy()
            got = next(iter(em.predict({"x": x.numpy(), "pos": pos.numpy()}, state=state).values()))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{cu} step {i}")
            np.testing.assert_array_equal(state.read("k_cache"), model.k_cache.detach().numpy())
