"""Kernel registry: which MIL op types the emulator can execute, and how.

Kernels register with :func:`kernel`; the interpreter looks them up by op type.
Coverage is compared against coremltools' own op registry (``SSAOpRegistry``)
so the docs table is generated, never hand-kept. The default of an optional input
is what the op's coremltools definition declares for its opset
(:func:`declared_defaults`), never a value restated in a kernel.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .device import FAMILIES

#: Opsets the emulator targets (ML Programs start at iOS15).
OPSETS = ("iOS15", "iOS16", "iOS17", "iOS18")


@dataclass(frozen=True)
class Kernel:
    op_type: str
    family: str
    fn: Callable
    #: ops whose kernels never look at float precision (shape/index plumbing)
    exact: bool = False
    #: precision fields the result can depend on besides the output storage dtype (the default:
    #: all). Lets one computation serve several compute units whose profiles differ elsewhere.
    uses: frozenset = frozenset({"compute", "accumulate", "hazards"})  # = ALL_USES
    #: the compute dtype matters only by rounding wider inputs to it: with every float input
    #: held in FP16, FP16 and FP32 compute give the same result (one torch operation that
    #: computes in float and rounds once to the FP16 output)
    compute_free_on_fp16: bool = False


_KERNELS: dict[str, Kernel] = {}


ALL_USES = frozenset({"compute", "accumulate", "hazards"})


def kernel(*op_types: str, family: str, exact: bool = False, uses=ALL_USES, compute_free_on_fp16: bool = False):
    """Register ``fn(call)`` as the kernel of each op type in ``op_types`` (flags: see :class:`Kernel`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    uses = frozenset(uses)
    if uses - ALL_USES:
        raise ValueError(f"unknown precision fields {sorted(uses - ALL_USES)}; expected some of {sorted(ALL_USES)}")

    def register(fn):
        for op_type in op_types:
            if op_type in _KERNELS and _KERNELS[op_type].fn is not fn:
                raise ValueError(f"two kernels registered for MIL op {op_type!r}")
            _KERNELS[op_type] = Kernel(op_type, family, fn, exact, uses, compute_free_on_fp16)
        return fn

    return register


#: MIL op -> its declared defaults (an op's definition and required inputs never change)
_DEFAULTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def declared_defaults(op) -> dict:
    """Defaults coremltools declares for ``op``'s optional inputs: name -> python / numpy value.

    ``op`` is a MIL operation; it is an instance of the op class registered for its
    function's opset (``ops/defs/iOS15..iOS18``), so ``op.default_inputs()`` is that
    opset's definition (the way ONNX's reference ops read defaults from the schema).
    Some defaults depend on the required inputs (``strides = [1] * spatial rank``,
    ``epsilon`` in ``x``'s dtype), which the op carries.

    An input that a later opset added (``batch_dims``, ``validate_indices``, ``pad_value``
    ...) takes the default of the first later definition that declares it: opsets add
    inputs whose default keeps the earlier behaviour. Inputs declared with a None default
    (``bias``, ``gamma``) are left out: for those, absence has its own meaning.

    The builder and the milproto loader materialise these defaults as constant inputs
    (``Builder._add_op``), so a kernel meets an absent input only in a program from
    another producer, an op made by hand, or where no default is declared.
    """
    try:
        return _DEFAULTS[op]
    except (KeyError, TypeError):
        pass
    found: dict = {}
    own = type(op)
    for cls in _definitions_from(op):
        if cls is own:
            declared = op.default_inputs().items()
        else:
            try:
                declared = cls.default_inputs(_as_instance(op, cls)).items()
            except (AttributeError, TypeError, ValueError):
                # a later definition whose defaults need inputs this op does not have
                continue
        for name, value in declared:
            if value is None or name in found or cls is not own and name in own.input_spec.input_types:
                continue
            if isinstance(value, range):
                value = list(value)
            elif isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
                value = value.item()
            found[name] = value
    try:
        _DEFAULTS[op] = found
    except TypeError:  # an op that cannot be weakly referenced: not cached
        pass
    return found


def declared_default(op, name: str):
    """The default coremltools declares for input ``name`` of ``op``, or None (see :func:`declared_defaults`)."""
    return declared_defaults(op).get(name)


def _definitions_from(op) -> list:
    """The op's own definition class, then those of later opsets (earliest first)."""
    own = type(op)
    if not hasattr(own, "default_inputs") or not hasattr(own, "input_spec"):
        return []
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    versions = sorted(SSAOpRegistry.core_ops.get(getattr(op, "op_type", None), {}).items())
    own_version = next((v for v, cls in versions if cls is own), None)
    if own_version is None:
        return [own]
    later = []
    for v, cls in versions:
        if v > own_version and cls is not own and cls not in later:
            later.append(cls)
    return [own] + later


def _as_instance(op, cls):
    """A bare ``cls`` object holding ``op``'s inputs: a later opset's definition judging this op."""
    obj = cls.__new__(cls)
    for name in cls.input_spec.input_types:
        setattr(obj, name, getattr(op, name, None))
    return obj


def _load_kernels() -> None:
    from . import ops  # noqa: F401  (importing registers every op family)


def lookup(op_type: str) -> Kernel | None:
    _load_kernels()
    return _KERNELS.get(op_type)


def supported_ops() -> list[str]:
    """Sorted MIL op types the emulator executes (``const`` included)."""
    _load_kernels()
    return sorted(set(_KERNELS) | {"const"})


def coremltools_ops() -> dict[str, set[str]]:
    """MIL op type -> opset names (iOS15..iOS18) where coremltools defines it."""
    from coremltools.converters.mil._deployment_compatibility import AvailableTarget
    from coremltools.converters.mil.mil.ops import defs  # noqa: F401 (registers ops)
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    order = {name: getattr(AvailableTarget, name) for name in OPSETS}
    table: dict[str, set[str]] = {}
    for op_type, versions in SSAOpRegistry.core_ops.items():
        if op_type.startswith("_"):
            continue
        first = min(versions)
        table[op_type] = {name for name, target in order.items() if target >= first}
    # Of the dialect ops only the state update reaches a saved ML Program: the torch_* and
    # complex_* ones are rewritten to core ops by frontend passes before serialisation.
    for op_type in SSAOpRegistry.dialect_ops:
        if op_type in SERIALISED_DIALECT_OPS:
            table.setdefault(op_type, {"iOS18"})
    return table


SERIALISED_DIALECT_OPS = ("coreml_update_state",)


def coverage_rows() -> list[dict]:
    """One row per coremltools op type: family, and per opset 'yes' / 'no' / '-' (not in that opset)."""
    _load_kernels()
    rows = []
    for op_type, opsets in sorted(coremltools_ops().items()):
        k = _KERNELS.get(op_type)
        row = {"op_type": op_type, "family": k.family if k else ""}
        for name in OPSETS:
            if name not in opsets:
                row[name] = "-"
            else:
                row[name] = "yes" if (k or op_type == "const") else "no"
        rows.append(row)
    return rows
