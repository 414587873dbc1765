"""convert(): one call from a model and example inputs to a Core ML model and everything learned on the way.

A :class:`Conversion` keeps the MLModel, its MIL program, the spec version, the
options, the wall time, and every warning and log line coremltools emitted (each
explained where it is a known message). Conversions are cached on disk by a key
of (model graph and weights, input specs, options, library versions): re-running
a notebook cell with the same options is near-instant, and any change to the
model's code or weights misses the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coremltools as ct
import numpy as np
import torch

from . import messages as msgs
from . import states as model_states
from . import torch_ops
from .emulator.program import mil_program, walk_ops
from .messages import Message
from .options import ConversionOptions, as_options
from .sources import ExampleInputs, Source, load_source

CACHE_FORMAT = 1


class ConversionError(RuntimeError):
    """coremltools could not convert the model; carries the captured messages and an explanation."""

    def __init__(self, text: str, messages: list[Message], options: ConversionOptions, method: str):
        self.messages = messages
        self.options = options
        self.method = method
        self.explanation = msgs.explain(text)
        hint = f"\n  -> {self.explanation.title}: {self.explanation.fix}" if self.explanation else ""
        super().__init__(f"conversion failed ({method}, {options.precision}, {options.target}): {text}{hint}")


@dataclass
class Conversion:
    """The result of :func:`convert`.

    method: how the model became MIL - ``torch.jit.trace``, ``torch.export``,
    ``torchscript``, ``exported_program``, ``onnx2torch+torch.jit.trace`` or ``loaded``.
    """

    mlmodel: Any
    program: Any
    options: ConversionOptions
    spec_version: int
    wall_time: float
    messages: list
    method: str
    source_kind: str
    example_inputs: ExampleInputs | None = None
    cache_key: str | None = None
    from_cache: bool = False
    onnx_path: Path | None = None
    source: Source | None = field(default=None, repr=False)
    #: the trace/export this conversion came from (lets diagnose() convert siblings without re-tracing)
    prepared: Any = field(default=None, repr=False, compare=False)
    #: MIL output name -> enclosing torch module paths, innermost first (coremltools' op mapping)
    layer_chains: dict = field(default_factory=dict, repr=False)

    @property
    def explained(self) -> list[Message]:
        return [m for m in self.messages if m.explanation is not None]

    def layer_map(self):
        """Which torch module produced each MIL op, and which op carries each module's output."""
        from .mapping import build_layer_map

        module = self.source.module if self.source is not None else None
        return build_layer_map(self.program, module, self.layer_chains)

    def op_types(self) -> dict[str, int]:
        """Count of each MIL op type (nested blocks included, consts excluded)."""
        counts: dict[str, int] = {}
        for op in walk_ops(self.program, nested=True):
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
        return dict(sorted(counts.items()))

    def io_dtypes(self) -> tuple[dict, dict]:
        """(input name -> dtype, output name -> dtype) as the model description declares them."""
        return _io_dtypes(self.mlmodel.get_spec())

    def summary(self) -> str:
        lines = [f"{self.method} -> {self.options.convert_to} ({self.options.precision}, target {self.options.target}, "
                 f"spec {self.spec_version}) in {self.wall_time:.2f}s{' [cached]' if self.from_cache else ''}"]
        for m in self.explained:
            lines.append(f"  {m.explanation.title}: {m.text[:120]}")
        return "\n".join(lines)


def _io_dtypes(spec) -> tuple[dict, dict]:
    from coremltools.proto import FeatureTypes_pb2 as ft

    def kind(f):
        which = f.type.WhichOneof("Type")
        if which == "multiArrayType":
            return ft.ArrayFeatureType.ArrayDataType.Name(f.type.multiArrayType.dataType)
        if which == "imageType":
            return "IMAGE_" + ft.ImageFeatureType.ColorSpace.Name(f.type.imageType.colorSpace)
        return which

    return ({f.name: kind(f) for f in spec.description.input}, {f.name: kind(f) for f in spec.description.output})


# ---------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """Where conversions are cached: $COREML_LAB_CACHE, else ~/.cache/coreml_lab."""
    root = os.environ.get("COREML_LAB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "coreml_lab"


def clear_cache() -> int:
    """Delete every cached conversion; returns how many were removed."""
    _RECENT.clear()
    root = cache_dir()
    if not root.exists():
        return 0
    n = 0
    for entry in root.iterdir():
        if entry.is_dir() and (entry / "meta.json").exists():
            shutil.rmtree(entry)
            n += 1
    return n


def _hash_tensor(h, name: str, t) -> None:
    h.update(name.encode())
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(t).encode())


