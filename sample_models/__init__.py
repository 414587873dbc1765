"""Small models that reproduce each known Core ML conversion pitfall.

Every module has ``build()`` returning ``(model, example_inputs, description)``
with fixed seeds, small enough to convert in a few seconds, and a docstring
naming the symptom it shows. :func:`catalog` lists them; :func:`build` builds
one by name. Stateful samples (:data:`STATEFUL`) also have ``step_inputs(n)``:
one input dict per decoding step.
"""

from __future__ import annotations

import importlib

#: name -> module; order is the order notebooks and docs list them.
SAMPLES = (
    "healthy",
    "fp16_overflow",
    "fp16_underflow",
    "spectrogram",
    "cu_classifier",
    "deep_residual",
    "conv_strides",
    "fp16_io",
    "ne_hostile",
    "asr_onnx",
    "transformer_mask",
    "compression_outlier",
)

#: stateful samples (Core ML states, iOS18): decoded step by step, so they are not in the one-call zoo above,
#: whose users (tests, the panel, target matrices) predict once without state
STATEFUL = (
    "kv_decoder",
)


def _module(name: str):
    if name not in SAMPLES + STATEFUL:
        raise KeyError(f"unknown sample {name!r}; expected one of {', '.join(SAMPLES + STATEFUL)}")
    return importlib.import_module(f"{__name__}.{name}")


def catalog(stateful: bool = False) -> list[dict]:
    """One row per sample: name, pitfall id, symptom (first docstring line), description;
    ``stateful=True`` lists the stateful samples (:data:`STATEFUL`) instead."""
    rows = []
    for name in STATEFUL if stateful else SAMPLES:
        mod = _module(name)
        doc = (mod.__doc__ or "").strip()
        rows.append({
            "name": name,
            "pitfall": getattr(mod, "PITFALL", ""),
            "symptom": doc.splitlines()[0] if doc else "",
            "description": doc,
        })
    return rows


def build(name: str, **kwargs):
    """``(model, example_inputs, description)`` of sample ``name``."""
    return _module(name).build(**kwargs)
