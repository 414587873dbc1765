"""Device profiles are data that follow the design table, and users can override them."""

import pytest
import torch

from coreml_lab.emulator import device_facts, profiles
from coreml_lab.emulator.profiles import FP16, FP32, Precision, get_profile


def test_default_profiles_follow_the_design_table():
    cpu = get_profile("CPU_ONLY")
    assert cpu.place("conv", "conv", True)[0:2] == ("CPU", Precision(FP32, FP32, FP32))
    gpu = get_profile("CPU_AND_GPU")
    assert gpu.place("conv", "conv", True)[0:2] == ("GPU", Precision(FP16, FP32, FP32))
    assert gpu.place("conv", "conv", False)[0:2] == ("GPU", Precision(FP32, FP32, FP32))
    ne = get_profile("CPU_AND_NE")
    dev, prec, hazards = ne.place("softplus", "activation", True)
    assert dev == "NE" and prec.storage == FP16 and prec.compute == FP16 and "softplus_naive_exp" in hazards
    # the Neural Engine is barred from FP32-typed ops: they run on the CPU in FP32
    assert ne.place("conv", "conv", False)[0:2] == ("CPU", Precision(FP32, FP32, FP32))
    # ops the NE does not run fall back
    assert ne.place("while_loop", "control", True)[0] == "CPU"
    all_ = get_profile("ALL")
    assert all_.place("non_maximum_suppression", "tensor", True)[0] == "GPU"
    assert all_.place("conv", "conv", True)[0] == "NE"


def test_accepts_ct_compute_unit_and_names():
    import coremltools as ct
    assert get_profile(ct.ComputeUnit.CPU_AND_NE).compute_unit == "CPU_AND_NE"
    assert get_profile("cpu_and_gpu").compute_unit == "CPU_AND_GPU"
    with pytest.raises(ValueError, match="expected one of"):
        get_profile(3)


def test_variants_and_overrides():
    assert profiles.strict_fp16_cpu().place("add", "elementwise", True)[1] == Precision(FP16, FP16, FP32)
    assert profiles.gpu_fp16_accumulation().place("linear", "linear", True)[1].accumulate == FP16
    assert profiles.ne_fp16_accumulation().place("conv", "conv", True)[1].accumulate == FP16
    custom = get_profile("CPU_AND_GPU").with_device("GPU", fp16={"reduction": Precision(FP16, FP16, FP16)})
    assert custom.place("reduce_sum", "reduction", True)[1].accumulate == FP16
    assert custom.place("add", "elementwise", True)[1].compute == FP32
    no_hazard = get_profile("CPU_AND_NE").with_device("NE", hazards=())
    assert not no_hazard.place("softplus", "activation", True)[2]
    # the defaults are untouched
    assert get_profile("CPU_AND_GPU").place("reduce_sum", "reduction", True)[1].accumulate == FP32


@pytest.mark.parametrize("change, words", [
    ({"fp16": {"convolution": Precision()}}, "unknown op families"),
    ({"hazards": ("made_up",)}, "unknown hazard rules"),
])
def test_bad_overrides_are_rejected(change, words):
    with pytest.raises(ValueError, match=words):
        get_profile("CPU_AND_NE").with_device("NE", **change)
    with pytest.raises(KeyError, match="has no device 'TPU'"):
        get_profile("CPU_AND_NE").with_device("TPU")
    with pytest.raises(ValueError, match="'fp16' or 'fp32'"):
        Precision(storage="bf16")


def test_every_hazard_cites_its_source():
    for rule, text in profiles.HAZARDS.items():
        assert "apple/coremltools#" in text, rule


def test_describe_lists_every_device_family():
    rows = profiles.describe(get_profile("ALL"))
    assert {r["device"] for r in rows} == {"NE", "GPU", "CPU"}
    assert any(r["device"] == "NE" and r["family"] == "conv" and r["accumulate"] == FP32 for r in rows)
    assert torch.float16 == Precision(FP16).storage_dtype


# ----------------------------------------------------------------------------- calibrated NE generations


