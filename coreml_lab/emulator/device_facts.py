"""Device facts: the published measurements behind the profiles, each with its source and outcome.

Every Neural Engine (and CPU/GPU) measurement from ``/work/shared/reference/neural_engine_facts.md``
(the ane-guide numerics chapter, ANEForge, hollance, coremltools issues) is a :class:`Fact` in
:data:`FACTS`: its source (a key of :data:`SOURCES`), the chips it was measured on, how the profiles
of :mod:`.profiles` encode it (a precision, a device rule, plain FP16 behaviour) or why it is left
out, and the test that reproduces it. :func:`facts_for` and :func:`provenance` say which facts a
profile claims.
"""

from __future__ import annotations

from dataclasses import dataclass

from .profiles import DEFAULT_NE_GENERATION, NE_GENERATIONS, DeviceProfile, profile_label

SOURCES = {
    "AG": "ane-guide (github.com/sbryngelson/ane-guide), part-1-machine/03-numerics.md",
    "AF": "ANEForge, docs/numeric-cliffs.md and bench/results/",
    "HN": "hollance/neural-engine, docs/16-bit.md",
    "TE": "coremltools guide, Typed Execution",
    "CT#2687": "apple/coremltools issue 2687", "CT#2690": "apple/coremltools issue 2690",
    "CT#2726": "apple/coremltools issue 2726", "CT#2728": "apple/coremltools issue 2728",
    "CT#2359": "apple/coremltools issue 2359", "cactus#734": "cactus-compute/cactus PR 734",
    "coreai-torch#51": "apple/coreai-torch issue 51", "P2": "seed field report, pitfall P2 in design.md",
}


@dataclass(frozen=True)
class Fact:
    """One published device measurement and what the profiles do with it.

    ``encoded`` says how: ``"rule:<name>"`` (a device rule in NE_RULES / HAZARDS), ``"precision"``
    (a Precision of the device), ``"fp16"`` (follows from FP16 storage / arithmetic alone), or
    ``""`` when the fact is deliberately left out (``left_out`` then says why). ``test`` names
    the test that reproduces it.
    """

    key: str
    statement: str
    source: str
    chips: str
    device: str = "NE"
    encoded: str = ""
    generations: tuple = ("M1", "M5")
    test: str = ""
    left_out: str = ""


_T = "tests/emulator/test_device_facts.py::"

