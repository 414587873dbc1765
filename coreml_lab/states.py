"""Core ML states and torch buffers: which buffers become states (``ct.StateType``), and both kept in step.

A KV cache written as ``self.k_cache[:, :, p:p + 1] = k`` (Apple's stateful-model
guide) is a torch buffer that the forward updates in place; converted at iOS18
with ``ct.StateType`` it becomes a Core ML state. :func:`find_updated_buffers`
finds such buffers by running the forward once on the example inputs and reading
each buffer's version counter: torch bumps it on every in-place write to the
tensor or to any view of it (slice assignment, ``copy_``, ``add_``,
``index_copy_`` ...), in eager and TorchScript modules alike, so no graph
pattern (slice chains, views, aliasing through submodules) has to be recognised.
A buffer replaced by a new tensor (``self.buf = ...``) is seen too, and reported
as something a state cannot express. The buffers are restored afterwards: the
user's model is left as it was.

:func:`conversion_states` turns the found buffers (or the names given as
``ConversionOptions(states=...)``) into ``ct.StateType`` specs for ``ct.convert``,
with messages saying what became a state and why something could not.

:class:`StepStates` holds the state buffers of one multi-step diagnosis: the reference
program's, each compute unit's, and torch's own buffers they are compared with.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import messages as msgs

#: Core ML states hold FP16 tensors only (coremltools 9: "State only support fp16 dtype")
STATE_DTYPE = np.float16
MIN_TARGET = "iOS18"


class StateError(ValueError):
    """Buffers that cannot become Core ML states, or ``states=`` names the model does not have."""


@dataclass(frozen=True)
class UpdatedBuffer:
    """A buffer the forward changed: ``how`` is ``"in place"`` or ``"reassigned"``."""

    name: str
    shape: tuple
    dtype: str
    how: str = "in place"

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float16", "float32", "float64", "bfloat16")

    def describe(self) -> str:
        return f"{self.name} {self.shape} {self.dtype}"


def feature_name(buffer_name: str) -> str:
    """The name the state gets in the Core ML model (coremltools turns "blocks.0.k_cache" into
    "blocks_0_k_cache")."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", buffer_name)


def target_has_states(target: str) -> bool:
    """Whether deployment target ``target`` (a ``ct.target`` name) has Core ML states (iOS18 / macOS15 on)."""
    import coremltools as ct

    return getattr(ct.target, target).value >= getattr(ct.target, MIN_TARGET).value


# ---------------------------------------------------------------------------- finding them

