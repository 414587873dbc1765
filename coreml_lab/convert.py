"""convert(): one call from a model and example inputs to a Core ML model and everything learned on the way.

The result is a :class:`~.conversion.Conversion` (model, program, messages); conversions are
cached (:mod:`.conversion_cache`). :func:`prepare` traces or exports a model once, so that
several conversions of it share the trace.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import coremltools as ct
import torch

from . import conversion_cache as cache_store
from . import messages as msgs
from . import states as model_states
from . import torch_ops
from .conversion import Conversion, ConversionError
from .conversion_cache import cache_dir, clear_cache, fingerprint
from .emulator.program import mil_program
from .fp32_reference import Fork, forkable, forking_pipeline
from .mapping import annotate_modules, chains_from_scopes, chains_from_torchscript, torchscript_module_paths
from .messages import Message
from .options import ConversionOptions, as_options
from .sources import ExampleInputs, Source, load_source

__all__ = ["convert", "prepare", "named_outputs", "Prepared", "Conversion", "ConversionError", "cache_dir",
           "clear_cache", "fingerprint"]


@dataclass
class Prepared:
    """A loaded source made ready for ct.convert (traced/exported), with its cache-key parts.

    Lets one trace serve several conversions of the same model (e.g. FP16 and FP32 in
    diagnose). A plain ``ct.convert`` only inlines the TorchScript's graph (converting it again
    makes the same program), so the conversion hands it back (:meth:`give_back`); coremltools'
    op-mapping helper annotates it, so a conversion after that one gets a fresh trace.
    """

    source: Source
    inputs: ExampleInputs | None
    method: str = "loaded"
    graph_text: str = ""
    tensors: dict = field(default_factory=dict, repr=False)
    messages: list = field(default_factory=list, repr=False)
    _fresh: Any = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)
    #: buffers the forward changes (KV caches ...): candidates for Core ML states (see :mod:`.states`)
    updated_buffers: tuple = ()
    _module_paths: dict | None = field(default=None, repr=False)

    def digest(self) -> str:
        """Hash of the traced graph and its weights, computed once (conversions share it)."""
        if self._digest is None:
            self._digest = cache_store.source_digest(self.graph_text, self.tensors)
        return self._digest

    def take_convertible(self):
        if self._fresh is not None:
            convertible, self._fresh = self._fresh, None
            return convertible
        with msgs.capture(), model_states.preserved_buffers(self.source.model):
            convertible, _, _, _ = _prepare(self.source, self.inputs)
        return convertible

    def give_back(self, convertible) -> None:
        """Keep a TorchScript that a plain ``ct.convert`` has read for the next conversion of this trace."""
        if isinstance(convertible, torch.jit.ScriptModule) and self._fresh is None:
            self._fresh = convertible

    def module_paths(self, scripted=None) -> dict:
        """Torch value name -> module chain of this trace (:func:`.mapping.torchscript_module_paths`), read once
        (from ``scripted``, else from the TorchScript handed back)."""
        if self._module_paths is None:
            scripted = scripted if scripted is not None else self._fresh
            self._module_paths = torchscript_module_paths(scripted) if scripted is not None else {}
        return self._module_paths


def prepare(model, example_inputs=None) -> Prepared:
    """Load ``model`` and check ``example_inputs`` against it; trace/export once (see :class:`Prepared`).

    Forwards run here (checks, tracing, finding the buffers it updates) leave the model's buffers as they were.
    """
    with model_states.preserved_buffers(model):
        source, inputs = load_source(model, example_inputs)
        if source.kind == "mlpackage":
            return Prepared(source, inputs)
        updated = model_states.find_updated_buffers(source, inputs.tensors)
        with msgs.capture() as messages, model_states.preserved_buffers(source.model):
            convertible, method, graph_text, tensors = _prepare(source, inputs)
    return Prepared(source, inputs, method, graph_text, tensors, list(messages), convertible,
                    updated_buffers=updated)


def convert(model, example_inputs=None, options: ConversionOptions | dict | None = None, *,
            cache: bool = True, prepared: Prepared | None = None, layer_mapping: bool = False,
            fork_fp32: bool = False) -> Conversion:
    """Convert ``model`` with ``options``; see :class:`Conversion`.

    ``model``: nn.Module (traced; falls back to torch.export when tracing fails), TorchScript
    module or file, ExportedProgram (or .pt2), .onnx file (through onnx2torch), or an existing
    MLModel / .mlpackage (loaded, not converted). Raises :class:`ConversionError` when
    coremltools fails, with its messages and an explanation. ``prepared`` (from
    :func:`prepare`) reuses one trace for several conversions; ``model`` is then ignored.

    ``layer_mapping=True`` converts through coremltools' op-mapping helper, which also records
    the torch module of every MIL op (``Conversion.layer_chains``). That helper inlines the
    TorchScript first, so its op names differ from a plain ``ct.convert``: the default plain
    conversion keeps the names users see (and that ``op_selector`` fixes refer to).

    ``fork_fp32=True`` (what :func:`~.diagnosis.diagnose` asks) also keeps the program as it stood
    before coremltools' FP16 pass (``Conversion.fp32_fork``) for the FP32 reference
    (:mod:`.fp32_reference`); the conversion itself is unchanged.
    """
    options = as_options(options)
    env_messages = msgs.import_messages()
    prep = prepared if prepared is not None else prepare(model, example_inputs)
    source, inputs = prep.source, prep.inputs
    if source.kind == "mlpackage":
        return _loaded(source, inputs, options, env_messages)

    notes = [msgs.make("info", n, "coreml_lab") for n in source.notes]
    prep_messages = list(prep.messages)
    method = prep.method
    output_names = named_outputs(source, options, inputs)
    key = fingerprint(prep.digest() + f"|mapping={layer_mapping}|outputs={output_names}", inputs, options) \
        if cache else None
    if key is not None:
        hit = cache_store.load(key, options, inputs, source)
        if hit is not None:
            return dataclasses.replace(hit, prepared=prep)

    ct_inputs = options.spec_copies("inputs") if options.inputs is not None else inputs.ct_inputs()
    ct_inputs, ct_states, state_messages = model_states.conversion_states(
        source, prep.updated_buffers, options, ct_inputs)
    convertible = prep.take_convertible()
    torch_ops.register()
    with msgs.capture() as captured:
        start = time.perf_counter()
        try:
            kwargs = options.convert_kwargs()
            if output_names:
                kwargs["outputs"] = [ct.TensorType(name=n) for n in output_names]
            if ct_states:
                kwargs["states"] = ct_states
            forks: list = []
            if fork_fp32 and not layer_mapping and isinstance(convertible, torch.jit.ScriptModule) \
                    and forkable(options, ct_inputs, ct_states):
                fork_outputs = copy.deepcopy(kwargs.get("outputs"))  # before coremltools sets FP16 on them
                kwargs["pass_pipeline"] = forking_pipeline(forks.append)
            if layer_mapping:
                mlmodel, chains = _convert_with_mapping(convertible, ct_inputs, kwargs)
            else:
                mlmodel, chains = ct.convert(convertible, inputs=ct_inputs, **_fresh_states(kwargs)), {}
        except Exception as exc:
            failure = msgs.make("error", f"{type(exc).__name__}: {exc}", "exception")
            raise ConversionError(str(exc), env_messages + notes + prep_messages + state_messages + list(captured)
                                  + [failure], options, method) from exc
        wall = time.perf_counter() - start
    if not layer_mapping and isinstance(convertible, torch.jit.ScriptModule):  # a plain conversion of TorchScript
        chains = chains_from_torchscript(mil_program(mlmodel), prep.module_paths(convertible))
        prep.give_back(convertible)
    scope_chains = {}
    if not chains and source.module is not None:  # scopes resolved against the tree (before compression drops them)
        scope_chains = chains_from_scopes(mil_program(mlmodel), dict(source.module.named_modules()))
    if options.compression is not None:  # weights compressed after conversion (coreml_lab/compression.py)
        from .compression import apply as compress
        mlmodel = compress(mlmodel, options.compression, options.target)
        chains = chains or scope_chains
    program = mil_program(mlmodel)
    annotate_modules(program, chains or scope_chains)
    conv = Conversion(
        mlmodel=mlmodel, program=program, options=options,
        spec_version=mlmodel.get_spec().specificationVersion, wall_time=wall,
        messages=env_messages + notes + [msgs.make("info", f"converted via {method}", "coreml_lab")]
        + _composite_notes(prep.graph_text) + prep_messages + state_messages + list(captured),
        method=method, source_kind=source.kind, example_inputs=inputs, cache_key=key,
        onnx_path=source.onnx_path, source=source, layer_chains=chains, prepared=prep,
        fp32_fork=Fork(forks[0], fork_outputs) if forks else None,
    )
    if key is not None:
        try:
            cache_dir().mkdir(parents=True, exist_ok=True)
            cache_store.save(key, conv)
            cache_store.remember(key, dataclasses.replace(conv, from_cache=True, prepared=None, fp32_fork=None))
        except OSError as exc:
            warnings.warn(f"could not write the conversion cache at {cache_dir()}: {exc}", stacklevel=2)
    return conv


def _fresh_states(kwargs: dict) -> dict:
    """ct.convert keyword arguments with fresh copies of ``states`` (coremltools renames the StateType
    objects it is given)."""
    return {**kwargs, "states": copy.deepcopy(kwargs["states"])} if kwargs.get("states") else kwargs


def _composite_notes(graph_text: str) -> list[Message]:
    """Info messages for the torch ops of the graph that went through coreml_lab's composites."""
    return [msgs.make("info", f"aten::{name} has no coremltools translation; converted through coreml_lab's "
                      f"composite ({how}), tested against torch", "coreml_lab")
            for name, how in torch_ops.COMPOSITES.items()
            if re.search(rf"aten::{name}\b|aten\.{name}\b|torch\.{name}\(", graph_text)]


