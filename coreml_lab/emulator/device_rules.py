"""Device rules: the named behaviours a device applies inside an op (FP16 hazards, measured Neural Engine rules).

A :class:`~.device.Device` lists the rules it applies in ``hazards``; kernels and the
interpreter ask ``call.hazard(rule)``. :data:`HAZARDS` are naive FP16 formulas reported through
Core ML, :data:`NE_RULES` Neural Engine behaviours measured on silicon; each text names its
source (``AG`` the ane-guide numerics chapter, ``AF`` ANEForge, ``apple/coremltools#N`` an issue),
and :mod:`.device_facts` lists the facts behind them.
"""

from __future__ import annotations

#: Hazard rules: names of naive FP16 formulas a device uses inside one op.
HAZARDS = {
    "softplus_naive_exp": (
        "softplus computes log(1 + exp(x)) with exp(x) leaving the multiply-accumulate port, which "
        "saturates at 2^15: once exp(x) reaches 32,768 (x >= ln(32768) ~ 10.397) the output collapses "
        "to 0 (apple/coremltools#2687, observed cliff near x~10.4; softplus(+inf) = +0, ane-guide)"
    ),
    "reduce_log_sum_exp_no_max_shift": (
        "reduce_log_sum_exp sums exp(x) without subtracting the max; when the FP16 sum "
        "overflows the output drops to 0 (apple/coremltools#2690, cliff where "
        "C*exp(x) > 65504, e.g. x~7.63 for 32 channels)"
    ),
}

#: Neural Engine device rules measured on silicon (ane-guide "AG", ANEForge "AF"): kernels and the
#: interpreter ask ``call.hazard(rule)`` like for HAZARDS. Each names the fact it encodes.
NE_RULES = {
    "nan_to_inf_at_input": (
        "NaN is coerced to +inf where a value enters the Neural Engine (model inputs and values "
        "from ops on another device); relu(NaN)=+inf, sigmoid/tanh/erf(NaN)=1 (AG)"
    ),
    "indeterminate_to_zero": (
        "indeterminate forms (inf-inf, 0*inf, sqrt(-1), rsqrt(-1), log(-1)) return +0; the engine "
        "never outputs NaN (AG)"
    ),
    "mac_ceiling_2p15": (
        "the multiply-accumulate output port of matmul / linear / convolution with 2 or more taps "
        "saturates at 2^15: 32,752 is the largest finite output, 32,768 returns +inf (AG; AF on "
        "M2 Pro and M5)"
    ),
    "bias_fp16_add": "bias is added to the rounded accumulator output in the FP16 datapath (AG)",
    "log_zero_sentinel": "log(+0) returns the finite sentinel -45,440 instead of -inf (AG)",
    "zero_sign_dropped_before_reciprocal": (
        "the sign of a zero is dropped before reciprocal / rsqrt / division: 1/(-0) = +inf (AG)"
    ),
    "mac_flush_denormals": (
        "FP16 denormal results of the multiply-accumulate are flushed to +0 (AG, M1; M5 keeps them)"
    ),
    "width_slice_gain_16": (
        "a width-axis (last axis) slice with a non-zero begin offset applies a gain of 16 on its way: "
        "values up to 4,094 pass unchanged, 4,096 and above become inf (AG, M1 and A14; fixed on A15 "
        "and later)"
    ),
}
