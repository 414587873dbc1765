"""The FP32 reference a diagnosis measures against: coremltools' FP32 conversion, kept as its MIL program.

A diagnosis runs its reference in the emulator, which reads the MIL program and the model
description only. So the reference is coremltools' own FP32 conversion up to the finished
program - its torch frontend, its default pipeline without the FP16 pass, its ML Program
backend passes (the same names a direct FP32 conversion gives) - without what the backend
then does for a model file: serialize every weight into a blob, write the package. That part
is more than half of a conversion (BERT-base: 2.6 of 6.2 s without it), and nobody reads that
file. The model description comes from coremltools' own exporter, with an empty program body.

When a diagnosis converts the model itself, the FP32 reference costs no second conversion:
coremltools' pipeline runs once, and :func:`forking_pipeline` puts a pass just before its FP16
pass that keeps a copy of the program as it stands there (weights shared, not copied). The
diagnosed conversion goes on to FP16 as coremltools always takes it; the copy is finished at
FP32 with the passes a direct FP32 conversion runs from that point (:func:`finish_fork`). A
conversion read from the cache has no fork: its reference is then converted (frontend and
passes, still without the model file).

Layers are named from the TorchScript the conversion read (:func:`.mapping.torchscript_module_paths`),
the full module path of every torch value, so no second conversion through coremltools'
op-mapping helper is needed. An exported program (torch.export) still goes through that helper:
its nodes carry no TorchScript scopes.

Recipe::

    prep = prepare(model, example_inputs)
    reference = fp32_reference(prep, options)      # a Conversion whose mlmodel holds no weights file
    reference.program, reference.layer_chains

    forks = []
    mlmodel = ct.convert(traced, ..., pass_pipeline=forking_pipeline(forks.append))   # FP16, as always
    reference = finish_fork(forks[0], prep, options, output_types)                   # its FP32 twin
"""

from __future__ import annotations

import copy
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import coremltools as ct
from coremltools.converters.mil.backend.mil.load import CoreMLProtoExporter
from coremltools.converters.mil.converter import _construct_other_pipelines
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipeline, PassPipelineManager
from coremltools.converters.mil.mil.passes.pass_registry import register_pass
from coremltools.proto import MIL_pb2

from . import conversion_cache as cache_store
from . import messages as msgs
from . import states as model_states
from . import torch_ops
from .conversion import Conversion, ConversionError
from .mapping import annotate_modules, chains_from_torchscript
from .options import ConversionOptions

#: what coremltools makes an ML Program for when no deployment target is given
DEFAULT_TARGET = ct.target.iOS15
#: coremltools' FP16 pass, and the INT16 pass a direct FP32 conversion leaves out with it
FP16_PASS, INT16_PASS = "common::add_fp16_cast", "common::add_int16_cast"
FORK_PASS = "coreml_lab::fp32_fork"
#: a deep copy of a MIL program recurses along its longest chain of ops: room for a 1B-parameter decoder's
COPY_STACK_BYTES, COPY_RECURSION = 1 << 30, 1_000_000


@register_pass(namespace="coreml_lab")
class fp32_fork(AbstractGraphPass):
    """Hands ``sink`` a copy of the program as it stands (weights shared with it, not copied)."""

    def __init__(self):
        self.sink = None

    def apply(self, prog):
        if self.sink is not None:
            self.sink(copy_program(prog))


def forking_pipeline(sink) -> PassPipeline:
    """coremltools' default pipeline with :class:`fp32_fork` just before its FP16 pass."""
    pipeline = PassPipeline()
    pipeline.insert_pass(list(pipeline.passes).index(FP16_PASS), FORK_PASS)
    pipeline.set_options(FORK_PASS, {"sink": sink})
    return pipeline


