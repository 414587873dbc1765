"""diagnose(): convert, run the references and every compute unit, and measure where precision is lost.

How the numbers are made (all streaming: statistics are updated as values pass;
no run keeps every tensor):

* The FP32 conversion of the same model, run exactly (CPU_ONLY emulator), is the
  per-op reference: each op of the diagnosed program is matched to the op of the
  FP32 program it came from (same name without ``_cast_fp16``-style suffixes).
* The diagnosed program runs under each compute unit *in lockstep* with that
  reference run, so every op is compared while both values are alive
  (accumulated error) and re-run alone on the reference inputs rounded to its
  storage dtype (local error). A layer that is locally fine but accumulates error
  is not the culprit; one with a large local error is.
* torch FP32, with forward hooks on the modules whose output op is known, checks
  the FP32 program layer by layer: a wrong decomposition shows up even at FP32.
  torch FP64 is the golden reference that separates conversion error from
  ordinary FP32 noise; ONNX Runtime is the reference of ONNX sources.
"""

from __future__ import annotations

import math
import re
import weakref
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from . import runtime as rt
from .convert import Conversion, ConversionError, convert, prepare
from .emulator.lockstep import SharedRun, same_computation, share_key, var_input_names
from .emulator.profiles import PROFILES, get_profile, profile_label
from .emulator.program import walk_ops
from .environment import environment
from .fp16 import FP16_MAX, RangeStats, const_ranges
from .metrics import DiffStats, ErrorHistogram, ErrorStats, largest_finite, max_abs, reference_sums
from .options import ConversionOptions, as_options
from .reference import TorchPump, double_copy, drain, feed_tensors, lazy_double_copy, run_onnxruntime, run_torch
from .report import Report

DEFAULT_COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
_SUFFIX = re.compile(r"(_cast_fp16|_cast_fp32|_to_fp16|_to_fp32|_promoted)+$")


def reference_key(name: str) -> str:
    """The FP32-program name of a var of an FP16/mixed program by naming (``var_7_cast_fp16`` -> ``var_7``)."""
    return _SUFFIX.sub("", name)


def pair_programs(dev_program, ref_program) -> dict[str, str]:
    """Dev var name -> the reference (FP32 program) var holding the same quantity.

    Matched by structure, not names (coremltools names the same op differently at FP16 and
    FP32): walking the dev program in order, an op matches the first unmatched reference op
    of the same type whose non-constant inputs are the matches of its own inputs. A precision
    cast the reference does not have is transparent (its output matches its input's match).
    Ops left unmatched fall back to name matching.
    """
    dev_f = next(iter(dev_program.functions.values()))
    ref_f = next(iter(ref_program.functions.values()))
    ref_inputs = set(ref_f.inputs)
    match: dict[str, str] = {n: n for n in dev_f.inputs if n in ref_inputs}
    index: dict = defaultdict(list)
    ref_names = set(ref_inputs)
    for op in walk_ops(ref_f, nested=False):  # pairs top-level steps: a loop is one op
        index[(op.op_type, _input_signature(op, None))].append(op)
        ref_names.update(v.name for v in op.outputs)
    used = set()
    for op in walk_ops(dev_f, nested=False):
        sig = _input_signature(op, match)
        cands = [c for c in index.get((op.op_type, sig), []) if id(c) not in used] if sig is not None else []
        if cands:
            ref_op = cands[0]
            used.add(id(ref_op))
            for dv, rv in zip(op.outputs, ref_op.outputs):
                match[dv.name] = rv.name
        elif op.op_type == "cast" and op.inputs["x"].name in match:
            match[op.outputs[0].name] = match[op.inputs["x"].name]
        else:
            for dv in op.outputs:
                key = reference_key(dv.name)
                if key in ref_names:
                    match[dv.name] = key
    return match


def _input_signature(op, match):
    """(input name, matched var name or "const") for every input; None if an input has no match."""
    sig = []
    for pname, v in sorted(op.inputs.items()):
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            if x.op is not None and x.op.op_type == "const":
                sig.append((pname, "const"))
            elif match is None:
                sig.append((pname, x.name))
            elif x.name in match:
                sig.append((pname, match[x.name]))
            else:
                return None
    return tuple(sig)


# ----------------------------------------------------------------------------- inputs

def dataset(inputs, example) -> list[dict]:
    """Validated feeds (name -> numpy) from ``inputs``: None = the example inputs, a dict, or an iterable."""
    if inputs is None:
        return [example.as_numpy()]
    if isinstance(inputs, dict):
        inputs = [inputs]
    items = list(inputs)
    if not items:
        raise ValueError("inputs is empty: pass at least one dict of input name -> array, "
                         "or inputs=None to diagnose the example inputs")
    names = list(example.names)
    shapes = {n: tuple(t.shape) for n, t in zip(example.names, example.tensors)}
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TypeError(f"inputs[{i}] must be a dict of input name -> array, got {type(item).__name__}")
        if sorted(item) != sorted(names):
            raise ValueError(f"inputs[{i}] has names {sorted(item)}; the model's inputs are {names} "
                             f"(shapes {shapes})")
        feed = {}
        for n in names:
            v = item[n]
            arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if arr.dtype == np.int64:
                arr = arr.astype(np.int32)
            elif arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            feed[n] = arr
        out.append(feed)
    return out


