"""Device profiles: how each compute unit holds and computes FP16-typed ops (CPU_ONLY ... ALL, variants).

A profile is data, not code paths. For every op the interpreter asks the profile
which device runs it (first device in preference order that accepts the op) and
with what :class:`Precision`. Kernels follow that precision and nothing else.
The profiles are made of :mod:`.device`'s types, the CPU and GPU devices here and the
Neural Engine of :mod:`.neural_engine`, applying the rules of :mod:`.device_rules`; the
names of those modules a profile user needs are re-exported here.

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
  profile encodes it (a precision, a device rule in ``NE_RULES``, plain FP16 behaviour)
  or why it is left out. :func:`ne_profile` picks the chip generation;
  ``device_facts.provenance`` says which profile, variant and facts a run used.

Uncertain facts are marked ``uncertain`` in :attr:`Device.notes`; every field
can be changed with :meth:`DeviceProfile.with_device`.
"""

from __future__ import annotations

import dataclasses

from .device import FAMILIES, FP16, FP32, FP32_EXACT, Device, DeviceProfile, Precision
from .device_rules import HAZARDS, NE_RULES
from .neural_engine import (
    DEFAULT_NE_GENERATION,
    NE,
    NE_GENERATIONS,
    NEGeneration,
    ne_device,
    ne_generation,
)

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
    return _ne_profiles(gen, ne_device(gen))[cu]


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
    "FP16", "FP32", "FP32_EXACT",
    "Precision", "Device", "DeviceProfile", "PROFILES", "FAMILIES", "HAZARDS", "NE_RULES", "CPU", "GPU", "NE",
    "get_profile", "strict_fp16_cpu", "gpu_fp16_accumulation", "ne_fp16_accumulation", "describe", "profile_label",
    "NE_GENERATIONS", "DEFAULT_NE_GENERATION", "ne_profile", "ne_generation", "EXACT_FP32",
]
