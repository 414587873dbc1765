"""Device profiles: how each compute unit holds and computes FP16-typed ops.

A profile is data, not code paths. For every op the interpreter asks the profile
which device runs it (first device in preference order that accepts the op) and
with what :class:`Precision`. Kernels follow that precision and nothing else.

Facts encoded here, with their sources (see also docs/device_profiles.md):

* coremltools guide "Typed Execution": an ML Program's declared types are a
  *minimum* precision; FP32-typed programs run FP32 on CPU and GPU and are barred
  from the Neural Engine.
* hollance/neural-engine, docs/16-bit.md: "On the GPU it uses float16 for the
  weights and the intermediate tensors, but float32 for the calculations"
  (unless ``allowLowPrecisionAccumulationOnGPU``); "The ANE appears to use
  float16 for everything"; the CPU uses float32 (and can also use float16 since
  iOS 14 / macOS 11).
* Neural Engine hazards (naive FP16 formulas inside single ops), field reports
  in apple/coremltools: #2687 softplus drops to 0 near x~10.4, #2690 channel
  reduce_log_sum_exp without max-shift fails near x~7.63, #2728 log_softmax
  gives -inf, #2729 logcumsumexp fails past x~11.09.

* Neural Engine device measurements (``/work/shared/reference/neural_engine_facts.md``:
  the ane-guide numerics chapter, ANEForge, hollance, coremltools issues): every fact is a
  :class:`Fact` in :data:`FACTS` with its source, the chips it was measured on, and how the
  profile encodes it (a precision, a device rule in :data:`NE_RULES`, plain FP16 behaviour)
  or why it is left out. :func:`ne_profile` picks the chip generation; :func:`provenance`
  says which profile, variant and facts a run used.

Uncertain facts are marked ``uncertain`` in :attr:`Device.notes`; every field
can be changed with :meth:`DeviceProfile.with_device`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

FP16 = "fp16"
FP32 = "fp32"

_TORCH = {FP16: torch.float16, FP32: torch.float32}

#: Op families. Kernels register under one; profiles can set precision per family.
FAMILIES = (
    "elementwise",   # unary/binary arithmetic, comparison, logical, cast
    "activation",    # relu, gelu, softplus, softmax ...
    "reduction",     # reduce_*, cumsum, argmax/argmin
    "normalization",  # batch/layer/instance/group/l2 norm, LRN
    "linear",        # linear, matmul, einsum
    "conv",          # conv, conv_transpose
    "pool",          # max/avg/l2 pool
    "resize",        # upsample/resize/crop_resize
    "attention",     # scaled_dot_product_attention
    "recurrent",     # lstm, gru, rnn
    "tensor",        # reshape/transpose/slice/concat/gather/scatter/pad/...
    "control",       # cond, while_loop, select, lists
    "constexpr",     # weight decompression (runs at load time on device)
    "state",         # read_state / coreml_update_state
    "misc",          # random, classify, nms ...
)

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


@dataclass(frozen=True)
class Precision:
    """How one op computes: dtype tensors are held in, arithmetic, and sums.

    ``storage`` applies to tensors the program declares FP16 (FP32-declared tensors
    are always FP32). ``compute`` is the dtype of intermediate arithmetic inside a
    composite op (softmax, layer_norm, gelu ...). ``accumulate`` is the dtype of
    running sums in reductions and dot products.
    """

    storage: str = FP32
    compute: str = FP32
    accumulate: str = FP32

    def __post_init__(self):
        for f in ("storage", "compute", "accumulate"):
            v = getattr(self, f)
            if v not in (FP16, FP32):
                raise ValueError(f"Precision.{f} must be 'fp16' or 'fp32', got {v!r}")

    @property
    def storage_dtype(self) -> torch.dtype:
        return _TORCH[self.storage]

    @property
    def compute_dtype(self) -> torch.dtype:
        return _TORCH[self.compute]

    @property
    def accumulate_dtype(self) -> torch.dtype:
        return _TORCH[self.accumulate]


FP32_EXACT = Precision(FP32, FP32, FP32)


@dataclass(frozen=True)
class Device:
    """One piece of silicon: what it accepts and how it computes FP16-typed ops.

    ``fp16`` maps op family -> Precision (key ``"default"`` for the rest).
    ``runs_fp32_ops``: False for the Neural Engine (barred from FP32-typed ops).
    ``unsupported_ops``: op types this device never runs (they fall to the next device).
    """

    name: str
    fp16: Mapping[str, Precision]
    runs_fp32_ops: bool = True
    unsupported_ops: frozenset = frozenset()
    hazards: frozenset = frozenset()
    notes: tuple = ()

    def precision_for(self, family: str) -> Precision:
        return self.fp16.get(family, self.fp16["default"])

    def accepts(self, op_type: str, is_fp16: bool) -> bool:
        if op_type in self.unsupported_ops:
            return False
        return is_fp16 or self.runs_fp32_ops


@dataclass(frozen=True)
class DeviceProfile:
    """A compute unit: devices in preference order (first that accepts an op runs it)."""

    compute_unit: str
    devices: tuple
    description: str = ""
    #: the Neural Engine chip generation this profile models ("" when it has no NE device)
    variant: str = ""

    def place(self, op_type: str, family: str, is_fp16: bool) -> tuple[str, Precision, frozenset]:
        """(device name, precision, hazard rules) for one op."""
        for dev in self.devices:
            if dev.accepts(op_type, is_fp16):
                prec = dev.precision_for(family) if is_fp16 else FP32_EXACT
                return dev.name, prec, dev.hazards if is_fp16 else frozenset()
        # The last device (CPU) accepts everything; reaching here means a user profile
        # rejected an op everywhere.
        raise ValueError(
            f"profile {self.compute_unit!r}: no device accepts op type {op_type!r}; "
            "the last device must accept every op"
        )

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"profile {self.compute_unit!r} has no device {name!r}; it has "
                       f"{[d.name for d in self.devices]}")

    def with_device(self, name: str, **changes) -> DeviceProfile:
        """A copy where device ``name`` has some fields replaced.

        ``fp16=`` may be a Precision (applies to every family) or a mapping of
        family -> Precision merged over the current one.
        """
        dev = self.device(name)
        if "fp16" in changes:
            new = changes["fp16"]
            if isinstance(new, Precision):
                changes["fp16"] = {"default": new}
            else:
                bad = set(new) - set(FAMILIES) - {"default"}
                if bad:
                    raise ValueError(f"unknown op families {sorted(bad)}; expected some of {FAMILIES}")
                changes["fp16"] = {**dev.fp16, **new}
        if "hazards" in changes:
            known = set(HAZARDS) | set(NE_RULES)
            bad = set(changes["hazards"]) - known
            if bad:
                raise ValueError(f"unknown hazard rules {sorted(bad)}; known: {sorted(known)}")
            changes["hazards"] = frozenset(changes["hazards"])
        new_dev = dataclasses.replace(dev, **changes)
        devices = tuple(new_dev if d.name == name else d for d in self.devices)
        return dataclasses.replace(self, devices=devices, description=self.description + f" (modified {name})")


# ----------------------------------------------------------------------------- devices

CPU = Device(
    name="CPU",
    fp16={"default": Precision(storage=FP32, compute=FP32, accumulate=FP32)},
    notes=(
        "Declared types are a minimum (Typed Execution guide): FP16-typed ops run in FP32.",
        "uncertain: since iOS 14 / macOS 11 some CPU kernels (e.g. conv) can run FP16 "
        "(hollance 16-bit notes); use strict_fp16_cpu() to model that.",
    ),
)

GPU = Device(
    name="GPU",
    fp16={"default": Precision(storage=FP16, compute=FP32, accumulate=FP32)},
    notes=(
        "FP16 weights and intermediate tensors, FP32 arithmetic (hollance 16-bit notes); "
        "allowLowPrecisionAccumulationOnGPU switches sums to FP16: gpu_fp16_accumulation().",
    ),
)

#: Ops that keep work off the Neural Engine (dynamic shapes, control flow,
#: post-processing). uncertain: Apple does not publish the list; these are the op
#: classes field reports and Apple's deployment guidance name.
NE_UNSUPPORTED_OPS = frozenset({
    "cond", "while_loop", "make_list", "list_length", "list_write", "list_read",
    "list_gather", "list_scatter", "non_maximum_suppression", "non_zero", "shape",
    "random_bernoulli", "random_categorical", "random_normal", "random_uniform",
    "argsort", "topk", "gather_nd", "scatter_nd", "classify", "read_state",
    "coreml_update_state", "range_1d",
})

#: every Neural Engine generation: wide (FP32-class) accumulation of FP16-rounded inputs for dot
#: products, reductions, pooling, normalisation and softmax sums; FP16 storage and elementwise
#: arithmetic (AG "Wide accumulator", "fp16 datapath")
_NE_WIDE = Precision(storage=FP16, compute=FP16, accumulate=FP32)
NE_PRECISION = {"default": _NE_WIDE, **{f: _NE_WIDE for f in (
    "activation", "reduction", "normalization", "linear", "conv", "pool", "attention", "recurrent")}}

#: rules every generation shares (measured on M1, the accumulator port ceiling confirmed on M2 Pro and M5)
NE_COMMON_RULES = frozenset({
    "nan_to_inf_at_input", "indeterminate_to_zero", "mac_ceiling_2p15", "bias_fp16_add",
    "log_zero_sentinel", "zero_sign_dropped_before_reciprocal",
})


@dataclass(frozen=True)
class NEGeneration:
    """A Neural Engine chip generation: what sets it apart from the others."""

    name: str            # the variant name reports show
    chips: str           # the chips it covers
    aliases: tuple       # names ne_profile() accepts for it
    rules: frozenset     # NE_RULES specific to the generation (added to NE_COMMON_RULES)
    summary: str


NE_GENERATIONS = {
    "M1": NEGeneration(
        name="M1", chips="M1 and A14 (H13/H14 Neural Engine)",
        aliases=("M1", "A14", "H13", "H14", "M1/A14"),
        rules=frozenset({"width_slice_gain_16", "mac_flush_denormals"}),
        summary="width-slice gain of 16 with a non-zero begin offset; denormals flushed inside the "
                "multiply-accumulate; round half to even",
    ),
    "M5": NEGeneration(
        name="M5", chips="A15 and later, M2 and later (measured on M5; M2-M4 not measured for denormals)",
        aliases=("M5", "A15", "A15+", "A16", "A17", "A18", "M2", "M3", "M4", "A15+/M5"),
        rules=frozenset(),
        summary="no width-slice gain; denormals kept by the multiply-accumulate",
    ),
}

#: What CPU_AND_NE (and ALL) mean without a variant: the A15-and-later generation, i.e. every Mac
#: since M2 and every iPhone since the 13 - the devices an app ships to today. ne_profile("M1")
#: models the M1 / A14 generation.
DEFAULT_NE_GENERATION = "M5"


def _ne_device(generation: NEGeneration) -> Device:
    return Device(
        name="NE",
        fp16=dict(NE_PRECISION),
        runs_fp32_ops=False,
        unsupported_ops=NE_UNSUPPORTED_OPS,
        hazards=frozenset(HAZARDS) | NE_COMMON_RULES | generation.rules,
        notes=(
            f"Neural Engine, {generation.chips}: {generation.summary}.",
            "FP16 storage and elementwise arithmetic; wide (FP32-class) accumulation of FP16 inputs "
            "(ane-guide numerics chapter); barred from FP32-typed ops (Typed Execution guide).",
            "uncertain: which ops fall back off the NE (NE_UNSUPPORTED_OPS).",
        ),
    )


NE = _ne_device(NE_GENERATIONS[DEFAULT_NE_GENERATION])


def _ne_profiles(generation: NEGeneration, ne: Device) -> dict:
    tag = f" ({generation.name} Neural Engine)" if generation.name != DEFAULT_NE_GENERATION else ""
    return {
        "CPU_AND_NE": DeviceProfile("CPU_AND_NE", (ne, CPU),
                                    "Neural Engine: FP16 storage, wide accumulation; FP32 ops on CPU" + tag,
                                    variant=generation.name),
        "ALL": DeviceProfile("ALL", (ne, GPU, CPU), "NE where supported, else GPU, else CPU" + tag,
                             variant=generation.name),
    }


PROFILES = {
    "CPU_ONLY": DeviceProfile("CPU_ONLY", (CPU,), "CPU only: FP32 arithmetic throughout"),
    "CPU_AND_GPU": DeviceProfile("CPU_AND_GPU", (GPU, CPU), "GPU: FP16 storage, FP32 arithmetic"),
    **_ne_profiles(NE_GENERATIONS[DEFAULT_NE_GENERATION], NE),
}
PROFILES = {k: PROFILES[k] for k in ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")}


def ne_generation(chip: str) -> NEGeneration:
    """The generation a chip name (``"M1"``, ``"A14"``, ``"M5"``, ``"A17"`` ...) belongs to."""
    key = str(chip).strip().upper()
    for gen in NE_GENERATIONS.values():
        if key in (a.upper() for a in gen.aliases):
            return gen
    names = sorted({a for g in NE_GENERATIONS.values() for a in g.aliases})
    raise ValueError(f"unknown Neural Engine chip {chip!r}; expected one of {names}")


def ne_profile(chip: str = DEFAULT_NE_GENERATION, compute_unit: str = "CPU_AND_NE") -> DeviceProfile:
    """The ``compute_unit`` profile (``"CPU_AND_NE"`` or ``"ALL"``) with the Neural Engine of ``chip``.

    ``ne_profile("M1")`` models the M1 / A14 generation, ``ne_profile("M5")`` (the default, also
    ``"A15"``, ``"M2"`` ...) the A15-and-later one. Pass the result wherever a compute unit is
    accepted (``EmulatedModel``, ``diagnose(compute_units=...)``).
    """
    gen = ne_generation(chip)
    cu = str(getattr(compute_unit, "name", compute_unit)).upper()
    if cu not in ("CPU_AND_NE", "ALL"):
        raise ValueError(f"ne_profile: compute_unit {compute_unit!r} has no Neural Engine; expected "
                         "'CPU_AND_NE' or 'ALL'")
    if gen.name == DEFAULT_NE_GENERATION:
        return PROFILES[cu]
    return _ne_profiles(gen, _ne_device(gen))[cu]


def get_profile(compute_unit) -> DeviceProfile:
    """The default profile for a compute unit given as ``ct.ComputeUnit``, its name, or a profile."""
    if isinstance(compute_unit, DeviceProfile):
        return compute_unit
    name = getattr(compute_unit, "name", compute_unit)
    if not isinstance(name, str) or name.upper() not in PROFILES:
        raise ValueError(
            f"unknown compute unit {compute_unit!r}; expected one of {list(PROFILES)} "
            "(a coremltools.ComputeUnit, its name, or a DeviceProfile)"
        )
    return PROFILES[name.upper()]


# ----------------------------------------------------------------------------- variants


def strict_fp16_cpu() -> DeviceProfile:
    """CPU_ONLY where FP16-typed ops really run FP16 (storage and arithmetic, FP32 sums)."""
    return dataclasses.replace(PROFILES["CPU_ONLY"].with_device("CPU", fp16=Precision(FP16, FP16, FP32)),
                               description="CPU_ONLY, FP16 CPU kernels")


def gpu_fp16_accumulation() -> DeviceProfile:
    """CPU_AND_GPU with ``allowLowPrecisionAccumulationOnGPU``: FP16 arithmetic and sums."""
    return dataclasses.replace(PROFILES["CPU_AND_GPU"].with_device("GPU", fp16=Precision(FP16, FP16, FP16)),
                               description="CPU_AND_GPU, FP16 accumulation")


def ne_fp16_accumulation() -> DeviceProfile:
    """CPU_AND_NE assuming the NE also accumulates dot products in FP16 (worst case)."""
    return dataclasses.replace(PROFILES["CPU_AND_NE"].with_device("NE", fp16=Precision(FP16, FP16, FP16)),
                               description="CPU_AND_NE, FP16 accumulation")


def profile_label(profile: DeviceProfile) -> str:
    """How reports name a profile: the compute unit for its default profile, else the description."""
    if PROFILES.get(profile.compute_unit) == profile:
        return profile.compute_unit
    return profile.description or f"{profile.compute_unit} (modified)"


# ----------------------------------------------------------------------------- facts

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


def describe(profile: DeviceProfile) -> list[dict]:
    """Rows describing a profile (for docs and notebooks): device, family, precision."""
    rows = []
    for dev in profile.devices:
        fams = ["default"] + [f for f in FAMILIES if f in dev.fp16]
        for fam in fams:
            p = dev.precision_for(fam)
            rows.append({
                "compute_unit": profile.compute_unit, "device": dev.name, "family": fam,
                "storage": p.storage, "compute": p.compute, "accumulate": p.accumulate,
                "runs_fp32_ops": dev.runs_fp32_ops,
                "hazards": ", ".join(sorted(h for h in dev.hazards if h in HAZARDS)),
                "rules": ", ".join(sorted(h for h in dev.hazards if h in NE_RULES)),
            })
    return rows


# ----------------------------------------------------------------------------- the exact reference

#: The exact FP32 reference a diagnosis measures every compute unit against: every op in FP32
#: (FP16-typed tensors held and computed in FP32, FP16 weights widened exactly, a cast to FP16 does
#: not round). Named on its own so that no change to the CPU_ONLY profile (a calibrated CPU with
#: FP16 kernels, say) changes the reference. Weight decompression (``constexpr_*``) gives the
#: weights the package declares, as every device materialises them, widened exactly.
EXACT_FP32 = DeviceProfile(
    "EXACT_FP32",
    (Device(name="FP32", fp16={"default": FP32_EXACT},
            notes=("not a device: the exact FP32 reference every compute unit is measured against",)),),
    "exact FP32 reference: every FP16 tensor and weight widened",
)


__all__ = [
    "Precision", "Device", "DeviceProfile", "PROFILES", "FAMILIES", "HAZARDS", "NE_RULES", "CPU", "GPU", "NE",
    "get_profile", "strict_fp16_cpu", "gpu_fp16_accumulation", "ne_fp16_accumulation", "describe", "profile_label",
    "Fact", "FACTS", "SOURCES", "ACTIVATION_ERROR", "NE_GENERATIONS", "DEFAULT_NE_GENERATION", "ne_profile",
    "ne_generation", "facts_for", "provenance",
    "EXACT_FP32",
]