def fingerprint(source_digest: str, inputs: ExampleInputs | None, options: ConversionOptions) -> str:
    """Cache key of (graph and weights - :meth:`Prepared.digest` -, input specs, options, versions)."""
    h = hashlib.sha256()
    h.update(f"format={CACHE_FORMAT};ct={ct.__version__};torch={torch.__version__};np={np.__version__}".encode())
    h.update(source_digest.encode())
    if inputs is not None:
        h.update(inputs.describe().encode())
    h.update(options.key().encode())
    return h.hexdigest()[:32]


def _source_digest(graph_text: str, tensors: dict) -> str:
    """Hash of a traced graph's text and its weights."""
    h = hashlib.sha256()
    h.update(graph_text.encode())
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


_MANGLE = re.compile(r"___torch_mangle_\d+\.")


def _scripted_fingerprint_parts(scripted) -> tuple[str, dict]:
    # TorchScript mangles class names on every re-trace; the graph is the same
    graph = _MANGLE.sub("", str(scripted.inlined_graph))
    tensors = dict(scripted.state_dict())
    try:
        _, consts = scripted.code_with_constants
        for k, v in consts.const_mapping.items():
            tensors[f"__const__{k}"] = v
    except Exception:  # noqa: BLE001 - constants are an extra safety net
        pass
    return graph, tensors