def _is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


#: interpreter -> indices of its steps with a non-finite constant input (weights do not change)
_NONFINITE_CONSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _steps_with_nonfinite_consts(interp) -> set:
    found = _NONFINITE_CONSTS.get(interp)
    if found is None:
        found = _NONFINITE_CONSTS[interp] = {i for i, s in enumerate(interp.main.steps) if _has_nonfinite_const(s)}
    return found


def _has_nonfinite_const(step) -> bool:
    for s in step.sources():
        if not isinstance(s, str):
            v = np.asarray(s.value)
            if np.issubdtype(v.dtype, np.floating) and not bool(np.isfinite(v).all()):
                return True
    return False


# ----------------------------------------------------------------------------- lockstep

class Lockstep:
    """Runs a reference interpreter and the diagnosed interpreters (one program, one per unit) op by op.

    The diagnosed units advance together through :class:`~.emulator.lockstep.SharedRun`, so a
    step several units compute identically runs once, and a unit's step that provably computes
    what its paired reference step computed (:func:`~.emulator.lockstep.same_computation`, on
    the very reference tensors) takes the reference's values. ``run`` calls
    ``on_step(index, step, {cu: output values}, refs)`` after each diagnosed step, where
    ``refs`` maps the reference vars paired (``ref_of``) with the step's inputs and outputs to
    their values, and ``on_ref(step, name, value)`` (a generator) for every reference value.
    Reference values are kept only until their last use.
    """

    def __init__(self, ref_interp, dev_interps: dict, with_inputs: bool, ref_of: dict, reuse: bool = True):
        self.ref = ref_interp
        self.ref_of = ref_of
        self.devs = SharedRun(dev_interps, share=reuse)
        self.steps = list(next(iter(dev_interps.values())).main.steps)
        self.same = {cu: _same_steps(interp, ref_interp, ref_of) if reuse else [None] * len(self.steps)
                     for cu, interp in dev_interps.items()}
        keys = set(ref_interp.main.input_names)
        for s in ref_interp.main.steps:
            keys.update(name for name, _, _ in s.outputs)
        self.step_keys = []
        uses: Counter = Counter()
        for index, step in enumerate(self.steps):
            ks = [ref_of.get(n) for n, _, _ in step.outputs]
            if with_inputs or any(same[index] is not None for same in self.same.values()):
                ks += [ref_of.get(n) for n in var_input_names(step)]
            ks = [k for k in ks if k in keys]
            self.step_keys.append(ks)
            uses.update(ks)
        self.uses = uses

    def run(self, ref_feeds: dict, dev_feeds: dict, on_step, on_ref):
        """Generator (``on_ref`` is one: it may wait for torch); returns (reference outputs, unit outputs)."""
        ref_iter = self.ref.iterate(ref_feeds)
        remaining = Counter(self.uses)
        store = {k: v for k, v in ref_feeds.items() if remaining.get(k)}
        ref_open = True
        ref_of = self.ref_of

        def reuse(cu, step, env):
            same = self.same[cu][index]
            if same is None or any(env[n] is not store.get(ref_of.get(n)) for n in self.devs.names[index]):
                return None
            outs = [store.get(name) for name, _, _ in same.outputs]
            return None if any(o is None for o in outs) else outs

        self.devs.start({cu: dev_feeds for cu in self.devs.interpreters})
        for index, step in enumerate(self.steps):
            keys = self.step_keys[index]
            while ref_open and any(k not in store for k in keys):
                try:
                    rstep, rvalues = next(ref_iter)
                except StopIteration:
                    ref_open = False
                    break
                for (name, _, _), v in zip(rstep.outputs, rvalues):
                    if remaining.get(name):
                        store[name] = v
                    yield from on_ref(rstep, name, v)
            values = self.devs.step(index, reuse)
            on_step(index, step, values, {k: store.get(k) for k in keys})
            self.devs.free(index)
            for k in keys:
                remaining[k] -= 1
                if remaining[k] <= 0:
                    store.pop(k, None)
        for rstep, rvalues in ref_iter:
            for (name, _, _), v in zip(rstep.outputs, rvalues):
                yield from on_ref(rstep, name, v)
        return self.ref.last_outputs, self.devs.finish()


#: dev interpreter -> reference interpreter -> per dev step, the reference step computing the same
_SAME_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _same_steps(dev_interp, ref_interp, ref_of: dict) -> list:
    """For each top-level step of ``dev_interp``, the step of ``ref_interp`` that computes exactly
    the same (None if none); constants are compared once per pair of interpreters."""
    per_ref = _SAME_STEPS.setdefault(dev_interp, weakref.WeakKeyDictionary())
    found = per_ref.get(ref_interp)
    if found is None:
        producer = {name: s for s in ref_interp.main.steps for name, _, _ in s.outputs}
        found = []
        for step in dev_interp.main.steps:
            wanted = [ref_of.get(name) for name, _, _ in step.outputs]
            cand = producer.get(wanted[0]) if wanted else None
            ok = cand is not None and [n for n, _, _ in cand.outputs] == wanted \
                and same_computation(step, cand, ref_of)
            found.append(cand if ok else None)
        per_ref[ref_interp] = found
    return found