def named_outputs(source: Source, options: ConversionOptions, inputs: ExampleInputs | None) -> tuple | None:
    """Output names the model itself gives (a Hugging Face ModelOutput's ``logits`` ...), unless the options name them."""
    if options.outputs is not None or source.kind != "module":
        return None
    names = getattr(source.model, "output_names", None)
    if not names or (inputs is not None and set(names) & set(inputs.names)):
        return None
    return tuple(names)


def _convert_with_mapping(convertible, ct_inputs, kwargs: dict):
    """ct.convert through coremltools' op-mapping helper, which also records the torch module of
    every MIL op. That helper is experimental: if it fails, convert plainly (layers are then
    named from scopes) and say so."""
    from coremltools.models.ml_program.experimental.torch.debugging_utils import convert_and_retrieve_op_mapping

    from .mapping import chains_from_coremltools

    try:
        mlmodel, mapping = convert_and_retrieve_op_mapping(convertible, inputs=ct_inputs, **_fresh_states(kwargs))
        return mlmodel, chains_from_coremltools(mapping)
    except Exception as exc:  # noqa: BLE001 - the plain conversion decides whether the model converts
        mlmodel = ct.convert(convertible, inputs=ct_inputs, **_fresh_states(kwargs))
        warnings.warn(f"coremltools' op mapping failed ({type(exc).__name__}: {str(exc)[:200]}); "
                      "layer names come from op scopes instead", stacklevel=2)
        return mlmodel, {}