def _save_to_cache(key: str, conv: Conversion) -> None:
    root = cache_dir() / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir()))
    try:
        conv.mlmodel.save(str(tmp / "model.mlpackage"))
        scopes = {}
        for op in walk_ops(conv.program, nested=True, consts=True):
            if getattr(op, "scopes", None):
                scopes[op.name] = {src.name: list(vals) for src, vals in op.scopes.items()}
        meta = {
            "spec_version": conv.spec_version, "wall_time": conv.wall_time, "method": conv.method,
            "source_kind": conv.source_kind, "options": conv.options.to_dict(),
            "messages": [m.to_dict() for m in conv.messages],
            "scopes": scopes,
            "layer_chains": {k: list(v) for k, v in conv.layer_chains.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: the last few conversions of this process, by cache key: a cache hit without reloading the package
_RECENT: OrderedDict[tuple, Conversion] = OrderedDict()
RECENT_SIZE = 6


def _remember(key: str, conv: Conversion) -> None:
    _RECENT[(str(cache_dir()), key)] = conv
    _RECENT.move_to_end((str(cache_dir()), key))
    while len(_RECENT) > RECENT_SIZE:
        _RECENT.popitem(last=False)


def _load_from_cache(key: str, options: ConversionOptions, inputs, source) -> Conversion | None:
    recent = _RECENT.get((str(cache_dir()), key))
    if recent is not None and (cache_dir() / key / "meta.json").exists():
        return dataclasses.replace(recent, options=options, example_inputs=inputs, source=source, from_cache=True)
    conv = _load_from_disk(key, options, inputs, source)
    if conv is not None:
        _remember(key, conv)
    return conv


def _load_from_disk(key: str, options: ConversionOptions, inputs, source) -> Conversion | None:
    root = cache_dir() / key
    meta_path = root / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        shell = ct.models.MLModel(str(root / "model.mlpackage"), skip_model_load=True)
        program = mil_program(shell)
        _restore_scopes(program, meta.get("scopes", {}))
        mlmodel = ct.models.MLModel(shell.get_spec(), weights_dir=shell.weights_dir, mil_program=program,
                                    skip_model_load=True)
    except Exception as exc:  # noqa: BLE001 - a damaged entry is a miss, not a failure
        warnings.warn(f"ignoring damaged conversion cache entry {root}: {exc}", stacklevel=2)
        return None
    return Conversion(
        mlmodel=mlmodel, program=program, options=options, spec_version=meta["spec_version"],
        wall_time=meta["wall_time"], messages=[Message.from_dict(m) for m in meta["messages"]],
        method=meta["method"], source_kind=meta["source_kind"], example_inputs=inputs, cache_key=key,
        from_cache=True, onnx_path=getattr(source, "onnx_path", None), source=source,
        layer_chains={k: tuple(v) for k, v in meta.get("layer_chains", {}).items()},
    )


def _restore_scopes(program, scopes: dict) -> None:
    from coremltools.converters.mil.mil.scope import ScopeSource

    for op in walk_ops(program, nested=True, consts=True):
        saved = scopes.get(op.name)
        if saved:
            for src_name, vals in saved.items():
                op.scopes[ScopeSource[src_name]] = list(vals)


# ---------------------------------------------------------------------------- convert

@dataclass
class Prepared:
    """A loaded source made ready for ct.convert (traced/exported), with its cache-key parts.

    Lets one trace serve several conversions of the same model (e.g. FP16 and FP32 in
    diagnose). coremltools may modify the TorchScript it converts, so a second conversion
    that really needs it gets a fresh trace.
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

    def digest(self) -> str:
        """Hash of the traced graph and its weights, computed once (conversions share it)."""
        if self._digest is None:
            self._digest = _source_digest(self.graph_text, self.tensors)
        return self._digest

    def take_convertible(self):
        if self._fresh is not None:
            convertible, self._fresh = self._fresh, None
            return convertible
        with msgs.capture(), model_states.preserved_buffers(self.source.model):
            convertible, _, _, _ = _prepare(self.source, self.inputs)
        return convertible


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
            cache: bool = True, prepared: Prepared | None = None, layer_mapping: bool = False) -> Conversion:
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
    named_outputs = _named_outputs(source, options, inputs)
    key = fingerprint(prep.digest() + f"|mapping={layer_mapping}|outputs={named_outputs}", inputs, options) \
        if cache else None
    if key is not None:
        hit = _load_from_cache(key, options, inputs, source)
        if hit is not None:
            return dataclasses.replace(hit, prepared=prep)

    ct_inputs = list(options.inputs) if options.inputs is not None else inputs.ct_inputs()
    ct_inputs, ct_states, state_messages = model_states.conversion_states(
        source, prep.updated_buffers, options, ct_inputs)
    convertible = prep.take_convertible()
    torch_ops.register()
    with msgs.capture() as captured:
        start = time.perf_counter()
        try:
            kwargs = options.convert_kwargs()
            if named_outputs:
                kwargs["outputs"] = [ct.TensorType(name=n) for n in named_outputs]
            if ct_states:
                kwargs["states"] = ct_states
            if layer_mapping:
                mlmodel, chains = _convert_with_mapping(convertible, ct_inputs, kwargs)
            else:
                mlmodel, chains = ct.convert(convertible, inputs=ct_inputs, **_fresh_states(kwargs)), {}
        except Exception as exc:
            failure = msgs.make("error", f"{type(exc).__name__}: {exc}", "exception")
            raise ConversionError(str(exc), env_messages + notes + prep_messages + state_messages + list(captured)
                                  + [failure], options, method) from exc
        wall = time.perf_counter() - start
    if options.compression is not None:  # weights compressed after conversion (coreml_lab/compression.py)
        from .compression import apply as compress
        from .mapping import chains_from_scopes
        if not chains and source.module is not None:  # scopes are read before compression drops them
            chains = chains_from_scopes(mil_program(mlmodel), dict(source.module.named_modules()))
        mlmodel = compress(mlmodel, options.compression, options.target)
    program = mil_program(mlmodel)
    if not chains and source.module is not None:  # plain conversion: scopes resolved against the tree
        from .mapping import chains_from_scopes
        _annotate_modules(program, chains_from_scopes(program, dict(source.module.named_modules())))
    else:
        _annotate_modules(program, chains)
    conv = Conversion(
        mlmodel=mlmodel, program=program, options=options,
        spec_version=mlmodel.get_spec().specificationVersion, wall_time=wall,
        messages=env_messages + notes + [msgs.make("info", f"converted via {method}", "coreml_lab")]
        + _composite_notes(prep.graph_text) + prep_messages + state_messages + list(captured),
        method=method, source_kind=source.kind, example_inputs=inputs, cache_key=key,
        onnx_path=source.onnx_path, source=source, layer_chains=chains, prepared=prep,
    )
    if key is not None:
        try:
            cache_dir().mkdir(parents=True, exist_ok=True)
            _save_to_cache(key, conv)
            _remember(key, dataclasses.replace(conv, from_cache=True, prepared=None))
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


def _named_outputs(source: Source, options: ConversionOptions, inputs: ExampleInputs | None) -> tuple | None:
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


def _annotate_modules(program, chains: dict) -> None:
    """Write each op's full torch module path into its scopes.

    Raw scopes spell ModuleList members as "0.attn" instead of "layers.0.attn", and coremltools'
    mapping helper (which inlines the TorchScript) leaves no module names at all; writing the
    resolved path back lets every scope reader (the emulator's records, error messages) name
    the real module.
    """
    if not chains:
        return
    from coremltools.converters.mil.mil.scope import ScopeSource

    for op in walk_ops(program, nested=True, consts=True):
        for v in op.outputs:
            chain = chains.get(v.name)
            if chain and chain[0]:
                op.scopes[ScopeSource.TORCHSCRIPT_MODULE_NAME] = chain[0].split(".") + [v.name]
                break


def _prepare(source: Source, inputs: ExampleInputs) -> tuple[Any, str, str, dict]:
    """What to hand ct.convert, how it was obtained, and the graph text and tensors for the cache key."""
    if source.kind == "torchscript":
        graph, tensors = _scripted_fingerprint_parts(source.model)
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
        graph, tensors = _scripted_fingerprint_parts(traced)
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