def copy_program(prog):
    """A deep copy of a MIL program whose const ops share their arrays with ``prog``'s.

    Python's deep copy recurses op -> input var -> producing op ...: it runs in a thread with a
    large stack and a high recursion limit, as deep as the program is long.
    """
    shared = {}
    for function in prog.functions.values():
        for op in function.operations:
            if op.op_type == "const":
                value = op.outputs[0].val
                if value is not None and hasattr(value, "__array__"):
                    shared[id(value)] = value
    result: dict = {}

    def run():
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, COPY_RECURSION))
        try:
            result["program"] = copy.deepcopy(prog, shared)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            result["error"] = exc
        finally:
            sys.setrecursionlimit(limit)

    size = threading.stack_size(COPY_STACK_BYTES)
    try:
        worker = threading.Thread(target=run, name="coreml_lab-copy-program")
        worker.start()
    finally:
        threading.stack_size(size)
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["program"]


@dataclass
class Fork:
    """The program of a conversion before its FP16 pass, and the output types its caller asked for."""

    program: object
    output_types: list | None


def forkable(options: ConversionOptions, ct_inputs, ct_states) -> bool:
    """Whether the FP32 reference can be made from a fork of a conversion with these arguments: an ML Program
    made at reduced precision, every input and state typed (the torch frontend types untyped ones FP16 at FP16)."""
    return (options.convert_to == "mlprogram" and options.precision != "fp32"
            and all(getattr(spec, "dtype", None) is not None for spec in list(ct_inputs) + list(ct_states or ())))


def finish_fork(fork: Fork, prep, options: ConversionOptions, named_outputs=None) -> Conversion:
    """The FP32 reference Conversion from ``fork``: the passes a direct FP32 conversion runs from the FP16
    pass on, then the backend's passes. The fork is used up (its program becomes the reference's)."""
    options = reference_options(options)
    key = _memory_key(prep, options, named_outputs)
    program = fork.program
    with msgs.capture() as captured:
        start = time.perf_counter()
        try:
            function = next(iter(program.functions.values()))
            function.set_output_types(fork.output_types)
            _without_fp16_output_casts(function, fork.output_types)
            passes = list(PassPipeline.DEFAULT.passes)
            after = [p for p in passes[passes.index(FP16_PASS):] if p not in (FP16_PASS, INT16_PASS)]
            PassPipelineManager.apply_pipeline(program, PassPipeline(pass_names=after, pipeline_name="fp32_after_fork"))
            _finish(program)
        except Exception as exc:
            failure = msgs.make("error", f"{type(exc).__name__}: {exc}", "exception")
            raise ConversionError(str(exc), list(captured) + [failure], options, prep.method) from exc
        wall = time.perf_counter() - start
    note = ("FP32 reference: the diagnosed conversion's own program before coremltools' FP16 pass, finished "
            "at FP32 (one conversion from torch)")
    return _reference(program, prep, options, options.ct_target or DEFAULT_TARGET, wall,
                      [msgs.make("info", note, "coreml_lab")] + list(captured), key)


def _without_fp16_output_casts(function, requested) -> None:
    """Take off the casts to FP16 that coremltools' ``update_output_dtypes`` put on FP32 outputs.

    That pass also runs first in coremltools' pipeline, so the fork has them already: from iOS16
    on at FP16, the torch frontend asks for FP16 outputs where the caller gave no dtype. A direct
    FP32 conversion has no such cast; the output is the cast's input again, under its name.
    """
    outputs, casts = list(function.outputs), []
    for i, var in enumerate(outputs):
        asked = getattr(requested[i], "dtype", None) if requested is not None and i < len(requested) else None
        op = var.op
        if asked is not None or op is None or op.op_type != "cast" or op.inputs["dtype"].val != "fp16":
            continue
        source = op.inputs["x"]
        if source.dtype != types.fp32 or not source.name.endswith("_type_fp32"):
            continue
        outputs[i] = source
        casts.append((op, var.name, source))
    if casts:
        function.set_outputs(outputs)
        function.remove_ops([op for op, _, _ in casts])
        for _, name, source in casts:
            source.set_name(name)


def reference_options(options: ConversionOptions) -> ConversionOptions:
    """The options of the FP32 reference of a conversion made with ``options``."""
    return options.replace(precision="fp32", fp32_ops=(), compression=None)


