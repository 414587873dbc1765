"""The Neural Engine of each chip generation: its precision, the ops it leaves to others, the rules it applies.

Calibrated to device measurements (``/work/shared/reference/neural_engine_facts.md``: the
ane-guide numerics chapter, ANEForge, hollance; each a ``Fact`` of :mod:`.device_facts`).
Every generation shares :data:`NE_PRECISION` and :data:`NE_COMMON_RULES`; a
:class:`NEGeneration` adds its own rules. :data:`NE` is the default generation's device,
:func:`ne_device` any generation's; ``profiles.ne_profile(chip)`` makes the profiles around it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .device import FP16, FP32, Device, Precision
from .device_rules import HAZARDS

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


def ne_device(generation: NEGeneration) -> Device:
    """The Neural Engine device of one chip generation: shared precision and rules, plus its own."""
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


NE = ne_device(NE_GENERATIONS[DEFAULT_NE_GENERATION])


def ne_generation(chip: str) -> NEGeneration:
    """The generation a chip name (``"M1"``, ``"A14"``, ``"M5"``, ``"A17"`` ...) belongs to."""
    key = str(chip).strip().upper()
    for gen in NE_GENERATIONS.values():
        if key in (a.upper() for a in gen.aliases):
            return gen
    names = sorted({a for g in NE_GENERATIONS.values() for a in g.aliases})
    raise ValueError(f"unknown Neural Engine chip {chip!r}; expected one of {names}")