def test_ne_profile_picks_a_generation_by_chip_name():
    from coreml_lab.emulator import ne_profile

    assert ne_profile() is get_profile("CPU_AND_NE")           # the documented default (A15 and later)
    assert get_profile("CPU_AND_NE").variant == profiles.DEFAULT_NE_GENERATION == "M5"
    m1 = ne_profile("M1")
    assert ne_profile("a14") == m1 and m1.variant == "M1" and m1.compute_unit == "CPU_AND_NE"
    assert {"width_slice_gain_16", "mac_flush_denormals"} <= m1.device("NE").hazards
    assert not {"width_slice_gain_16", "mac_flush_denormals"} & get_profile("CPU_AND_NE").device("NE").hazards
    assert ne_profile("A17") is get_profile("CPU_AND_NE")
    assert ne_profile("M1", "ALL").devices[1].name == "GPU"
    assert profiles.profile_label(m1) != "CPU_AND_NE" and "M1" in profiles.profile_label(m1)
    with pytest.raises(ValueError, match="unknown Neural Engine chip 'M9'; expected one of"):
        ne_profile("M9")
    with pytest.raises(ValueError, match="has no Neural Engine"):
        ne_profile("M1", "CPU_AND_GPU")


def test_every_ne_precision_accumulates_wide():
    # ane-guide: a wide accumulator fed by FP16-rounded inputs for every sum; FP16 storage and arithmetic
    ne = get_profile("CPU_AND_NE")
    for family in profiles.FAMILIES:
        dev, prec, _ = ne.place("x", family, True)
        assert dev == "NE" and prec == Precision(FP16, FP16, FP32), family


def test_every_fact_has_a_source_chips_and_an_outcome():
    keys = set()
    for fact in device_facts.FACTS:
        assert fact.key not in keys
        keys.add(fact.key)
        assert fact.statement and fact.chips and fact.device in ("NE", "GPU", "CPU"), fact.key
        for src in fact.source.split("; "):
            assert src in device_facts.SOURCES, (fact.key, src)
        assert fact.encoded or fact.left_out, fact.key                  # reproduced, or left out with a reason
        if fact.encoded.startswith("rule:"):
            assert fact.encoded[5:] in {**profiles.NE_RULES, **profiles.HAZARDS}, fact.key
    encoded_rules = {f.encoded[5:] for f in device_facts.FACTS if f.encoded.startswith("rule:")}
    assert set(profiles.NE_RULES) | set(profiles.HAZARDS) <= encoded_rules  # no rule without its fact


def test_provenance_names_profile_variant_chips_and_facts():
    from coreml_lab.emulator import ne_profile, provenance

    p = provenance(ne_profile("M1"))
    assert p["variant"] == "M1" and "A14" in p["chip_generation"] and p["default_variant"] is False
    facts = {f["fact"]: f for f in p["facts"]}
    assert facts["width_slice_gain"]["source"] == "AG" and facts["mac_ceiling"]["chips"] == "M1, M2 Pro, M5"
    d = provenance(get_profile("CPU_AND_NE"))
    assert d["profile"] == "CPU_AND_NE" and d["variant"] == "M5" and d["default_variant"] is True
    assert "width_slice_gain" not in {f["fact"] for f in d["facts"]} and "mac_ceiling" in {f["fact"] for f in d["facts"]}
    cpu = provenance(get_profile("CPU_ONLY"))
    assert cpu["variant"] is None and [f["fact"] for f in cpu["facts"]] == ["cpu_fp32"]
    # a rule switched off is no longer claimed
    off = get_profile("CPU_AND_NE").with_device("NE", hazards=get_profile("CPU_AND_NE").device("NE").hazards
                                                - {"log_zero_sentinel"})
    assert "log_zero" not in {f["fact"] for f in provenance(off)["facts"]}


def test_ne_chip_is_one_argument_in_the_cli_and_the_widgets():
    from coreml_lab import cli
    from coreml_lab.emulator import ne_profile
    from coreml_lab.widgets import Lab

    args = cli.build_parser().parse_args(["diagnose", "sample_models.healthy:build", "--ne-chip", "M1"])
    assert args.ne_chip == "M1"
    units = cli._with_ne_chip(args.compute_units.split(","), args.ne_chip)
    assert units[:2] == ["CPU_ONLY", "CPU_AND_GPU"] and units[2] == ne_profile("M1")
    with pytest.raises(cli.UsageError, match="--ne-chip: unknown Neural Engine chip 'Z1'"):
        cli._with_ne_chip(["CPU_AND_NE"], "Z1")
    lab = Lab(sample="healthy")
    lab.compute_units.value = ("CPU_ONLY", "CPU_AND_NE")
    assert lab.selected_units() == ["CPU_ONLY", "CPU_AND_NE"]   # the default generation: plain names
    lab.ne_chip.value = "M1"
    assert lab.selected_units() == ["CPU_ONLY", ne_profile("M1")]
    assert "M1" in dict((v, k) for k, v in lab.ne_chip.options)["M1"]