# ----------------------------------------------------------------------------- per-op state

class _OpStats:
    """Everything accumulated for one (compute unit, output var)."""

    __slots__ = ("acc", "local", "hist", "max_abs", "nonfinite", "nonfinite_from_inputs", "meta", "ints",
                 "ints_differ", "ints_from_inputs")

    def __init__(self):
        self.ints = 0          # integer outputs (indices, masks): elements compared
        self.ints_differ = 0   # ... and how many differ from the reference
        self.ints_from_inputs = False  # ... while an integer input already differed
        self.acc = ErrorStats()
        self.local = ErrorStats()
        self.hist = ErrorHistogram()
        self.max_abs = 0.0
        self.nonfinite = False              # the device value had inf/NaN
        self.nonfinite_from_inputs = False  # ... and so did one of the op's inputs
        self.meta = None                    # (index, op name, op type, device, input vars)


def _max_abs(a) -> tuple[float, bool]:
    """(largest finite |value|, whether every value is finite) of a tensor or array."""
    a = torch.as_tensor(a)
    if not a.numel():
        return 0.0, True
    m = max_abs(a)
    return (m, True) if math.isfinite(m) else (largest_finite(a), False)


# ----------------------------------------------------------------------------- diagnose

def diagnose(model, example_inputs=None, options: ConversionOptions | dict | None = None,
             compute_units: Sequence[str] = DEFAULT_COMPUTE_UNITS, runtime: str = "auto",
             inputs: Iterable[dict] | None = None, progress: bool = True, local: bool = True) -> Report:
    """Diagnose ``model`` converted with ``options`` on each compute unit; returns a :class:`Report`.

    ``model`` may also be a :class:`~.convert.Conversion` from :func:`~.convert.convert`: it is
    diagnosed as converted (its options and example inputs; nothing is traced again).
    ``inputs``: an iterable of input dicts (a small dataset) whose statistics are aggregated;
    default the example inputs. ``runtime``: "auto" (Core ML on macOS, else the emulator),
    "emulator" or "coreml". ``local=False`` skips the per-op local re-runs (faster).
    A model that fails to convert gives a Report carrying the error and its explanation.
    """
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
    if isinstance(model, Conversion):
        conv, opts = model, model.options
        if options is not None and as_options(options) != opts:
            raise ValueError("diagnose(conversion) diagnoses the conversion as made: pass options=None "
                             f"(it was converted with {opts}), or pass the model to convert it anew")
        if example_inputs is not None:
            raise ValueError("diagnose(conversion) uses the conversion's own example inputs: pass "
                             "example_inputs=None, and other feeds as inputs=")
        prep = conv.prepared
        if prep is None and conv.method != "loaded":
            raise ValueError("this Conversion does not carry its trace (it came from a bundle or was copied); "
                             "pass the model itself")
    else:
        opts = as_options(options)
        prep = prepare(model, example_inputs)
    try:
        if not isinstance(model, Conversion):
            conv = convert(None, options=opts, prepared=prep)
        # the exact reference: the FP32 conversion, through coremltools' op mapping (torch modules)
        conv32 = conv if conv.method == "loaded" else convert(
            None, options=opts.replace(precision="fp32", fp32_ops=()), prepared=prep, layer_mapping=True)
    except ConversionError as exc:
        return Report.failed(opts, exc, cus, runtime=kind)
    if conv.program is None:
        raise ValueError("this model is not an ML Program: diagnose needs convert_to='mlprogram'")
    if conv.example_inputs is None:
        raise ValueError("diagnosing a loaded .mlpackage needs example inputs (its input names and shapes)")
    feeds = dataset(inputs, conv.example_inputs)
    return Diagnosis(conv, conv32, cus, kind, local, profiles).run(feeds, progress)


