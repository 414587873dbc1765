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
  ``Fact`` in :mod:`.device_facts` with its source, the chips it was measured on, and how the
  profile encodes it (a precision, a device rule in :data:`NE_RULES`, plain FP16 behaviour)
  or why it is left out. :func:`ne_profile` picks the chip generation;
  ``device_facts.provenance`` says which profile, variant and facts a run used.

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
    "NE_GENERATIONS", "DEFAULT_NE_GENERATION", "ne_profile", "ne_generation", "EXACT_FP32",
]