def _buffer_slots(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(qualified name, owning module, attribute) of every buffer, each tensor once."""
    slots = []
    for mod_name, mod in module.named_modules(remove_duplicate=True):
        for attr, buf in mod.named_buffers(recurse=False):
            if buf is not None:
                slots.append((f"{mod_name}.{attr}" if mod_name else attr, mod, attr))
    return slots


def _version(t: torch.Tensor) -> int | None:
    # inference-mode tensors keep no version counter
    return None if t.is_inference() else t._version


@contextlib.contextmanager
def preserved_buffers(module) -> Iterator[None]:
    """Run forwards inside the block without changing ``module``'s buffers: values written in place are
    copied back and reassigned buffers put back afterwards (nothing else is copied unless it changed)."""
    if not isinstance(module, torch.nn.Module):
        yield
        return
    saved = []
    for _name, owner, attr in _buffer_slots(module):
        buf = getattr(owner, attr)
        saved.append((owner, attr, buf, _version(buf), buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, attr, buf, version, values in saved:
                if getattr(owner, attr) is not buf:
                    owner._buffers[attr] = buf
                if version is None:
                    with torch.inference_mode():
                        buf.copy_(values)
                elif buf._version != version:
                    buf.copy_(values)


def find_updated_buffers(source, tensors: Sequence[torch.Tensor]) -> tuple[UpdatedBuffer, ...]:
    """The buffers one forward of ``source`` (a :class:`~coreml_lab.sources.Source`) on ``tensors`` changes.

    nn.Module and TorchScript sources are run once (buffers restored afterwards). An
    ``ExportedProgram``'s mutated buffers become states in coremltools itself; other sources
    (ONNX imports, Core ML packages) have none.
    """
    if source.kind == "exported":
        # coremltools makes the buffers an ExportedProgram mutates states by itself (from its graph signature)
        return ()
    module = source.model if source.kind in ("module", "torchscript") else None
    if not isinstance(module, torch.nn.Module):
        return ()
    slots = _buffer_slots(module)
    if not slots:
        return ()
    before = {}
    for name, owner, attr in slots:
        buf = getattr(owner, attr)
        before[name] = (buf, _version(buf), buf.detach().clone() if buf.is_inference() else None)
    found = []
    with preserved_buffers(module):
        with torch.no_grad():
            module(*tensors)
        for name, owner, attr in slots:
            buf, version, values = before[name]
            now = getattr(owner, attr)
            how = None
            if now is not buf:
                how = "reassigned"
            elif version is not None and buf._version != version:
                how = "in place"
            elif values is not None and not torch.equal(values, buf):
                how = "in place"
            if how:
                found.append(UpdatedBuffer(name, tuple(buf.shape), str(buf.dtype).replace("torch.", ""), how))
    return tuple(found)


# ---------------------------------------------------------------------------- making specs

def _buffers_of(source) -> dict[str, tuple]:
    """name -> (shape, dtype name) of every buffer of the source's torch model."""
    if source.kind == "exported":
        sig = source.model.graph_signature
        return {n: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for n, t in source.model.state_dict.items()
                if n in set(getattr(sig, "buffers", ()))}
    module = source.model
    if not isinstance(module, torch.nn.Module):
        return {}
    return {n: (tuple(b.shape), str(b.dtype).replace("torch.", "")) for n, b in module.named_buffers()}


def _state_type(name: str, shape: tuple):
    import coremltools as ct

    # a fresh spec per conversion: ct.convert renames the StateType objects it is given
    return ct.StateType(wrapped_type=ct.TensorType(shape=tuple(shape), dtype=STATE_DTYPE), name=name)


def _info(text: str):
    return msgs.make("info", text, "coreml_lab")


def _warning(text: str):
    return msgs.make("warning", text, "coreml_lab")


def conversion_states(source, updated: Sequence[UpdatedBuffer], options, ct_inputs: list) -> tuple[list, list, list]:
    """``(inputs, states, messages)`` for ``ct.convert``.

    ``options.states``: None finds them (every float buffer the forward updates in place), ``()``
    keeps every buffer a constant, a tuple of buffer names makes exactly those states.
    ``ct.StateType`` specs given in ``options.inputs`` are moved to ``states`` (as copies).
    Raises :class:`StateError` for names the model does not have and for updates a Core ML
    state cannot hold.
    """
    given = [copy.deepcopy(s) for s in ct_inputs if _is_state_type(s)]
    inputs = [s for s in ct_inputs if not _is_state_type(s)]
    if given:
        return inputs, given, [_info("states from ConversionOptions(inputs=...): "
                                     + ", ".join(str(s.name) for s in given))]
    if source.kind in ("mlpackage", "onnx"):
        return inputs, [], []
    buffers = _buffers_of(source)
    in_place = [u for u in updated if u.how == "in place"]
    reassigned = [u for u in updated if u.how == "reassigned"]
    messages = [_warning(
        f"forward replaces buffer {u.name!r} with a new tensor (self.{u.name.rsplit('.', 1)[-1]} = ...) instead of "
        "updating it in place; a Core ML state cannot express that, so it is converted as the value the trace saw. "
        f"Write into it in place (self.{u.name.rsplit('.', 1)[-1]}[...] = value, or .copy_(value)) to make it a "
        "state.") for u in reassigned]
    if options.states is None:
        names = [u.name for u in in_place]
        if not names:
            return inputs, [], messages
        not_float = [u for u in in_place if not u.is_float]
        if not_float:
            raise StateError(
                "forward updates buffer(s) " + ", ".join(u.describe() for u in not_float) + " in place, but Core ML "
                "states hold FP16 tensors only, so this update cannot become a state. Pass the value as an input "
                "(and return the new value as an output), or keep it in a float buffer; or convert with "
                "ConversionOptions(states=()) to freeze every buffer as a constant.")
        if not target_has_states(options.target):
            messages.append(_warning(
                f"forward updates buffer(s) {', '.join(names)} in place, but Core ML states need deployment target "
                f"{MIN_TARGET} or later (target is {options.target}): converted without states, so every prediction "
                "starts from the buffers' initial values. Convert with ConversionOptions(target='iOS18') to keep "
                "them as states."))
            return inputs, [], messages
        messages.append(_info(
            "buffers updated in place by forward became Core ML states (FP16, starting at zeros in make_state()): "
            + ", ".join(f"{n} -> {feature_name(n)}" for n in names)))
        return inputs, [_state_type(n, buffers[n][0]) for n in names], messages
    if not options.states:
        if in_place:
            messages.append(_info("states=(): buffers updated in place are converted as constants: "
                                  + ", ".join(u.name for u in in_place)))
        return inputs, [], messages
    unknown = [n for n in options.states if n not in buffers]
    if unknown:
        have = ", ".join(f"{n} {shape}" for n, (shape, _) in buffers.items()) or "none"
        raise StateError(f"states={options.states!r} names {unknown}, which the model does not have as buffers; "
                         f"its buffers are: {have}" + (f" (updated in place by forward: "
                                                        f"{', '.join(u.name for u in in_place)})" if in_place else ""))
    not_float = [n for n in options.states if buffers[n][1] not in ("float16", "float32", "float64", "bfloat16")]
    if not_float:
        raise StateError(f"buffer(s) {not_float} are not floating point ({', '.join(buffers[n][1] for n in not_float)}); "
                         "Core ML states hold FP16 tensors only")
    unchanged = [n for n in options.states if n not in {u.name for u in updated}]
    if unchanged:
        messages.append(_warning(f"states {unchanged} are not updated in place by forward on the example inputs; "
                                 "they become states that the model only reads"))
    messages.append(_info("states named by ConversionOptions(states=...): "
                          + ", ".join(f"{n} -> {feature_name(n)}" for n in options.states)))
    return inputs, [_state_type(n, buffers[n][0]) for n in options.states], messages


# ---------------------------------------------------------------------------- stepping

def check_steps(feeds_list: Sequence[dict], model) -> None:
    """Every step's inputs fit ``model`` (an ``EmulatedModel``): a clear error naming the expected names and
    shapes before anything runs."""
    expected = "; ".join(spec.describe() for spec in model.input_specs)
    by_name = {spec.name: spec for spec in model.input_specs}
    for i, feeds in enumerate(feeds_list):
        for name, value in feeds.items():
            spec = by_name.get(name)
            if spec is None:
                raise ValueError(f"steps[{i}] has an input {name!r} the model does not have; its inputs are {expected}")
            if spec.kind == "array" and not spec.accepts_shape(tuple(np.shape(value))):
                raise ValueError(f"steps[{i}]: input {name!r} has shape {tuple(np.shape(value))}; the model's inputs "
                                 f"are {expected}")


class StepStates:
    """The state buffers of one diagnosis: the reference program's, each unit's, and torch's.

    Core ML starts every state at zeros (``make_state()``); :meth:`reset` starts all of them
    there, torch's buffers included (the caller restores the user's buffers afterwards, see
    :func:`preserved_buffers`). A state whose torch buffer is unknown is compared with the
    reference program's state instead.
    """

    def __init__(self, ref, devs: dict, torch_buffers: dict):
        self.ref, self.devs, self.torch_buffers = ref, devs, torch_buffers
        self.reference: dict = {}
        self.units: dict = {}

    @classmethod
    def of(cls, ref, devs: dict, torch_model, conv) -> StepStates | None:
        """The states of a stateful program (None for a stateless one); raises ValueError when the units'
        programs or torch's buffers do not hold the states the reference program declares."""
        if not ref.state_specs:
            return None
        want = {s.name: tuple(s.shape) for s in ref.state_specs}
        described = "; ".join(f"{n} {shape}" for n, shape in want.items())
        for dev in devs.values():
            have = {s.name: tuple(s.shape) for s in dev.state_specs}
            if have != want:
                raise ValueError(f"state mismatch: the diagnosed program's states are "
                                 f"{'; '.join(f'{n} {sh}' for n, sh in have.items()) or 'none'}; expected {described}")
        buffers = {}
        if isinstance(torch_model, torch.nn.Module):
            by_feature = {feature_name(n): (n, b) for n, b in torch_model.named_buffers()}
            for name, shape in want.items():
                if name in by_feature:
                    bname, buf = by_feature[name]
                    if tuple(buf.shape) != shape:
                        raise ValueError(f"state shape mismatch: the model's state {name!r} holds {shape}, but torch "
                                         f"buffer {bname!r} is {tuple(buf.shape)}. The model's states are {described}")
                    buffers[name] = buf
        return cls(ref, devs, buffers)

    def reset(self) -> None:
        """Empty states everywhere: fresh ``make_state()`` buffers, torch's state buffers zeroed."""
        self.reference = self.ref.make_state().buffers
        self.units = {cu: dev.make_state().buffers for cu, dev in self.devs.items()}
        with torch.no_grad():
            for buf in self.torch_buffers.values():
                buf.zero_()

    def want(self) -> dict:
        """state name -> what each unit's state is compared with: torch's buffer, else the reference program's."""
        return {name: self.torch_buffers.get(name, ref).detach() for name, ref in self.reference.items()}


def _is_state_type(spec) -> bool:
    import coremltools as ct

    return isinstance(spec, ct.StateType)


__all__ = ["StateError", "UpdatedBuffer", "find_updated_buffers", "preserved_buffers", "conversion_states",
           "feature_name", "target_has_states", "StepStates", "check_steps"]