FACTS = (
    # datapath and accumulation
    Fact("fp16_datapath", "Inputs, weights and outputs are FP16; FP32/BF16 annotations do not widen the "
         "arithmetic (an FP32-typed op is barred from the NE and runs on the CPU).", "AG; TE", "M1",
         encoded="precision", test=_T + "test_ne_stores_fp16_between_ops"),
    Fact("wide_accumulator", "Products and sums accumulate in a wide (FP32-class) register fed by FP16-rounded "
         "inputs: 16,000 ones sum to 16,000 (reduce_sum, matmul against ones, avg_pool of 4,096 x 1,000 = 1,000).",
         "AG", "M1", encoded="precision", test=_T + "test_wide_accumulation_sums_16000_ones"),
    Fact("input_tiles_4_lanes", "[4096] + 1024 x [1] returns 5,116; [a, -a, 1] x 16 keeps 16 ones up to a = 4,090 and "
         "exactly 4 from 4,096: the first reduction stage rounds 4-lane tiles to FP16.", "AG", "M1",
         test=_T + "test_wide_accumulation_near_exact_where_tiles_do_not_matter",
         left_out="the published sweep does not pin down the in-tile arithmetic: no model of 4-lane tiles "
                  "(consecutive or strided, sequential / pairwise / exact sums, FP16 or one guard bit) "
                  "reproduces both 5,116 and the survivor counts at 3,000, 4,090 and 4,096, and a per-tile "
                  "pass would slow every dot product; the profile accumulates exactly (5,120 and 16 "
                  "survivors), which differs only in catastrophic cancellation of values above 4,096"),
    Fact("bias_fp16", "Bias may be stored FP32 but is added in the FP16 datapath, after the accumulator "
         "output is rounded.", "AG", "M1", encoded="rule:bias_fp16_add", test=_T + "test_bias_is_added_in_fp16"),
    Fact("compressed_weights_fp16", "Compressed weights (int8 affine, int4 palette, sparse) are expanded to FP16 "
         "before the multiply.", "AG", "M1, A14, M5", encoded="fp16",
         test=_T + "test_compressed_weight_multiplies_as_its_fp16_expansion"),
    Fact("gpu_fp32_arithmetic", "The GPU holds FP16 tensors but computes and accumulates in FP32, unless "
         "allowLowPrecisionAccumulationOnGPU is set (gpu_fp16_accumulation()).", "HN", "-", device="GPU",
         encoded="precision", generations=(), test=_T + "test_gpu_and_cpu_keep_their_documented_behaviour"),
    Fact("cpu_fp32", "The CPU runs FP16-typed ops in FP32 (declared types are a minimum; strict_fp16_cpu() for "
         "FP16 CPU kernels).", "TE; HN", "-", device="CPU", encoded="precision", generations=(),
         test=_T + "test_gpu_and_cpu_keep_their_documented_behaviour"),
    # overflow ceilings
    Fact("mac_ceiling", "The multiply-accumulate output port saturates at 2^15: matmul, linear and convolution with "
         "two or more taps return 32,752 finite and 32,768 as +inf, whatever the number of terms.",
         "AG; AF", "M1, M2 Pro, M5", encoded="rule:mac_ceiling_2p15", test=_T + "test_mac_output_ceiling_2_15"),
    Fact("mac_interior_partial", "An interior partial above 2^15 overflows even if later cancellation would bring "
         "it back.", "AG", "M1", test=_T + "test_mac_output_ceiling_2_15",
         left_out="which partials are interior depends on the engine's undisclosed tiling of each layer; the "
                  "ceiling is applied to the accumulator output, where every measured case shows it"),
    Fact("elementwise_full_range", "Elementwise ops and dedicated reductions keep the full FP16 range (65,504); a "
         "1x1 single-input-channel convolution passes 60,000.", "AG", "M1", encoded="fp16",
         test=_T + "test_elementwise_reduction_and_single_tap_conv_keep_65504"),
    Fact("exp_square_overflow", "exp first returns +inf at 11.094 (ln 65504); square at 256.", "AG", "M1",
         encoded="fp16", test=_T + "test_exp_and_square_overflow_where_fp16_does"),
    Fact("width_slice_gain", "A width-axis slice with a non-zero begin offset applies a gain of 16: up to 4,094 "
         "passes, 4,096 becomes +inf. Other axes unaffected; fixed on A15 and later.", "AG", "M1, A14",
         encoded="rule:width_slice_gain_16", generations=("M1",), test=_T + "test_width_slice_gain_on_m1_only"),
    Fact("softmax_max_shift", "Softmax subtracts the maximum in hardware: softmax([1000, 1, 2, 3]) = [1, 0, 0, 0].",
         "AG", "M1", encoded="precision", test=_T + "test_softmax_is_max_shifted"),
    # special values
    Fact("nan_to_inf", "NaN is coerced to +inf at the input boundary; relu(NaN) = +inf, sigmoid/tanh/erf(NaN) = 1, "
         "exp(NaN) = +inf, a softmax lane holding NaN takes all the mass; the engine never outputs NaN.", "AG",
         "M1", encoded="rule:nan_to_inf_at_input", test=_T + "test_nan_becomes_inf_at_the_ne_input"),
    Fact("indeterminate_zero", "Indeterminate forms return +0: inf - inf, 0 x inf, sqrt(-1), rsqrt(-1), log(-1).",
         "AG", "M1", encoded="rule:indeterminate_to_zero", test=_T + "test_indeterminate_forms_return_plus_zero"),
    Fact("log_zero", "log(+0) returns the finite sentinel -45,440, not -inf.", "AG", "M1",
         encoded="rule:log_zero_sentinel", test=_T + "test_log_of_zero_is_the_sentinel"),
    Fact("softplus_softsign_inf", "softplus(+inf) and softsign(+inf) return +0.", "AG", "M1",
         encoded="rule:softplus_naive_exp", test=_T + "test_softplus_and_softsign_of_inf_are_zero"),
    Fact("denormals", "Denormals survive elementwise ops but are flushed inside the multiply-accumulate on M1; M5 "
         "keeps them.", "AG", "M1, M5", encoded="rule:mac_flush_denormals", generations=("M1",),
         test=_T + "test_denormals_flushed_in_the_mac_on_m1_only"),
    Fact("zero_sign", "The sign of zero is dropped before reciprocal / rsqrt: 1/(-0) = +inf.", "AG", "M1",
         encoded="rule:zero_sign_dropped_before_reciprocal", test=_T + "test_reciprocal_of_negative_zero"),
    Fact("round_half_even", "Output rounding is round-half-to-even on M1 (2,049 at spacing 2 -> 2,048).", "AG", "M1",
         encoded="fp16", test=_T + "test_output_rounding_is_half_to_even"),
    Fact("round_m5", "M5 returned 2,050 for the same case.", "AG", "M5", generations=(),
         left_out="one data point, and the source itself leaves open whether the M5 rounds up or its "
                  "accumulator presents a value just above 2,049; both variants round half to even"),
    Fact("deterministic", "Results are bit-deterministic across runs, recompiles, processes and batch positions.",
         "AG", "M1", encoded="fp16", test=_T + "test_results_are_deterministic_and_batch_independent"),
    # activation tables
    Fact("activation_tables", "sigmoid, tanh, gelu, swish, erf, exp ... are 33-knot piecewise-linear tables in FP16, "
         "clamped outside the table domain.", "AG", "M1", encoded="fp16",
         test=_T + "test_activations_within_published_table_error",
         left_out="the knots are not published; activations are modelled as the exact function rounded to "
                  "FP16, which the source says matches the device to about half an FP16 ulp"),
    Fact("activation_error", "Worst absolute error on device: sigmoid 0.0034, tanh 0.0017, gelu 0.0059; sin/cos/atan "
         "0.04-0.12 near their seams.", "AG", "M1", encoded="fp16",
         test=_T + "test_activations_within_published_table_error",
         left_out="the bounds are kept as data (ACTIVATION_ERROR) for reports; the sin/cos/atan seam errors are "
                  "not modelled because the seam positions are not published"),
    Fact("origin_bias", "Origin bias: gelu(0) = -0.000543, swish(0) = -0.001259.", "AG", "M1",
         left_out="measured at x = 0 only; how the bias varies along the table is not published, and adding it "
                  "elsewhere would invent values. It is below FP16 storage error for |x| > 0.5"),
    Fact("sigmoid_domain", "The sigmoid table domain clamps at [-9.938, +8.320].", "AG", "M1",
         left_out="the same source says a user sigmoid lowers to a wider high-precision table by default, so this "
                  "clamp is not what a converted model sees"),
    # field reports
    Fact("softplus_cliff", "softplus drops to 0 above about 10.4 on the Neural Engine; CPU and GPU are right.",
         "CT#2687", "device (not stated)", encoded="rule:softplus_naive_exp",
         test=_T + "test_softplus_field_cliff_near_10_4"),
    Fact("reduce_lse_channels", "Channel reduce_log_sum_exp collapses near x = 7.63 for 32 channels (no max shift).",
         "CT#2690; CT#2726", "device (not stated)", encoded="rule:reduce_log_sum_exp_no_max_shift",
         test=_T + "test_channel_reduce_log_sum_exp_collapses_near_7_63"),
    Fact("log_softmax", "log_softmax returns -inf in FP16 on the Neural Engine.", "CT#2728", "device (not stated)",
         encoded="rule:log_zero_sentinel", test=_T + "test_log_softmax_tail_collapses",
         left_out="the converter writes log_softmax as softmax + log: the collapse is reproduced, with the "
                  "sentinel -45,440 (AG, direct dispatch) where Core ML reported -inf; "
                  "ne_profile(...).with_device('NE', hazards=...) without log_zero_sentinel gives -inf"),
    Fact("mish_error", "Mish has large FP16 error on the Neural Engine.", "CT#2359", "device (not stated)",
         encoded="rule:softplus_naive_exp", test=_T + "test_mish_collapses_past_the_softplus_cliff"),
    Fact("attention_mask_1e9", "An attention mask of -1e9 overflows FP16 and produces NaN.", "cactus#734",
         "device (not stated)", device="GPU", encoded="fp16", generations=(),
         test=_T + "test_minus_1e9_mask_gives_nan_on_gpu_and_no_nan_on_ne"),
    Fact("mobilenetv3", "MobileNetV3 on the Neural Engine: max abs difference 0.199 (matmul then hardswish).",
         "coreai-torch#51", "device (not stated)", generations=(),
         left_out="needs that exact model and its weights; a figure for one network is not a device property"),
    Fact("p2_classifier", "A classifier with default compute units: mean abs 0.0029, max 0.012 against PyTorch; "
         "CPU_ONLY max 3.2e-7.", "P2", "device (not stated)", encoded="precision",
         test="tests/emulator/test_pitfalls.py::test_compute_unit_sample_cpu_close_to_torch_ne_further_as_in_field_report"),
)