class Diagnosis:
    """One diagnosis run; :meth:`run` returns the Report."""

    #: compute what several units (or a unit and the reference) compute identically only once;
    #: False runs everything everywhere (the tests compare both: sharing must change no number)
    reuse = True

    def __init__(self, conv: Conversion, conv32: Conversion, cus: list[str], kind: str, local: bool,
                 profiles: dict | None = None):
        self.conv, self.conv32, self.cus, self.kind, self.local = conv, conv32, cus, kind, local
        self.profiles = profiles or {cu: get_profile(cu) for cu in cus}  # label -> device profile
        self.ref_map = conv32.layer_map()
        self.module_vars = _innermost_module_per_var(self.ref_map.module_outputs)
        self.ref_of = pair_programs(conv.program, conv32.program)
        self.layer_map = _paired_layer_map(conv, self.ref_map, self.ref_of)
        self.torch_model = conv.source.reference if conv.source is not None else None
        self.output_names = [o.name for o in conv.mlmodel.get_spec().description.output]
        self.stats = {cu: defaultdict(_OpStats) for cu in cus}
        self.ranges = defaultdict(RangeStats)
        self.torch_layers = defaultdict(ErrorStats)
        self.torch_mismatch = {}
        self.first_nonfinite = {}
        self.outputs = defaultdict(ErrorStats)
        self.outputs_golden = defaultdict(ErrorStats)
        self.output_hist = defaultdict(ErrorHistogram)
        self.references = defaultdict(ErrorStats)
        self.pairs = defaultdict(DiffStats)           # (cu_a, cu_b, var) -> divergence between units
        self.notes: set = set()
        self._double = None  # FP64 twin of the torch model, made once
        self._double_lazy = False  # ... with its FP64 weights made per module (lazy_double_copy)
        self.runs = {"inputs": [], "outputs": {}, "torch": []}
        self.int_bad = {cu: set() for cu in cus}
        self.shapes = {}

    # ---------------------------------------------------------------- run
    def run(self, feeds_list: list[dict], progress: bool) -> Report:
        from tqdm.auto import tqdm

        ref = _emulated(self.conv32.mlmodel, "CPU_ONLY", self.ref_map.op_module)
        devs = {}
        if self.kind == "emulator":
            devs = {cu: _emulated(self.conv.mlmodel, self.profiles[cu], self.layer_map.op_module) for cu in self.cus}
            self.storage = {cu: _storage_table(m.interpreter) for cu, m in devs.items()}
            self.bad_consts = _steps_with_nonfinite_consts(next(iter(devs.values())).interpreter)
        bar = tqdm(total=len(feeds_list) * max(len(self.cus), 1), desc="diagnose", unit="run",
                   disable=not progress)
        for feeds in feeds_list:
            golden = torch_run = None
            tensors = feed_tensors(feeds, self.conv.example_inputs) if self.torch_model is not None else None
            if tensors is not None:
                golden = self._golden(tensors)
            onnx_out = run_onnxruntime(self.conv.onnx_path, feeds) if self.conv.onnx_path else None
            if self.kind == "emulator":
                if tensors is not None:
                    # torch FP32 drives the reference program and the units: module outputs as they come
                    pump = TorchPump(self.torch_model, tensors, set(self.module_vars.values()))
                    ref_outs, dev_outs = pump.run(self._lockstep(ref, devs, feeds, pump))
                    torch_run = pump.outputs
                else:
                    ref_outs, dev_outs = drain(self._lockstep(ref, devs, feeds, None))
            else:  # pragma: no cover - Core ML runs on macOS only
                if tensors is not None:
                    torch_run = run_torch(self.torch_model, tensors, set(self.module_vars.values()))
                ref_outs, dev_outs = self._measured(ref, feeds, torch_run)
            self._compare_outputs(ref_outs, dev_outs, torch_run, golden, onnx_out)
            self._record(feeds, dev_outs, torch_run)
            bar.update(len(self.cus))
        bar.close()
        return self._report(len(feeds_list))

    def _golden(self, tensors):
        """The FP64 run; FP64 weights made per module as it runs, or a full FP64 copy if needed."""
        while True:
            if self._double is None:
                try:
                    self._double, self._double_lazy = lazy_double_copy(self.torch_model), True
                except TypeError:  # not an eager module (TorchScript)
                    self._double, self._double_lazy = double_copy(self.torch_model), False
            try:
                return run_torch(self.torch_model, tensors, dtype=torch.float64, double_model=self._double)
            except Exception as exc:  # noqa: BLE001 - e.g. a model that casts to float32 itself
                if self._double_lazy:  # it reads weights across modules: a full FP64 copy
                    self._double, self._double_lazy = double_copy(self.torch_model), False
                    continue
                self.notes.add(f"the FP64 golden run failed ({type(exc).__name__}: {str(exc)[:120]}); "
                               "golden columns are empty")
                return None

    def _on_ref(self, step, name, value, torch_run):
        """Generator (it may wait for torch): FP16 range of a reference value, and its torch check."""
        if not _is_float(value):
            return
        self.ranges[name].add(value)
        module = self.module_vars.get(name)
        if module is not None and torch_run is not None:
            t = yield from torch_run.take(module)
            if t is None:
                return
            if t.numel() == value.numel():
                self.torch_layers[module].add(value.reshape(t.shape), t, classifier=False)
            else:
                self.torch_mismatch[module] = (tuple(value.shape), tuple(t.shape))

    def _lockstep(self, ref, devs, feeds, torch_run):
        ref_feeds = ref.prepare_inputs(feeds)
        for name, value in ref_feeds.items():
            if _is_float(value):
                self.ranges[name].add(value.numpy())
        dev_feeds = next(iter(devs.values())).prepare_inputs(feeds)
        for name, value in dev_feeds.items():  # the very reference tensors where equal: steps can be reused
            r = ref_feeds.get(name)
            if isinstance(r, torch.Tensor) and isinstance(value, torch.Tensor) and r.dtype == value.dtype \
                    and r.shape == value.shape and torch.equal(r, value):
                dev_feeds[name] = r
        interps = {cu: m.interpreter for cu, m in devs.items()}
        lock = Lockstep(ref.interpreter, interps, self.local, self.ref_of, reuse=self.reuse)
        bad_vars = {cu: set() for cu in self.cus}
        exact_vars = {cu: set() for cu in self.cus}  # values bit-identical to their reference

        def on_step(index, step, values, refs):
            in_names = list(var_input_names(step))
            ref_sums = {}  # per reference var, shared by every compute unit
            measured = {}  # id(value) -> its measurement: a value shared by units is measured once
            for cu, vals in values.items():
                device = interps[cu].main.steps[index].device
                inputs_bad = index in self.bad_consts or any(n in bad_vars[cu] for n in in_names)
                for (name, _, _), v in zip(step.outputs, vals):
                    if not _is_float(v):
                        self._compare_ints(cu, index, step, device, name, v, refs.get(self.ref_of.get(name)),
                                           in_names)
                        continue
                    st = self.stats[cu][name]
                    st.meta = (index, step.op.name, step.op.op_type, device, tuple(in_names))
                    self.shapes[name] = tuple(v.shape)
                    r = refs.get(self.ref_of.get(name))
                    m = measured.get(id(v))
                    if m is None:
                        m = measured[id(v)] = self._measure(v, r, name, ref_sums)
                    top, finite, acc, hist = m
                    st.max_abs = max(st.max_abs, top)
                    if not finite:
                        bad_vars[cu].add(name)
                        st.nonfinite = True
                        st.nonfinite_from_inputs = st.nonfinite_from_inputs or inputs_bad
                        self.first_nonfinite.setdefault(cu, name)
                    if acc is not None:
                        st.acc.merge(acc)
                        st.hist.merge(hist)
                        if acc.max_abs == 0 and not (acc.n_nonfinite or acc.ref_nonfinite) \
                                and v.dtype == r.dtype and v.shape == r.shape:
                            exact_vars[cu].add(name)
            if self.local and not step.blocks:
                # a unit whose inputs all equal the reference already ran this op on them
                rerun = [cu for cu in self.cus if not (self.reuse and all(n in exact_vars[cu] for n in in_names))]
                for cu in set(self.cus) - set(rerun):
                    for (name, _, _), v in zip(step.outputs, values[cu]):
                        m = measured.get(id(v))
                        if m is not None and m[2] is not None:
                            self.stats[cu][name].local.merge(m[2])
                self._local(index, rerun, in_names, refs, interps, ref_sums,
                            {cu: lock.same[cu][index] for cu in rerun})
            self._diverge(step, values, measured)

        return (yield from lock.run(ref_feeds, dev_feeds, on_step, lambda s, n, v: self._on_ref(s, n, v, torch_run)))

    @staticmethod
    def _measure(v, r, name, ref_sums):
        """(max |v|, all finite, error vs reference, error histogram) of one diagnosed value."""
        if not (_is_float(r) and r.numel() == v.numel()):
            return (*_max_abs(v), None, None)
        rs = ref_sums.get(name)
        if rs is None:
            rs = ref_sums[name] = reference_sums(r)
        if v is r and math.isfinite(rs[0]):  # the reference's own tensor (a reused step): all finite
            top, finite = rs[1], True
        else:
            top, finite = _max_abs(v)
        acc, hist = ErrorStats(), ErrorHistogram()
        acc.add(v, r, classifier=False, ref_sums=rs, hist=hist)
        return top, finite, acc, hist

    def _compare_ints(self, cu, index, step, device, name, v, r, in_names) -> None:
        """Integer outputs (top-k indices, masks): how many elements differ from the reference."""
        if not isinstance(v, torch.Tensor) or not isinstance(r, torch.Tensor) or r.numel() != v.numel():
            return
        st = self.stats[cu][name]
        st.meta = (index, step.op.name, step.op.op_type, device, tuple(in_names))
        self.shapes[name] = tuple(v.shape)
        st.ints += v.numel()
        differ = int((v.reshape(-1).to(torch.int64) != r.reshape(-1).to(torch.int64)).sum())
        st.ints_differ += differ
        if differ:
            if any(n in self.int_bad[cu] for n in in_names):
                st.ints_from_inputs = True
            self.int_bad[cu].add(name)

    def _diverge(self, step, values: dict, measured: dict) -> None:
        """Divergence between every pair of compute units for this step's outputs (each distinct
        pair of values measured once: units sharing a value diverge alike)."""
        cus = list(values)
        done: dict = {}
        for i, a in enumerate(cus):
            for b in cus[i + 1:]:
                for (name, _, _), va, vb in zip(step.outputs, values[a], values[b]):
                    if _is_float(va) and _is_float(vb) and va.shape == vb.shape:
                        key = (id(va), id(vb))
                        if key not in done:
                            m = measured.get(id(vb))
                            done[key] = DiffStats.measure(va, vb, max_b=m[0] if m is not None else None)
                        self.pairs[(a, b, name)].merge(done[key])

    def _local(self, index, cus, in_names, refs, interps, ref_sums, same: dict):
        """Op ``index`` alone on the reference inputs rounded to its storage dtype, on each of ``cus``,
        once per distinct run. ``same``: per unit, the reference step computing exactly this op
        (its outputs are the local run when the inputs are the reference's own tensors)."""
        rounded: dict = {}  # (reference var, dtype) -> rounded value (None: it overflows)
        runs: dict = {}     # share key -> [step, inputs, units, outputs if already known]
        for cu in cus:
            cstep = interps[cu].main.steps[index]
            env = self._local_inputs(cu, in_names, refs, rounded)
            if env is None:
                continue
            twin = same.get(cu)
            if twin is not None and all(env[n] is refs.get(self.ref_of.get(n)) for n in in_names):
                outs = [refs.get(name) for name, _, _ in twin.outputs]
                if all(o is not None for o in outs):
                    runs.setdefault(("reference", id(twin)), [cstep, env, [], outs])[2].append(cu)
                    continue
            key = share_key(cstep, env, tuple(in_names)) if self.reuse else None
            runs.setdefault(key if key is not None else (cu,), [cstep, env, [], None])[2].append(cu)
        for cstep, env, members, local_vals in runs.values():
            try:
                if local_vals is None:
                    local_vals = cstep.run(env)
            except Exception:  # noqa: BLE001 - e.g. an op whose shapes only line up with device values
                continue
            for (name, _, _), lv in zip(cstep.outputs, local_vals):
                r = refs.get(self.ref_of.get(name))
                if _is_float(lv) and _is_float(r) and r.numel() == lv.numel():
                    delta = ErrorStats()
                    delta.add(lv, r, classifier=False, ref_sums=ref_sums.get(name))
                    for cu in members:
                        self.stats[cu][name].local.merge(delta)

    def _local_inputs(self, cu, in_names, refs, rounded) -> dict | None:
        """The op's inputs for a local run on ``cu``; None if one has no reference value or overflows."""
        env = {}
        storage = self.storage[cu]
        for name in in_names:
            key = self.ref_of.get(name)
            r = refs.get(key)
            if r is None:
                return None  # an input without reference value: no local measurement
            dt = storage.get(name)
            if dt is not None and _is_float(r) and r.dtype != dt:
                if (key, dt) not in rounded:
                    x = r.to(dt)
                    if max_abs(r) > FP16_MAX and not bool(torch.isfinite(x).all()) and bool(torch.isfinite(r).all()):
                        x = None  # the input itself overflows its storage: that is its producer's error
                    rounded[(key, dt)] = x
                r = rounded[(key, dt)]
                if r is None:
                    return None
            env[name] = r
        return env

    def _measured(self, ref, feeds, torch_run):  # pragma: no cover - macOS only
        """Core ML runs: outputs and the intermediates Core ML returns, against the reference run."""
        keep = {}

        def on_ref(r):
            if isinstance(r.value, np.ndarray) and np.issubdtype(r.value.dtype, np.floating):
                keep[r.name] = np.array(r.value, copy=True)
                drain(self._on_ref(None, r.name, torch.from_numpy(keep[r.name]), torch_run))

        ref_outs = ref.predict(feeds, on_op=on_ref)
        dev_outs = {}
        for _order, cu in enumerate(self.cus):
            runtime = rt.make_runtime(self.conv.mlmodel, cu, "coreml")
            counter = iter(range(10 ** 9))

            def on_dev(r, cu=cu, counter=counter):
                st = self.stats[cu][r.name]
                st.meta = (next(counter), r.op_name, r.op_type, "coreml", ())
                val = np.asarray(r.value, dtype=np.float64)
                m, finite = _max_abs(val)
                st.max_abs = max(st.max_abs, m)
                if not finite:
                    st.nonfinite = True
                    self.first_nonfinite.setdefault(cu, r.name)
                want = keep.get(self.ref_of.get(r.name))
                if want is not None and want.size == val.size:
                    st.acc.add(val, want.reshape(val.shape), classifier=False)
                    st.hist.add(val, want.reshape(val.shape))

            dev_outs[cu] = runtime.predict(feeds, on_op=on_dev)
        return ref_outs, dev_outs

    def _record(self, feeds, dev_outs, torch_run) -> None:
        """Keep each input and each unit's outputs: small, and what two machines' runs are compared by."""
        self.runs["inputs"].append({k: np.array(v, copy=True) for k, v in feeds.items()})
        for cu in self.cus:
            outs = {}
            for name in self.output_names:
                v = dev_outs[cu].get(name)
                if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
                    outs[name] = v.detach().float().numpy().copy() if v.is_floating_point() else v.numpy().copy()
            self.runs["outputs"].setdefault(cu, []).append(outs)
        if torch_run is not None:
            self.runs["torch"].append({n: np.asarray(o) for n, o in zip(self.output_names, torch_run.outputs)})

    def _compare_outputs(self, ref_outs, dev_outs, torch_run, golden, onnx_out):
        tvals = torch_run.outputs if torch_run is not None else None
        gvals = golden.outputs if golden is not None else None
        for i, name in enumerate(self.output_names):
            t = tvals[i] if tvals is not None and i < len(tvals) else None
            g = gvals[i] if gvals is not None and i < len(gvals) else None
            r32 = ref_outs.get(self.ref_of.get(name, name))
            r32 = r32.detach().numpy() if isinstance(r32, torch.Tensor) else r32
            want = t if t is not None else r32
            for cu in self.cus:
                d = dev_outs[cu].get(name)
                d = d.detach().numpy() if isinstance(d, torch.Tensor) else d
                if not isinstance(d, np.ndarray) or not np.issubdtype(d.dtype, np.number):
                    continue
                self.shapes[("output", name)] = tuple(d.shape)
                if want is not None and np.size(want) == d.size:
                    self.outputs[(cu, name)].add(d, np.reshape(want, d.shape))
                    self.output_hist[(cu, name)].add(d, np.reshape(want, d.shape))
                if g is not None and np.size(g) == d.size:
                    self.outputs_golden[(cu, name)].add(d, np.reshape(g, d.shape))
            base = g if g is not None else t
            if base is None:
                continue
            if isinstance(r32, np.ndarray) and r32.size == np.size(base):
                self.references[("fp32 program (emulated, exact)", name)].add(r32, np.reshape(base, r32.shape))
            if t is not None and g is not None:
                self.references[("torch fp32", name)].add(t, g)
            if onnx_out is not None and i < len(onnx_out) and np.size(onnx_out[i]) == np.size(base):
                self.references[("onnxruntime", name)].add(onnx_out[i], np.reshape(base, np.shape(onnx_out[i])))

    # ---------------------------------------------------------------- report
    def _report(self, n_inputs: int) -> Report:
        import pandas as pd

        module_output_of = self.module_vars
        layer_rows = []
        for cu in self.cus:
            for name, st in self.stats[cu].items():
                if st.meta is None:
                    continue
                index, op_name, op_type, device, in_names = st.meta
                acc = st.acc.result() if st.acc.n else {}
                loc = st.local.result() if st.local.n else {}
                key = self.ref_of.get(name)
                mod_out = module_output_of.get(key)
                tl = self.torch_layers[mod_out].result() if mod_out in self.torch_layers else {}
                nan = math.nan
                layer_rows.append({
                    "compute_unit": cu, "runtime": self.kind, "index": index, "op": op_name, "output": name,
                    "op_type": op_type, "module": self.layer_map.module_of(name), "module_output": mod_out,
                    "device": device, "shape": self.shapes.get(name), "max_abs": st.max_abs,
                    "max_abs_err": acc.get("max_abs_err", nan), "mean_abs_err": acc.get("mean_abs_err", nan),
                    "rel_err": acc.get("rel_err", nan), "snr_db": acc.get("snr_db", nan),
                    "psnr_db": acc.get("psnr_db", nan), "cosine": acc.get("cosine", nan),
                    "nonfinite_frac": acc.get("nonfinite_frac", 1.0 if st.nonfinite else 0.0),
                    "nonfinite_onset": st.nonfinite and not st.nonfinite_from_inputs,
                    "local_max_abs_err": loc.get("max_abs_err", nan), "local_rel_err": loc.get("rel_err", nan),
                    "local_snr_db": loc.get("snr_db", nan), "torch_rel_err": tl.get("rel_err", nan),
                    "inputs": ",".join(in_names), "reference": key if (st.acc.n or st.ints) else None,
                    "int_mismatch_frac": st.ints_differ / st.ints if st.ints else nan,
                    "int_mismatch_onset": bool(st.ints_differ) and not st.ints_from_inputs,
                })
        layers = pd.DataFrame(layer_rows, columns=Report.LAYER_COLUMNS)
        if len(layers):
            layers = layers.sort_values(["compute_unit", "index"], kind="stable").reset_index(drop=True)
        fp16_range = pd.DataFrame(self._range_rows(), columns=Report.RANGE_COLUMNS)
        out_rows = []
        for cu in self.cus:
            for name in self.output_names:
                if (cu, name) not in self.outputs:
                    continue
                res = self.outputs[(cu, name)].result()
                gold = self.outputs_golden[(cu, name)].result() if (cu, name) in self.outputs_golden else {}
                out_rows.append({"compute_unit": cu, "runtime": self.kind, "output": name,
                                 "shape": self.shapes.get(("output", name)), **res,
                                 "golden_max_abs_err": gold.get("max_abs_err", math.nan),
                                 "golden_rel_err": gold.get("rel_err", math.nan)})
        outputs = pd.DataFrame(out_rows, columns=Report.OUTPUT_COLUMNS)
        references = pd.DataFrame([{"reference": k[0], "output": k[1], **v.result()}
                                   for k, v in self.references.items()], columns=Report.REFERENCE_COLUMNS)
        onset = []
        for cu, name in self.first_nonfinite.items():
            st = self.stats[cu][name]
            index, op_name, op_type, device, _ = st.meta
            onset.append({"compute_unit": cu, "index": index, "op": op_name, "output": name, "op_type": op_type,
                          "module": self.layer_map.module_of(name), "device": device})
        torch_layers = pd.DataFrame([{"module": m, **s.result()} for m, s in self.torch_layers.items()]
                                    + [{"module": m, "shape_mismatch": f"{a} vs torch {b}"}
                                       for m, (a, b) in self.torch_mismatch.items()])
        div_rows = []
        first = self.stats[self.cus[0]] if self.cus else {}
        for (a, b, name), st in self.pairs.items():
            meta = first[name].meta if name in first and first[name].meta else (math.nan, "", "", "", ())
            div_rows.append({"pair": f"{a} vs {b}", "index": meta[0], "op": meta[1], "output": name,
                             "op_type": meta[2], "module": self.layer_map.module_of(name), **st.result()})
        divergence = pd.DataFrame(div_rows, columns=Report.DIVERGENCE_COLUMNS)
        histograms = {("layer", cu, name): st.hist.to_dict() for cu in self.cus for name, st in self.stats[cu].items()
                      if st.hist.counts.sum() or st.hist.exact or st.hist.nonfinite}
        histograms.update({("output", cu, name): h.to_dict() for (cu, name), h in self.output_hist.items()})
        return Report(
            layers=layers, outputs=outputs, fp16_range=fp16_range, references=references,
            first_nonfinite=pd.DataFrame(onset, columns=Report.ONSET_COLUMNS), torch_layers=torch_layers,
            divergence=divergence,
            histograms=histograms, options=self.conv.options, compute_units=list(self.cus), runtime=self.kind,
            n_inputs=n_inputs, conversion=self.conv, messages=list(self.conv.messages),
            layer_source=self.layer_map.source, notes=sorted(self.notes), runs=self.runs,
            environment=environment(self.kind),
        )

    def _range_rows(self) -> list[dict]:
        rows = []
        weights = const_ranges(self.conv32.program)
        # a constant input's max |x| for inputs_max_abs (inf if it holds inf/NaN, as a value would be)
        const_max = {w["const"]: (math.inf if w["nonfinite_frac"] else w["max_abs"]) for w in weights}
        func = next(iter(self.conv32.program.functions.values()))
        for name in func.inputs:
            if name in self.ranges:
                rows.append({"index": -1, "op": "", "output": name, "op_type": "input", "kind": "input",
                             "module": None, "inputs_max_abs": math.nan, **self.ranges[name].result(), "used_by": ""})
        for index, op in enumerate(walk_ops(self.conv32.program, nested=False)):  # indices of top-level steps
            for v in op.outputs:
                if v.name not in self.ranges:
                    continue
                ins = [self.ranges[i.name].result()["max_abs"] for i in _var_inputs(op) if i.name in self.ranges]
                ins += [const_max.get(c.name, 0.0) for c in _const_inputs(op)]
                rows.append({"index": index, "op": op.name, "output": v.name, "op_type": op.op_type,
                             "kind": "activation", "module": self.ref_map.module_of(v.name),
                             "inputs_max_abs": max(ins) if ins else math.nan, **self.ranges[v.name].result(),
                             "used_by": ""})
        for c in weights:
            users = c.pop("used_by")
            mods = sorted({m for u in users for m in [self.ref_map.module_of(u)] if m})
            rows.append({"index": math.nan, "op": ", ".join(users), "output": c.pop("const"), "op_type": "const",
                         "kind": "weight", "module": ", ".join(mods) or None, "inputs_max_abs": math.nan,
                         **{k: c[k] for k in ("max_abs", "min_abs_nonzero", "overflow_frac", "subnormal_frac",
                                              "flush_frac", "nonfinite_frac", "elements")},
                         "used_by": ", ".join(users)})
        return rows


