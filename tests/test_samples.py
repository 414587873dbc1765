"""The pitfall zoo: deterministic, documented, and each sample shows its symptom in torch terms."""

import importlib

import pytest
import torch

import sample_models


def test_catalog_lists_every_sample_with_a_symptom():
    rows = sample_models.catalog()
    assert [r["name"] for r in rows] == list(sample_models.SAMPLES)
    for r in rows:
        assert len(r["symptom"]) > 20, r["name"]
    assert {"P1", "P2", "P3", "P4", "P5"} <= {r["pitfall"] for r in rows}


@pytest.mark.parametrize("name", sample_models.SAMPLES)
def test_build_is_deterministic_and_runs_in_torch(name):
    m1, x1, d1 = sample_models.build(name)
    m2, x2, d2 = sample_models.build(name)
    assert d1 == d2 and isinstance(d1, str) and d1
    assert all(torch.equal(a, b) for a, b in zip(x1, x2))
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not m1.training
    with torch.no_grad():
        out = m1(*x1)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(o.float()).all() for o in outs), "samples are healthy in FP32 torch"


def test_unknown_sample_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown sample 'nope'; expected one of healthy"):
        sample_models.build("nope")


def test_overflow_sample_really_exceeds_fp16_in_its_named_module():
    model, (frames,), _ = sample_models.build("fp16_overflow")
    module = dict(model.named_modules())[sample_models.fp16_overflow.OVERFLOW_MODULE]
    assert frames.abs().max() < 65504, "the input itself fits FP16"
    seen = {}
    module.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        model(frames)
    assert seen["out"].abs().max() > 65504


def test_underflow_sample_squares_fall_below_fp16_subnormals_in_its_named_module():
    model, (x,), _ = sample_models.build("fp16_underflow")
    assert (x.abs() < 2 ** -14).float().mean() > 0.9, "the signal itself is subnormal in FP16"
    module = dict(model.named_modules())[sample_models.fp16_underflow.UNDERFLOW_MODULE]
    assert ((x * x).abs() < 2 ** -24).all(), "its squares flush to zero in FP16"
    with torch.no_grad():
        y = module(x)
    assert torch.isfinite(y).all() and 0.5 < float(y.pow(2).mean().sqrt()) < 2


def test_classifier_sample_has_a_near_tie():
    model, (x,), _ = sample_models.build("cu_classifier")
    with torch.no_grad():
        top2 = torch.topk(model(x)[0], 2).values
    assert 0 < float(top2[0] - top2[1]) < 5e-3
    assert all(torch.equal(p, p.half().float()) for p in model.parameters()), "weights are FP16-exact"


def test_strides_sample_declares_its_suspect_convs():
    model, _, _ = sample_models.build("conv_strides")
    mods = dict(model.named_modules())
    for path, stride in sample_models.conv_strides.SUSPECT_CONVS:
        assert mods[path].stride == (stride, stride)


def test_bench_sizes_exist():
    for name in ("deep_residual", "transformer_mask"):
        mod = importlib.import_module(f"sample_models.{name}")
        model, inputs, _ = mod.build(size="bench")
        assert sum(p.numel() for p in model.parameters()) > 100_000
        with pytest.raises(ValueError, match="size must be"):
            mod.build(size="huge")
    model, _, _ = sample_models.transformer_mask.build(size="base")  # the bench's size comparison
    assert sum(p.numel() for p in model.parameters()) > 80_000_000