#: published worst absolute error of the activation tables (AG), for reports: a difference from
#: the emulator's exact-then-FP16 value within this bound is table error, not a finding
ACTIVATION_ERROR = {"sigmoid": 0.0034, "tanh": 0.0017, "gelu": 0.0059}


def facts_for(profile: DeviceProfile) -> list[Fact]:
    """The facts a profile encodes (its devices and, for the NE, its generation)."""
    names = {d.name for d in profile.devices}
    out = []
    for f in FACTS:
        if not f.encoded or f.device not in names:
            continue
        if f.device == "NE" and f.generations and profile.variant not in f.generations:
            continue
        if f.encoded.startswith("rule:"):
            rule = f.encoded[5:]
            if not any(rule in d.hazards for d in profile.devices if d.name == f.device):
                continue
        out.append(f)
    return out


def provenance(profile: DeviceProfile) -> dict:
    """What a report's environment shows about a profile: name, variant, chips, facts with sources."""
    gen = NE_GENERATIONS.get(profile.variant)
    return {
        "profile": profile_label(profile),
        "compute_unit": profile.compute_unit,
        "variant": profile.variant or None,
        "chip_generation": gen.chips if gen else None,
        "default_variant": profile.variant == DEFAULT_NE_GENERATION if gen else None,
        "devices": [d.name for d in profile.devices],
        "rules": sorted({r for d in profile.devices for r in d.hazards}),
        "facts": [{"fact": f.key, "statement": f.statement, "source": f.source, "chips": f.chips}
                  for f in facts_for(profile)],
    }


__all__ = ["Fact", "FACTS", "SOURCES", "ACTIVATION_ERROR", "facts_for", "provenance"]