def _paired_layer_map(conv: Conversion, ref_map, ref_of: dict):
    """The diagnosed program's LayerMap: module chains of the reference vars it is paired with."""
    from .mapping import LayerMap, module_outputs

    if conv.layer_chains:
        return conv.layer_map()
    chains = {dev: ref_map.chains[ref] for dev, ref in ref_of.items() if ref in ref_map.chains}
    if not chains:
        return conv.layer_map()  # no mapping to borrow: scopes resolved against the module tree
    return LayerMap(chains=chains, module_outputs=module_outputs(conv.program, chains), source=ref_map.source)


#: mlmodel -> compute unit -> its compiled emulator (a re-run diagnosis compiles nothing again)
_EMULATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _emulated(mlmodel, profile, module_of):
    """The emulated model of ``mlmodel`` under a compute unit's profile; default profiles are
    compiled once per mlmodel (``module_of``, the conversion's op -> module mapping, is the same
    for one mlmodel, so the first one compiled is kept). Variants are compiled per diagnosis."""
    profile = get_profile(profile)
    if PROFILES.get(profile.compute_unit) != profile:
        return rt.EmulatorRuntime(mlmodel, profile, module_of=module_of).model
    per_unit = _EMULATED.setdefault(mlmodel, {})
    model = per_unit.get(profile.compute_unit)
    if model is None:
        model = per_unit[profile.compute_unit] = rt.EmulatorRuntime(mlmodel, profile, module_of=module_of).model
    return model


def _innermost_module_per_var(module_outputs: dict) -> dict:
    """var -> the innermost module whose output it carries (``blocks.11`` rather than ``blocks``)."""
    out: dict = {}
    for module, var in module_outputs.items():
        if var not in out or module.count(".") > out[var].count(".") or (
                module.count(".") == out[var].count(".") and len(module) > len(out[var])):
            out[var] = module
    return out


def _var_inputs(op):
    for v in op.inputs.values():
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            if x.op is None or x.op.op_type != "const":
                yield x


def _const_inputs(op):
    for v in op.inputs.values():
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            if x.op is not None and x.op.op_type == "const":
                yield x


def _storage_table(interp) -> dict:
    """var name -> torch dtype it is held in, for every top-level var of an interpreter."""
    table = {}
    for step in interp.main.steps:
        for name, _, storage in step.outputs:
            table[name] = storage
    return table
