"""diagnose(): convert, run the references and every compute unit in lockstep, and return the Report.

How the numbers are made (all streaming: statistics are updated as values pass;
no run keeps every tensor):

* The FP32 conversion of the same model, run exactly (the ``EXACT_FP32`` profile), is the
  per-op reference (an existing package diagnosed on its own is its own reference, run
  exactly in FP32: :mod:`.packages`): each op of the diagnosed program is paired with the op of the
  FP32 program it came from (:mod:`.pairing`, by structure).
* The diagnosed program runs under each compute unit *in lockstep* with that
  reference run (:class:`~.emulator.lockstep.Lockstep`), so every op is compared while
  both values are alive (accumulated error, :mod:`.statistics`) and re-run alone on the
  reference inputs rounded to its storage dtype (local error, :mod:`.local_error`). A
  layer that is locally fine but accumulates error is not the culprit; one with a large
  local error is (:mod:`.culprits`).
* torch FP32, with forward hooks on the modules whose output op is known, checks
  the FP32 program layer by layer: a wrong decomposition shows up even at FP32.
  torch FP64 is the golden reference that separates conversion error from
  ordinary FP32 noise: by default run after the units, and only for the inputs and outputs
  where the FP32 program and torch FP32 disagree beyond it (:mod:`.output_statistics`).
  ONNX Runtime is the reference of ONNX sources (:mod:`.reference`).
* On macOS with ``runtime="coreml"`` the units are Core ML itself
  (:meth:`.runtime.CoreMLRuntime.stream`), measured against the same reference.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import packages
from . import runtime as rt
from .compression_report import compression_table, mark_layers, original_weights
from .conversion import Conversion, ConversionError
from .convert import convert, named_outputs, prepare
from .emulator.lockstep import Lockstep, var_input_names
from .emulator.profiles import EXACT_FP32, get_profile, profile_label
from .feeds import dataset
from .fp32_reference import finish_fork, fp32_reference, reference_options
from .local_error import LocalErrors
from .options import ConversionOptions, as_options
from .output_statistics import check_golden
from .pairing import ProgramPairing, pair_programs, reference_key, unpaired_ops
from .reference import GoldenRun, TorchPump, buffers_holding, drain, feed_tensors, run_onnxruntime, run_torch, snapshot
from .report import Report
from .states import StepStates, check_steps, preserved_buffers
from .statistics import RunState, Statistics, StepInfo, StepState, steps_with_nonfinite_consts

__all__ = ["diagnose", "Diagnosis", "DEFAULT_COMPUTE_UNITS", "dataset", "pair_programs", "reference_key"]

DEFAULT_COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def diagnose(model, example_inputs=None, options: ConversionOptions | dict | None = None,
             compute_units: Sequence[str] = DEFAULT_COMPUTE_UNITS, runtime: str = "auto",
             inputs: Iterable[dict] | None = None, progress: bool = True, local: bool = True, *,
             reuse: bool = True, steps: Sequence[dict] | None = None, mlmodel=None, golden="auto") -> Report:
    """Diagnose ``model`` converted with ``options`` on each compute unit; returns a :class:`Report`.

    ``model`` may also be a :class:`~.convert.Conversion` from :func:`~.convert.convert`: it is
    diagnosed as converted (its options and example inputs; nothing is traced again).
    ``model`` may be an existing ML Program (a ``.mlpackage`` path or a coremltools MLModel),
    diagnosed on its own: the reference is its own program executed exactly in FP32 (no framework
    reference; the report says so). ``mlmodel=`` (a package or MLModel) with a torch ``model``
    diagnoses that package against the kit's FP32 conversion of the model it came from, paired
    by structure (:mod:`.packages` refuses a model that does not pair).
    ``inputs``: an iterable of input dicts (a small dataset) whose statistics are aggregated;
    default the example inputs. ``runtime``: "auto" (Core ML on macOS, else the emulator),
    "emulator" or "coreml". ``local=False`` skips the per-op local re-runs (faster).
    ``reuse=False`` computes everything everywhere instead of computing once what several units
    (or a unit and the reference) compute identically: the same numbers, slower (the tests
    compare both). A model that fails to convert gives a Report carrying the error and its
    explanation.

    ``steps``: a list of input dicts, one per decoding step, run in order: torch steps its own
    buffers (KV caches), every unit and the reference program their own Core ML state
    (``make_state()``, from zeros; torch's state buffers start from zeros too). The Report then
    also has ``steps`` (per step, unit and output / state / layer) and ``first_bad_step``. A
    model without state works too: steps are then simply ordered inputs. Without ``steps``, each
    input of a stateful model is a first step from an empty state.

    ``golden``: the torch FP64 "golden" run, which tells FP32 noise from conversion error.
    "auto" runs it after the units, for an input whose FP32 program and torch FP32 outputs
    disagree beyond FP32 noise (:data:`~.output_statistics.GOLDEN_TOLERANCE`), and compares only
    those outputs; True on every input, False never. The ``outputs`` table's ``golden`` column
    says which outputs have a golden comparison and why the others do not.
    """
    check_golden(golden)
    if not list(compute_units):
        raise ValueError("compute_units is empty: give at least one of CPU_ONLY, CPU_AND_GPU, CPU_AND_NE, ALL")
    profiles = {}
    for c in compute_units:  # a name, a ct.ComputeUnit, or a DeviceProfile (a variant of one)
        profile = get_profile(c)
        label = profile_label(profile)
        if label in profiles:
            raise ValueError(f"compute_units names {label!r} twice; give each unit or profile once")
        profiles[label] = profile
    cus = list(profiles)
    variants = any(label != p.compute_unit for label, p in profiles.items())
    if variants and runtime == "coreml":
        raise ValueError("device-profile variants describe the emulator; Core ML runs its own units: pass "
                         "compute unit names with runtime='coreml', or runtime='emulator'")
    kind = rt.resolve(runtime)
    if variants and kind == "coreml":  # pragma: no cover - macOS only
        raise ValueError("device-profile variants describe the emulator: pass runtime='emulator' to "
                         "diagnose them on this Mac")
    if steps is not None and inputs is not None:
        raise ValueError("pass either inputs= (independent inputs, statistics aggregated) or steps= (decoding "
                         "steps in order, state carried from one to the next), not both")
    if steps is not None and mlmodel is not None:
        raise ValueError("steps= with mlmodel= is not supported: diagnose the stateful package on its own "
                         "(diagnose(package, example_inputs, steps=...)) or the torch model with steps=")
    if mlmodel is not None:
        return _diagnose_package_with_source(model, example_inputs, options, mlmodel, inputs, cus, kind, local,
                                             profiles, reuse, progress, golden)
    if isinstance(model, Conversion) and model.method == "loaded":
        if options is not None:
            raise ValueError("an existing Core ML model is diagnosed as it is: pass options=None")
        model, example_inputs = model.mlmodel, (model.example_inputs if example_inputs is None else example_inputs)
    if packages.is_package(model):
        if options is not None and as_options(options) != ConversionOptions():
            raise ValueError("an existing Core ML package is diagnosed as it is (nothing is converted): pass "
                             "options=None, or pass the torch model with mlmodel=the package")
        package = packages.load_package(model)
        example = packages.package_inputs(package, example_inputs)
        conv = packages.package_conversion(package, example,
                                           path=model if isinstance(model, (str, os.PathLike)) else None)
        if steps is not None:
            if isinstance(steps, dict) or not isinstance(steps, Sequence) or not steps:
                raise ValueError("steps must be a non-empty list of input dicts, one per decoding step; the "
                                 f"package expects {packages.expected_inputs(package)}")
            feeds = [packages.check_feeds(package, f, f"steps[{i}]") for i, f in enumerate(steps)]
        else:
            feeds = [packages.check_feeds(package, f, f"inputs[{i}]")
                     for i, f in enumerate(dataset(inputs, conv.example_inputs))]
        return Diagnosis(conv, conv, cus, kind, local, profiles, reuse=reuse, golden=golden,
                         pairing=ProgramPairing.identity(conv)).run(feeds, progress, stepwise=steps is not None)
    if isinstance(model, Conversion):
        conv, opts = model, model.options
        if options is not None and as_options(options) != opts:
            raise ValueError("diagnose(conversion) diagnoses the conversion as made: pass options=None "
                             f"(it was converted with {opts}), or pass the model to convert it anew")
        if example_inputs is not None:
            raise ValueError("diagnose(conversion) uses the conversion's own example inputs: pass "
                             "example_inputs=None, and other feeds as inputs=")
        prep = conv.prepared
        if prep is None:
            raise ValueError("this Conversion does not carry its trace (it came from a bundle or was copied); "
                             "pass the model itself")
    else:
        opts = as_options(options)
        prep = prepare(model, example_inputs)
    try:
        if not isinstance(model, Conversion):
            conv = convert(None, options=opts, prepared=prep, fork_fp32=True)
        conv32 = _fp32_conversion(opts, prep, conv)
    except ConversionError as exc:
        return Report.failed(opts, exc, cus, runtime=kind)
    if conv.program is None:
        raise ValueError("this model is not an ML Program: diagnose needs convert_to='mlprogram'")
    if conv.example_inputs is None:
        raise ValueError("diagnosing a loaded .mlpackage needs example inputs (its input names and shapes)")
    if steps is not None:
        if inputs is not None:
            raise ValueError("pass either inputs= (independent inputs, statistics aggregated) or steps= (decoding "
                             "steps in order, state carried from one to the next), not both")
        if isinstance(steps, dict) or not isinstance(steps, Sequence) or not steps:
            raise ValueError("steps must be a non-empty list of input dicts, one per decoding step; the model's "
                             f"inputs are {conv.example_inputs.describe()}")
        if kind == "coreml":  # pragma: no cover - macOS only
            raise ValueError("a steps= diagnosis runs on the emulator: pass runtime='emulator'")
        feeds = dataset(steps, conv.example_inputs, what="steps")
    else:
        feeds = dataset(inputs, conv.example_inputs)
    return Diagnosis(conv, conv32, cus, kind, local, profiles, reuse=reuse, golden=golden).run(
        feeds, progress, stepwise=steps is not None)


def _fp32_conversion(opts: ConversionOptions, prep, conv: Conversion | None = None) -> Conversion:
    """The FP32 conversion a diagnosis measures against (:mod:`.fp32_reference`): the fork ``conv`` kept of its
    own program, else coremltools' FP32 conversion kept as its MIL program (TorchScript), else a conversion
    through coremltools' op mapping (torch modules of an exported program)."""
    outputs = named_outputs(prep.source, opts, prep.inputs)
    if conv is not None and conv.fp32_fork is not None:
        fork, conv.fp32_fork = conv.fp32_fork, None  # its program becomes the reference's
        return finish_fork(fork, prep, opts, outputs)
    if prep.method.endswith("torch.jit.trace") or prep.method == "torchscript":
        return fp32_reference(prep, opts, outputs)
    return convert(None, options=reference_options(opts), prepared=prep, layer_mapping=True)


def _diagnose_package_with_source(model, example_inputs, options, mlmodel, inputs, cus, kind, local, profiles,
                                  reuse, progress, golden="auto") -> Report:
    """A package (``mlmodel``) against the kit's FP32 conversion of the torch ``model`` it came from."""
    if isinstance(model, Conversion) or packages.is_package(model):
        raise ValueError("mlmodel= is the package to diagnose; model must then be the torch model it came from "
                         f"(got {type(model).__name__}); to diagnose a package on its own pass it as model")
    package = packages.load_package(mlmodel)
    names = [s.name for s in packages.input_specs(package)]
    if isinstance(example_inputs, dict) and sorted(example_inputs) == sorted(names):
        example_inputs = tuple(example_inputs[n] for n in names)  # named as the package names them
    prep = prepare(model, example_inputs)
    if prep.source.kind == "mlpackage":
        raise ValueError("mlmodel= is the package to diagnose; model must be the torch model it came from")
    prep = packages.with_names(prep, packages.renamed_inputs(package, prep.inputs))
    opts = as_options(options) if options is not None else ConversionOptions(target=packages.target_of(package))
    try:
        conv32 = _fp32_conversion(opts, prep)
    except ConversionError as exc:
        return Report.failed(opts, exc, cus, runtime=kind)
    conv = packages.package_conversion(package, prep.inputs, opts, source=prep.source)
    pairing = ProgramPairing.of(conv, conv32)
    packages.check_paired(conv, conv32, pairing.ref_of, unpaired_ops(conv.program, pairing.ref_of))
    feeds = [packages.check_feeds(package, f, f"inputs[{i}]") for i, f in enumerate(dataset(inputs, prep.inputs))]
    return Diagnosis(conv, conv32, cus, kind, local, profiles, reuse=reuse, pairing=pairing,
                     golden=golden).run(feeds, progress)


class Diagnosis:
    """One diagnosis run: the references and every compute unit, in lockstep; :meth:`run` returns the Report.

    The runs happen here; what is measured of them is :class:`~.statistics.Statistics`' job,
    the local re-runs :class:`~.local_error.LocalErrors`', the tables
    :meth:`.report.Report.from_statistics`'.
    """

    def __init__(self, conv: Conversion, conv32: Conversion, cus: list[str], kind: str, local: bool,
                 profiles: dict | None = None, reuse: bool = True, pairing: ProgramPairing | None = None,
                 golden="auto"):
        self.conv, self.conv32, self.cus, self.kind, self.local = conv, conv32, cus, kind, local
        #: compute what several units (or a unit and the reference) compute identically only once
        self.reuse = reuse
        self.profiles = profiles or {cu: get_profile(cu) for cu in cus}  # label -> device profile
        self.pairing = pairing if pairing is not None else ProgramPairing.of(conv, conv32)
        #: the package is its own reference (run exactly in FP32): no framework reference exists
        self.own_reference = conv32 is conv
        self.ref_of = self.pairing.ref_of
        self.torch_model = conv.source.reference if conv.source is not None else None
        output_names = [o.name for o in conv.mlmodel.get_spec().description.output]
        self.stats = Statistics(cus, self.pairing, output_names, conv32.program, golden)
        self._double = GoldenRun(self.torch_model)  # its FP64 twin made at the first golden run
        #: compressed weights' original values; the local errors of their ops re-run with them
        self.originals = original_weights(conv, conv32, self.pairing) if local else {}
        self.uncompressed_local: dict = {}

    def run(self, feeds_list: list[dict], progress: bool, stepwise: bool = False) -> Report:
        ref = rt.compiled_emulator(self.conv32.mlmodel, EXACT_FP32, self.pairing.ref_map.op_module)
        if self.own_reference:
            self.stats.notes.add(packages.NO_FRAMEWORK_NOTE)
        devs = {}
        if self.kind == "emulator":
            devs = {cu: rt.compiled_emulator(self.conv.mlmodel, self.profiles[cu], self.pairing.layer_map.op_module)
                    for cu in self.cus}
        if stepwise:
            check_steps(feeds_list, ref)
        states = StepStates.of(ref, devs, self.torch_model, self.conv)
        if states is not None and self.kind != "emulator":  # pragma: no cover - macOS only
            raise ValueError("stateful models are diagnosed on the emulator: pass runtime='emulator'")
        with preserved_buffers(self.torch_model):
            return self._run(feeds_list, progress, stepwise, ref, devs, states)

    def _run(self, feeds_list, progress, stepwise, ref, devs, states) -> Report:
        bar = tqdm(total=len(feeds_list) * max(len(self.cus), 1), desc="diagnose", unit="run",
                   disable=not progress, miniters=1)  # miniters=1: tqdm's monitor thread never redraws it
        module_outputs = set(self.pairing.module_vars.values())
        for step, feeds in enumerate(feeds_list):
            if states is not None and (step == 0 or not stepwise):
                states.reset()  # a stateful model starts from empty states (each input, or the first step)
            if stepwise:
                self.stats.begin_step()
            torch_run = None
            tensors = feed_tensors(feeds, self.conv.example_inputs) if self.torch_model is not None else None
            # torch's state buffers as this step found them: a golden run after it starts from them too
            before = snapshot(states.torch_buffers) if states is not None and tensors is not None else None
            onnx_out = run_onnxruntime(self.conv.onnx_path, feeds) if self.conv.onnx_path else None
            if self.kind == "emulator":
                if tensors is not None:
                    # torch FP32 drives the reference program and the units: module outputs as they come
                    pump = TorchPump(self.torch_model, tensors, module_outputs)
                    ref_outs, dev_outs = pump.run(self._lockstep(ref, devs, feeds, pump, states))
                    torch_run = pump.outputs
                else:
                    ref_outs, dev_outs = drain(self._lockstep(ref, devs, feeds, None, states))
            else:  # Core ML (macOS; tests/test_runtime.py runs it with test doubles)
                if tensors is not None:
                    torch_run = run_torch(self.torch_model, tensors, module_outputs)
                ref_outs, dev_outs = self._measured(ref, feeds, torch_run)
            wanted = self.stats.compare_outputs(ref_outs, dev_outs, torch_run, onnx_out)
            if wanted and tensors is not None:
                self.stats.compare_golden(self._golden(tensors, states, before), wanted)
            self.stats.finish_outputs()
            if states is not None and stepwise:
                self.stats.compare_states(states.units, states.want())
            if stepwise:
                self.stats.end_step(step)
            self.stats.record_run(feeds, dev_outs, torch_run)
            bar.update(len(self.cus))
        bar.close()
        report = Report.from_statistics(self.stats, conversion=self.conv, runtime=self.kind, n_inputs=len(feeds_list),
                                        profiles=self.profiles)
        report.reference = "package program (exact FP32)" if self.own_reference else "framework"
        report.compression = compression_table(report.layers, self.conv, self.conv32, self.pairing,
                                               self.uncompressed_local)
        report.layers = mark_layers(report.layers, report.compression)
        return report

    def _golden(self, tensors, states=None, before=None):
        """The FP64 run of one input, after the units ran it (from ``before``, torch's state buffers as
        the step found them); FP64 weights made per module as it runs, or a full FP64 copy if needed."""
        with buffers_holding(states.torch_buffers, before) if before is not None else contextlib.nullcontext():
            return self._golden_run(tensors)

    def _golden_run(self, tensors):
        try:
            return self._double(tensors)
        except Exception as exc:  # noqa: BLE001 - e.g. a model that casts to float32 itself
            self.stats.notes.add(f"the FP64 golden run failed ({type(exc).__name__}: {str(exc)[:120]}); "
                                 "golden columns are empty")
            self.stats.model_outputs.golden_failed = type(exc).__name__
            return None

    def _lockstep(self, ref, devs, feeds, torch_run, states=None):
        """Generator: one input through the reference and every unit in lockstep, measured as it goes."""
        stats = self.stats
        ref_feeds = _widened(ref.prepare_inputs(feeds), feeds)
        stats.add_input_ranges(ref_feeds)
        dev_feeds = next(iter(devs.values())).prepare_inputs(feeds)
        for name, value in dev_feeds.items():  # the very reference tensors where equal: steps can be reused
            r = ref_feeds.get(name)
            if isinstance(r, torch.Tensor) and isinstance(value, torch.Tensor) and r.dtype == value.dtype \
                    and r.shape == value.shape and torch.equal(r, value):
                dev_feeds[name] = r
        unit_feeds = None
        if states is not None:  # each run its own state buffers, updated in place by the program
            ref_feeds.update(states.reference)
            unit_feeds = states.units
        interps = {cu: m.interpreter for cu, m in devs.items()}
        bad_consts = steps_with_nonfinite_consts(next(iter(interps.values())))
        lock = Lockstep(ref.interpreter, interps, self.local, self.ref_of, reuse=self.reuse)
        local = LocalErrors(stats, interps, reuse=self.reuse, originals=self.originals,
                            uncompressed=self.uncompressed_local) if self.local else None
        run = RunState.of(self.cus)

        def on_step(index, step, values, refs):
            in_names = var_input_names(step)
            state = StepState()
            for cu, vals in values.items():
                info = StepInfo(index, step.op.name, step.op.op_type, interps[cu].main.steps[index].device, in_names)
                inputs_bad = index in bad_consts or any(n in run.nonfinite[cu] for n in in_names)
                stats.add_unit_step(cu, info, step, vals, refs, state, run, inputs_bad)
            if local is not None and not step.blocks:
                local.measure(index, step, values, refs, state, run.exact, {cu: lock.same[cu][index] for cu in values})
            stats.diverge(step, values, state)

        def on_reference(_step, name, value):
            return stats.on_reference(name, value, torch_run)

        return (yield from lock.run(ref_feeds, dev_feeds, on_step, on_reference, unit_feeds=unit_feeds))

    def _measured(self, ref, feeds, torch_run):
        """Core ML runs: outputs and the intermediates Core ML returns, against the reference run."""
        keep = {}

        def on_ref(record):
            if isinstance(record.value, np.ndarray) and np.issubdtype(record.value.dtype, np.floating):
                keep[record.name] = np.array(record.value, copy=True)
                drain(self.stats.on_reference(record.name, torch.from_numpy(keep[record.name]), torch_run))

        ref_outs = ref.predict(feeds, on_op=on_ref)
        dev_outs = {}
        for cu in self.cus:
            coreml = rt.CoreMLRuntime(self.conv.mlmodel, cu)
            dev_outs[cu] = coreml.stream(feeds, lambda order, record, cu=cu: self.stats.add_measured(
                cu, order, record, keep.get(self.ref_of.get(record.name))))
        return ref_outs, dev_outs


def _widened(ref_feeds: dict, feeds: dict) -> dict:
    """The reference's feeds: an input the program declares FP16 is given as fed, in FP32 (not rounded)."""
    out = dict(ref_feeds)
    for name, value in ref_feeds.items():
        given = np.asarray(feeds.get(name)) if name in feeds else None
        if isinstance(value, torch.Tensor) and value.dtype == torch.float16 and given is not None \
                and given.dtype.kind == "f" and given.dtype.itemsize > 2:
            out[name] = torch.from_numpy(np.array(given, dtype=np.float32))
    return out