def fp32_reference(prep, options: ConversionOptions, named_outputs=None) -> Conversion:
    """The FP32 reference Conversion of the traced model ``prep`` (see the module docstring).

    ``options`` are the diagnosed conversion's; raises :class:`ConversionError` when coremltools fails.
    Kept in memory for the next diagnosis of the same trace and options (not on disk: it has no model file).
    """
    options = reference_options(options)
    source, inputs = prep.source, prep.inputs
    key = _memory_key(prep, options, named_outputs)
    hit = cache_store.recent(key)
    if hit is not None:
        return hit
    ct_inputs = options.spec_copies("inputs") if options.inputs is not None else inputs.ct_inputs()
    ct_inputs, ct_states, state_messages = model_states.conversion_states(source, prep.updated_buffers, options,
                                                                          ct_inputs)
    convertible = prep.take_convertible()
    torch_ops.register()
    target = options.ct_target or DEFAULT_TARGET
    kwargs = {"inputs": ct_inputs, "minimum_deployment_target": target, "compute_precision": ct.precision.FLOAT32}
    if named_outputs:
        kwargs["outputs"] = [ct.TensorType(name=n) for n in named_outputs]
    elif options.outputs is not None:
        kwargs["outputs"] = options.spec_copies("outputs")
    if ct_states:
        kwargs["states"] = ct_states
    with msgs.capture() as captured:
        start = time.perf_counter()
        try:
            program = ct.convert(convertible, convert_to="milinternal", **kwargs)
            _finish(program)
        except Exception as exc:
            failure = msgs.make("error", f"{type(exc).__name__}: {exc}", "exception")
            raise ConversionError(str(exc), state_messages + list(captured) + [failure], options,
                                  prep.method) from exc
        wall = time.perf_counter() - start
    prep.module_paths(convertible)
    prep.give_back(convertible)
    note = "FP32 reference: coremltools' FP32 conversion kept as its MIL program (no model file written)"
    return _reference(program, prep, options, target, wall,
                      [msgs.make("info", note, "coreml_lab")] + state_messages + list(captured), key)


def _memory_key(prep, options: ConversionOptions, named_outputs) -> str:
    """Where this process remembers the reference of one trace, options and output names (forked or not)."""
    return cache_store.fingerprint(prep.digest() + f"|reference|outputs={named_outputs}", prep.inputs, options)


def _finish(program) -> None:
    """The ML Program backend's passes (names as a direct conversion gives them) and its last checks."""
    _, backend = _construct_other_pipelines(PassPipeline.DEFAULT, "pytorch", "mlprogram")
    PassPipelineManager.apply_pipeline(program, backend)
    program._check_early_error_out_for_invalid_program()


def _reference(program, prep, options, target, wall, messages, key) -> Conversion:
    chains = chains_from_torchscript(program, prep.module_paths())
    annotate_modules(program, chains)
    source = prep.source
    reference = Conversion(
        mlmodel=_described_model(program, target), program=program, options=options, spec_version=target.value,
        wall_time=wall, messages=messages, method=prep.method, source_kind=source.kind,
        example_inputs=prep.inputs, cache_key=key, onnx_path=source.onnx_path, source=source,
        layer_chains=chains, prepared=prep,
    )
    cache_store.remember(key, reference)
    return reference


def _described_model(program, target) -> ct.models.MLModel:
    """An MLModel that holds ``program`` and coremltools' description of its inputs, outputs and states.

    Its spec's program body is empty and it has no weights file: it is for the emulator (which
    reads the MIL program) and for the description, not to be saved or run by Core ML.
    """
    version = target.value
    spec = CoreMLProtoExporter(program, MIL_pb2.Program(), None, None, classifier_config=None,
                               convert_to="mlprogram", convert_from="milinternal",
                               specification_version=version).export(version)
    with tempfile.TemporaryDirectory(prefix="coreml_lab-reference-") as weights:
        return ct.models.MLModel(spec, weights_dir=weights, mil_program=program, skip_model_load=True)