def _prepare(source: Source, inputs: ExampleInputs) -> tuple[Any, str, str, dict]:
    """What to hand ct.convert, how it was obtained, and the graph text and tensors for the cache key."""
    if source.kind == "torchscript":
        graph, tensors = cache_store.scripted_fingerprint_parts(source.model)
        return source.model, "torchscript", graph, tensors
    if source.kind == "exported":
        ep = source.model
        if getattr(ep, "dialect", "ATEN") == "TRAINING":
            # coremltools converts the ATEN dialect; this returns a new program (the user's is kept)
            ep = ep.run_decompositions({})
            warnings.warn("the exported program was in the TRAINING dialect; converted "
                          "ep.run_decompositions({}) as coremltools requires", stacklevel=2)
        return ep, "exported_program", ep.graph_module.code, dict(ep.state_dict)
    prefix = "onnx2torch+" if source.kind == "onnx" else ""
    module = source.model
    try:
        with torch.no_grad():  # no check_trace: the reference runs compare torch with the conversion anyway
            traced = torch.jit.trace(module, inputs.tensors, check_trace=False)
        graph, tensors = cache_store.scripted_fingerprint_parts(traced)
        return traced, prefix + "torch.jit.trace", graph, tensors
    except Exception as trace_exc:  # noqa: BLE001 - fall back to torch.export, and say so
        try:
            ep = torch.export.export(module, inputs.tensors).run_decompositions({})
        except Exception as export_exc:
            raise ConversionError(
                f"torch.jit.trace failed ({type(trace_exc).__name__}: {trace_exc}) and torch.export failed "
                f"({type(export_exc).__name__}: {export_exc})", [], ConversionOptions(), prefix + "trace/export",
            ) from export_exc
        warnings.warn(f"torch.jit.trace failed ({type(trace_exc).__name__}: {str(trace_exc).splitlines()[0]}); "
                      "converted through torch.export instead", stacklevel=2)
        return ep, prefix + "torch.export", ep.graph_module.code, dict(ep.state_dict)


def _loaded(source: Source, inputs, options: ConversionOptions, env_messages) -> Conversion:
    ml = source.model
    spec = ml.get_spec()
    program = None
    if spec.WhichOneof("Type") == "mlProgram":
        program = mil_program(ml)
        if getattr(ml, "_mil_program", None) is None:
            # one program object for every run of this model (the user's MLModel is left as it is)
            ml = ct.models.MLModel(spec, weights_dir=ml.weights_dir, mil_program=program, skip_model_load=True)
    note = msgs.make("info", "loaded an existing Core ML model: nothing was converted; options other than "
                     "compute_units do not apply", "coreml_lab")
    return Conversion(mlmodel=ml, program=program, options=options, spec_version=spec.specificationVersion,
                      wall_time=0.0, messages=env_messages + [note], method="loaded", source_kind="mlpackage",
                      example_inputs=inputs, source=source)
