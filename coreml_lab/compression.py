"""Weight compression after conversion: short specs to coremltools configs, and applying them.

A :class:`Compression` is what ``ConversionOptions(compression=...)`` holds: one or more
``coremltools.optimize.coreml.OptimizationConfig`` steps (pruning, palettization, linear
quantization; later steps of a joint form run with ``joint_compression=True``), frozen and
hashable by a deterministic text of the configs' fields (the conversion cache key). It is
built from a coremltools ``OptimizationConfig`` (or a list of them: a joint form) or from a
short spec (:data:`SPEC_FORMS`). :func:`apply` runs coremltools' own compression functions on a
converted model (:mod:`.compressed_weights` describes what a compressed model holds).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import warnings
from enum import Enum

import numpy as np

SPEC_FORMS = ("palettize2", "palettize3", "palettize4", "palettize6", "palettize8",
              "int8-per-channel", "int8-per-tensor", "int4-per-channel", "int4-per-block32",
              "int8-per-block32", "prune50", "prune75",
              "prune50+palettize4", "prune50+int8", "palettize4+int8")
SPEC_HELP = ("'palettizeN' (k-means LUT, N in 1,2,3,4,6,8), 'intN-per-channel' / 'intN-per-tensor' / "
             "'intN-per-blockB' (linear symmetric quantization, N in 4,8), 'pruneP' (magnitude pruning to P% "
             "sparsity), or joint forms joined by '+' (e.g. 'prune50+palettize4', 'prune50+int8', "
             "'palettize4+int8')")

MODES = {"prune": "prune_weights", "palettize": "palettize_weights", "quantize": "linear_quantize_weights"}


class CompressionError(ValueError):
    """A compression spec or config that cannot be applied (unknown form, or rejected for the target)."""


def _cto():
    import coremltools.optimize.coreml as cto

    return cto


# ----------------------------------------------------------------------------- specs and configs

def _parse_step(text: str):
    cto = _cto()
    m = re.fullmatch(r"palettize(\d+)", text)
    if m:
        nbits = int(m.group(1))
        if nbits not in (1, 2, 3, 4, 6, 8):
            raise CompressionError(f"palettization takes 1, 2, 3, 4, 6 or 8 bits, got {text!r}")
        return "palettize", cto.OpPalettizerConfig(mode="kmeans", nbits=nbits)
    m = re.fullmatch(r"int(\d+)(?:-per-(channel|tensor|block(\d+)))?", text)
    if m:
        nbits = int(m.group(1))
        if nbits not in (4, 8):
            raise CompressionError(f"linear quantization takes 4 or 8 bits, got {text!r}")
        granularity = m.group(2) or "channel"
        kw = {}
        if granularity.startswith("block"):
            kw = {"granularity": "per_block", "block_size": int(m.group(3))}
        else:
            kw = {"granularity": "per_" + granularity}
        return "quantize", cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{nbits}", **kw)
    m = re.fullmatch(r"prune(\d+)", text)
    if m:
        pct = int(m.group(1))
        if not 0 < pct < 100:
            raise CompressionError(f"pruning takes a sparsity percentage between 1 and 99, got {text!r}")
        return "prune", cto.OpMagnitudePrunerConfig(target_sparsity=pct / 100)
    raise CompressionError(f"unknown compression spec {text!r}; expected {SPEC_HELP}")


def config_mode(config) -> str:
    """'prune', 'palettize' or 'quantize': which coremltools function an OptimizationConfig is for."""
    cto = _cto()
    if not isinstance(config, cto.OptimizationConfig):
        raise CompressionError(f"compression must be a spec string ({SPEC_HELP}), a coremltools "
                               f"OptimizationConfig or a list of them, got {type(config).__name__}")
    ops = [config.global_config, *config.op_type_configs.values(), *config.op_name_configs.values()]
    for op_config in ops:
        if isinstance(op_config, cto.OpPalettizerConfig):
            return "palettize"
        if isinstance(op_config, cto.OpLinearQuantizerConfig):
            return "quantize"
        if isinstance(op_config, (cto.OpMagnitudePrunerConfig, cto.OpThresholdPrunerConfig)):
            return "prune"
    raise CompressionError("the OptimizationConfig holds no op config (global, op type or op name): "
                           "nothing to compress")


def _plain(value):
    """A JSON-able, deterministic form of a config field value."""
    from coremltools.converters.mil.mil import types

    if isinstance(value, Enum):
        return value.name.lower()
    if isinstance(value, type) and types.is_builtin(value):
        return types.builtin_to_string(value)
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def op_config_fields(op_config) -> dict:
    """The fields of a coremltools op config (attrs class), as plain values."""
    import attrs

    if op_config is None:
        return None
    return {"type": type(op_config).__name__,
            **{f.name: _plain(getattr(op_config, f.name)) for f in attrs.fields(type(op_config))}}


def config_dict(config) -> dict:
    """A deterministic dict form of an OptimizationConfig (coremltools has from_dict, no to_dict)."""
    return {
        "global_config": op_config_fields(config.global_config),
        "op_type_configs": {k: op_config_fields(v) for k, v in sorted(config.op_type_configs.items())},
        "op_name_configs": {k: op_config_fields(v) for k, v in sorted(config.op_name_configs.items())},
    }


class Compression:
    """Frozen, hashable compression steps: ``steps`` = ((mode, OptimizationConfig), ...).

    ``spec`` is the short spec it came from (None for a user's OptimizationConfig).
    """

    __slots__ = ("steps", "spec", "_key")

    def __init__(self, steps, spec: str | None = None):
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "_key", json.dumps([[mode, config_dict(c)] for mode, c in self.steps],
                                                     sort_keys=True))

    def __setattr__(self, name, value):
        raise AttributeError("Compression is frozen")

    def __reduce__(self):  # pickle / deepcopy rebuild it (it is frozen)
        return (Compression, (self.steps, self.spec))

    @property
    def joint(self) -> bool:
        return len(self.steps) > 1

    @property
    def configs(self) -> tuple:
        return tuple(c for _, c in self.steps)

    def key(self) -> str:
        return self._key

    def __eq__(self, other):
        return isinstance(other, Compression) and other._key == self._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return f"Compression({self.spec!r})" if self.spec else f"Compression({self.describe()})"

    def describe(self) -> str:
        return self.spec or "+".join(f"{mode}(config)" for mode, _ in self.steps)

    def without(self, op_names, more_bits=()) -> Compression:
        """The same steps with ``op_name_configs[name] = None`` for every name (left uncompressed),
        and each op in ``more_bits`` compressed at 8 bits (:func:`more_bits_config`)."""
        cto = _cto()
        steps = []
        for mode, c in self.steps:
            names = dict(c.op_name_configs)
            names.update({n: None for n in op_names})
            for n in more_bits:
                names[n] = more_bits_config(names.get(n, c.global_config))
            steps.append((mode, cto.OptimizationConfig(global_config=c.global_config,
                                                       op_type_configs=dict(c.op_type_configs),
                                                       op_name_configs=names)))
        return Compression(steps)

    def only(self, op_name: str, op_type: str) -> Compression:
        """The same steps restricted to one op (what that op gets under the full config)."""
        cto = _cto()
        steps = []
        for mode, c in self.steps:
            if op_name in c.op_name_configs:
                chosen = c.op_name_configs[op_name]
            elif op_type in c.op_type_configs:
                chosen = c.op_type_configs[op_type]
            else:
                chosen = c.global_config
            steps.append((mode, cto.OptimizationConfig(global_config=None, op_name_configs={op_name: chosen})))
        return Compression(steps)


def more_bits_config(op_config):
    """``op_config`` at 8 bits (palettization to 8 bits, 4-bit linear quantization to 8), or None
    when it has no more bits to give (already 8 bits, pruning, custom LUTs)."""
    import attrs
    from coremltools.converters.mil.mil import types

    cto = _cto()
    if isinstance(op_config, cto.OpPalettizerConfig) and op_config.nbits and op_config.nbits < 8:
        return attrs.evolve(op_config, nbits=8)
    if isinstance(op_config, cto.OpLinearQuantizerConfig) and op_config.dtype in (types.int4, types.uint4):
        return attrs.evolve(op_config, dtype="int8" if op_config.dtype == types.int4 else "uint8")
    return None


def as_compression(value) -> Compression | None:
    """None, a spec string, an OptimizationConfig, a list of them (joint), or a Compression."""
    cto = _cto()
    if value is None or isinstance(value, Compression):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            raise CompressionError(f"empty compression spec; expected {SPEC_HELP}")
        steps = [_parse_step(part.strip()) for part in text.split("+")]
        modes = [m for m, _ in steps]
        if len(set(modes)) != len(modes):
            raise CompressionError(f"compression spec {value!r} repeats a mode; expected {SPEC_HELP}")
        # coremltools' joint compression: prune first, then palettize, then quantize
        order = {"prune": 0, "palettize": 1, "quantize": 2}
        steps.sort(key=lambda s: order[s[0]])
        if modes.count("palettize") and modes.count("quantize") and not re.search(r"int\d+-per-", text):
            # coremltools quantizes a palettized weight's LUT jointly only per tensor
            steps = [(m, c if m != "quantize" else _cto().OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype=c.dtype, granularity="per_tensor")) for m, c in steps]
        return Compression([(m, cto.OptimizationConfig(global_config=c)) for m, c in steps], spec=text)
    # a copy: the user's config is neither modified nor able to change the options (and cache key) later
    if isinstance(value, cto.OptimizationConfig):
        return Compression([(config_mode(value), copy.deepcopy(value))])
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, cto.OptimizationConfig) for v in value):
        return Compression([(config_mode(v), copy.deepcopy(v)) for v in value])
    raise CompressionError(f"compression must be a spec string ({SPEC_HELP}), a coremltools OptimizationConfig "
                           f"or a list of them (joint compression), got {value!r}")


# ----------------------------------------------------------------------------- applying

_SINCE = re.compile(r"(?:supported since|at least (?:ct\.target\.)?)\s*(iOS\d+)", re.I)


def apply(mlmodel, compression: Compression, target: str):
    """``mlmodel`` compressed with coremltools' own functions (a new model; the input is kept).

    Raises :class:`CompressionError` naming the minimum deployment target when coremltools
    rejects a step for ``target``, or when coremltools would raise the model's spec version
    (it compresses below iOS16 by upgrading the model to iOS16).
    """
    import coremltools as ct

    cto = _cto()
    before = mlmodel.get_spec().specificationVersion
    out = mlmodel
    for i, (mode, config) in enumerate(compression.steps):
        fn = getattr(cto, MODES[mode])
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*scikit-learn.*")
                out = fn(out, config, joint_compression=i > 0)
        except (ValueError, NotImplementedError) as exc:
            m = _SINCE.search(str(exc))
            if m:
                raise CompressionError(
                    f"compression {compression.describe()!r} needs minimum deployment target {m.group(1)} or later "
                    f"(coremltools: {exc}); got target {target!r}: use ConversionOptions(target="
                    f"{m.group(1)!r}, ...)") from exc
            raise CompressionError(f"coremltools rejected compression {compression.describe()!r} at target "
                                   f"{target!r}: {exc}") from exc
    after = out.get_spec().specificationVersion
    if after > before:
        need = _target_of_spec(after)
        raise CompressionError(
            f"compression {compression.describe()!r} needs minimum deployment target {need} or later "
            f"(coremltools' compressed weights need spec version {after}; {target!r} is spec {before}): "
            f"use ConversionOptions(target={need!r}, ...)")
    del ct
    return out


def _target_of_spec(spec_version: int) -> str:
    import coremltools as ct

    for name, member in ct.target.__members__.items():
        if member.value == spec_version and name.startswith("iOS"):
            return name
    return f"spec {spec_version}"


@functools.lru_cache(maxsize=64)
def check_target(compression: Compression, target: str) -> None:
    """Raise :class:`CompressionError` if coremltools rejects ``compression`` at ``target``.

    Applies it to a tiny probe program converted at that target (a 64x64 linear weight, above
    coremltools' default weight threshold): coremltools' own rule decides, nothing is guessed.
    Only spec-built compressions are probed (a user's config may name ops the probe lacks).
    """
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    if compression.spec is None:
        return
    opset = getattr(ct.target, target)
    w = np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=max(opset, ct.target.iOS15))
    def probe(x):
        return mb.linear(x=x, weight=w)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(probe, convert_to="mlprogram", minimum_deployment_target=opset,
                        compute_precision=ct.precision.FLOAT32)
        apply(ml, compression, target)


__all__ = ["Compression", "CompressionError", "as_compression", "apply", "check_target", "SPEC_FORMS", "config_dict"]
