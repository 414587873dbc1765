"""Where a run happened: OS and version, chip, Python and library versions, runtime, device profiles."""

from __future__ import annotations

import platform

import coremltools as ct
import numpy as np
import torch

from .emulator.device_facts import SOURCES, provenance

#: where every device fact the profiles encode is listed with its source and chips
FACTS_DOC = "docs/device_profiles.md"


def environment(runtime: str, profiles: dict | None = None) -> dict:
    """Where a run happened: OS and version, chip, library versions, runtime (measured or emulated).

    ``profiles`` (label -> DeviceProfile) adds ``"compute_units"``: for each emulated unit the
    profile and variant that modelled it, with the facts it encodes and their sources
    (:func:`.emulator.device_facts.provenance`; plain JSON, so bundles keep it). Core ML runs
    (``runtime="coreml"``) are the device itself and carry no profile.
    """
    mac = platform.mac_ver()[0]
    env = {
        "os": platform.system(), "os_version": mac or platform.release(), "machine": platform.machine(),
        "chip": platform.processor() or platform.machine(), "python": platform.python_version(),
        "coremltools": ct.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "runtime": runtime, "measured": runtime == "coreml",
    }
    if profiles and runtime != "coreml":
        env["compute_units"] = {label: provenance(profile) for label, profile in profiles.items()}
    return env


def profile_lines(env: dict) -> list[str]:
    """One line per emulated unit that has a Neural Engine: the generation that modelled it."""
    lines = []
    for label, prov in (env or {}).get("compute_units", {}).items():
        if prov.get("variant"):
            lines.append(f"{label} modelled as Neural Engine generation {prov['variant']} "
                         f"({str(prov.get('chip_generation')).split(' (')[0]}); facts and sources: {FACTS_DOC}")
    return lines


def facts_rows(env: dict) -> list[dict]:
    """The device facts behind an environment's profiles, once each: fact, source, chips, units."""
    rows: dict = {}
    for label, prov in (env or {}).get("compute_units", {}).items():
        for f in prov.get("facts", []):
            row = rows.setdefault(f["fact"], {"fact": f["fact"], "statement": f["statement"],
                                              "source": _sources(f["source"]), "chips": f["chips"],
                                              "compute_units": []})
            row["compute_units"].append(label)
    return [{**r, "compute_units": ", ".join(r["compute_units"])} for r in rows.values()]


def _sources(keys: str) -> str:
    """A fact's source keys (``"AG; AF"``) spelled out as their publications."""
    return "; ".join(SOURCES.get(k.strip(), k.strip()) for k in keys.split(";"))
