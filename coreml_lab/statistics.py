"""Statistics of a diagnosis, gathered as values stream past: per op output, per model output, per pair of units.

Nothing here runs a model: :mod:`.diagnosis` runs them (in :class:`~.emulator.lockstep.Lockstep`)
and hands each value over once; :class:`Statistics` keeps running sums (:mod:`.metrics`), never
the tensors. :meth:`.report.Report.from_statistics` turns them into the Report's tables.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .emulator.program import walk_ops
from .fp16 import RangeStats, const_ranges
from .metrics import DiffStats, ErrorHistogram, ErrorStats, largest_finite, max_abs, reference_sums
from .output_statistics import OutputStatistics
from .pairing import ProgramPairing


class StepInfo(NamedTuple):
    """Where an op output sits: program order, the op, where it ran, its var inputs."""

    index: int
    op: str
    op_type: str
    device: str
    inputs: tuple = ()


class Measurement(NamedTuple):
    """One diagnosed value measured: its largest finite |value|, whether all of it is finite, and
    (when it has a reference value) its error and error histogram against it."""

    max_abs: float
    finite: bool
    error: ErrorStats | None = None
    histogram: ErrorHistogram | None = None


@dataclass(slots=True)
class OpStats:
    """Everything accumulated for one (compute unit, output var)."""

    info: StepInfo | None = None                      # None until the var is seen
    acc: ErrorStats = field(default_factory=ErrorStats)      # accumulated error vs the reference
    local: ErrorStats = field(default_factory=ErrorStats)    # the op alone on exact inputs
    hist: ErrorHistogram = field(default_factory=ErrorHistogram)
    max_abs: float = 0.0
    nonfinite: bool = False              # the device value had inf/NaN
    nonfinite_from_inputs: bool = False  # ... and so did one of the op's inputs
    ints: int = 0                        # integer outputs (indices, masks): elements compared
    ints_differ: int = 0                 # ... and how many differ from the reference
    ints_from_inputs: bool = False       # ... while an integer input already differed


@dataclass
class StepState:
    """What one step's measurements share: reference sums per reference var (shared by every
    unit) and measurements per value (a value several units share is measured once)."""

    ref_sums: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)  # id(value) -> Measurement


@dataclass
class RunState:
    """Per unit, across one input's run: vars holding inf/NaN, and vars bit-identical to their reference."""

    nonfinite: dict
    exact: dict

    @classmethod
    def of(cls, units) -> RunState:
        return cls({cu: set() for cu in units}, {cu: set() for cu in units})


def is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def max_abs_finite(a) -> tuple[float, bool]:
    """(largest finite |value|, whether every value is finite) of a tensor or array."""
    a = torch.as_tensor(a)
    if not a.numel():
        return 0.0, True
    m = max_abs(a)
    return (m, True) if math.isfinite(m) else (largest_finite(a), False)


@dataclass(frozen=True)
class Measures:
    """The two whole-tensor reductions every per-value statistic starts from.

    A benchmark swaps in no-ops (``Measures(lambda a: (0.0, True), lambda r: (0.0, 0.0))``) with
    :func:`measuring` to time a diagnosis's runs without its statistics; results are then meaningless.
    """

    #: tensor -> (largest finite |value|, all finite)
    max_abs: Callable = max_abs_finite
    #: reference tensor -> the sums the error statistics reuse (:func:`.metrics.reference_sums`)
    reference_sums: Callable = reference_sums


_MEASURES = [Measures()]


@contextmanager
def measuring(measures: Measures):
    """Use ``measures`` for every diagnosis inside the ``with`` block (see :class:`Measures`)."""
    _MEASURES.append(measures)
    try:
        yield measures
    finally:
        _MEASURES.remove(measures)


def measure_value(v, r, name: str, ref_sums: dict) -> Measurement:
    """A diagnosed value ``v`` against its reference value ``r`` (None: no reference)."""
    measures = _MEASURES[-1]
    if not (is_float(r) and r.numel() == v.numel()):
        return Measurement(*measures.max_abs(v))
    rs = ref_sums.get(name)
    if rs is None:
        rs = ref_sums[name] = measures.reference_sums(r)
    if v is r and math.isfinite(rs[0]):  # the reference's own tensor (a reused step): all finite
        top, finite = rs[1], True
    else:
        top, finite = measures.max_abs(v)
    acc, hist = ErrorStats(), ErrorHistogram()
    acc.add(v, r, classifier=False, ref_sums=rs, hist=hist)
    return Measurement(top, finite, acc, hist)


#: interpreter -> indices of its steps with a non-finite constant input (weights do not change)
_NONFINITE_CONSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def steps_with_nonfinite_consts(interp) -> set:
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


class Statistics:
    """The running statistics of one diagnosis (every input, every compute unit)."""

    def __init__(self, units: list[str], pairing: ProgramPairing, output_names: list[str], reference_program,
                 golden="auto"):
        self.units = units
        self.pairing = pairing
        self.ref_of = pairing.ref_of
        self.output_names = output_names
        self.reference_program = reference_program
        self.ops = {cu: defaultdict(OpStats) for cu in units}  # unit -> var -> OpStats
        self.ranges = defaultdict(RangeStats)              # reference var -> FP16 range
        self.torch_layers = defaultdict(ErrorStats)        # module -> FP32 program vs torch
        self.torch_mismatch: dict = {}                     # module -> (program shape, torch shape)
        self.first_nonfinite: dict = {}                    # unit -> first var with inf/NaN
        #: model outputs against torch FP32 and, where needed, the FP64 golden run
        self.model_outputs = OutputStatistics(units, output_names, golden)
        self.pairs = defaultdict(DiffStats)                # (unit a, unit b, var) -> divergence
        self.int_bad = {cu: set() for cu in units}         # integer vars that differ from the reference
        self.shapes: dict = {}
        self.notes: set = set()
        self.runs = {"inputs": [], "outputs": {}, "torch": []}
        #: per decoding step (``diagnose(steps=...)``): finished rows (Report.STEP_COLUMNS), the open step's sums
        self.step_rows: list[tuple] = []
        self._step: dict | None = None               # (unit, kind, name) -> ErrorStats of the open step
        self._layer_index: dict = {}                 # module -> program index of its first op

    # ---------------------------------------------------------------- per step
    def begin_step(self) -> None:
        """Open a decoding step: until :meth:`end_step`, every measurement also counts for this step alone."""
        self._step = defaultdict(ErrorStats)

    def compare_states(self, unit_states: dict, want: dict) -> None:
        """Each unit's state tensors after a step (unit -> state name -> tensor) against ``want``
        (state name -> torch's cache, or the reference program's state)."""
        for cu, states in unit_states.items():
            for name, value in states.items():
                w = want.get(name)
                if w is not None and self._step is not None:
                    self._step[(cu, "state", name)].add(_as_numpy(value), np.reshape(_as_numpy(w), value.shape))

    def end_step(self, step: int) -> None:
        """Close step ``step``: one row per (unit, output / state / layer), scalars only."""
        for (cu, kind, name), es in (self._step or {}).items():
            if not es.n:
                continue
            res = es.result()
            # a tuple in Report.STEP_COLUMNS order: the one thing that grows with the steps, kept small
            self.step_rows.append((step, cu, name, kind, self._layer_index.get(name, -1) if kind == "layer" else -1,
                                   res["max_abs_err"], res["rel_err"], res["nonfinite_frac"]))
        self._step = None

    # ---------------------------------------------------------------- reference values
    def add_input_ranges(self, ref_feeds: dict) -> None:
        for name, value in ref_feeds.items():
            if is_float(value):
                self.ranges[name].add(value.numpy())

    def on_reference(self, name: str, value, torch_run):
        """Generator (it may wait for torch): FP16 range of a reference value, and its torch check."""
        if not is_float(value):
            return
        self.ranges[name].add(value)
        module = self.pairing.module_vars.get(name)
        if module is not None and torch_run is not None:
            t = yield from torch_run.take(module)
            if t is None:
                return
            if t.numel() == value.numel():
                self.torch_layers[module].add(value.reshape(t.shape), t, classifier=False)
            else:
                self.torch_mismatch[module] = (tuple(value.shape), tuple(t.shape))

    # ---------------------------------------------------------------- diagnosed values
    def add_unit_step(self, cu: str, info: StepInfo, step, values: list, refs: dict, state: StepState,
                      run: RunState, inputs_bad: bool) -> None:
        """One unit's output values of one step, against the reference values ``refs``."""
        for (name, _, _), v in zip(step.outputs, values):
            r = refs.get(self.ref_of.get(name))
            if not is_float(v):
                self.compare_ints(cu, info, name, v, r)
                continue
            st = self.ops[cu][name]
            st.info = info
            self.shapes[name] = tuple(v.shape)
            m = state.measured.get(id(v))
            if m is None:
                m = state.measured[id(v)] = measure_value(v, r, name, state.ref_sums)
            st.max_abs = max(st.max_abs, m.max_abs)
            if not m.finite:
                run.nonfinite[cu].add(name)
                st.nonfinite = True
                st.nonfinite_from_inputs = st.nonfinite_from_inputs or inputs_bad
                self.first_nonfinite.setdefault(cu, name)
            if m.error is not None:
                if self._step is not None:
                    module = self.pairing.layer_map.module_of(name)
                    if module is not None:
                        module = module or "(model)"
                        self._layer_index.setdefault(module, info.index)
                        self._step[(cu, "layer", module)].merge(m.error)
                st.acc.merge(m.error)
                st.hist.merge(m.histogram)
                if m.error.max_abs == 0 and not (m.error.n_nonfinite or m.error.ref_nonfinite) \
                        and v.dtype == r.dtype and v.shape == r.shape:
                    run.exact[cu].add(name)

    def compare_ints(self, cu: str, info: StepInfo, name: str, v, r) -> None:
        """Integer outputs (top-k indices, masks): how many elements differ from the reference."""
        if not isinstance(v, torch.Tensor) or not isinstance(r, torch.Tensor) or r.numel() != v.numel():
            return
        st = self.ops[cu][name]
        st.info = info
        self.shapes[name] = tuple(v.shape)
        st.ints += v.numel()
        differ = int((v.reshape(-1).to(torch.int64) != r.reshape(-1).to(torch.int64)).sum())
        st.ints_differ += differ
        if differ:
            if any(n in self.int_bad[cu] for n in info.inputs):
                st.ints_from_inputs = True
            self.int_bad[cu].add(name)

    def diverge(self, step, values: dict, state: StepState) -> None:
        """Divergence between every pair of compute units for this step's outputs (each distinct
        pair of values measured once: units sharing a value diverge alike)."""
        units = list(values)
        done: dict = {}
        for i, a in enumerate(units):
            for b in units[i + 1:]:
                for (name, _, _), va, vb in zip(step.outputs, values[a], values[b]):
                    if is_float(va) and is_float(vb) and va.shape == vb.shape:
                        key = (id(va), id(vb))
                        if key not in done:
                            m = state.measured.get(id(vb))
                            done[key] = DiffStats.measure(va, vb, max_b=m.max_abs if m is not None else None)
                        self.pairs[(a, b, name)].merge(done[key])

    def add_measured(self, cu: str, index: int, record, want) -> None:
        """A value Core ML returned (an :class:`~.emulator.interpreter.OpRecord`) against ``want``,
        its reference value (None: none)."""
        st = self.ops[cu][record.name]
        st.info = StepInfo(index, record.op_name, record.op_type, "coreml", ())
        val = np.asarray(record.value, dtype=np.float64)
        m, finite = _MEASURES[-1].max_abs(val)
        st.max_abs = max(st.max_abs, m)
        if not finite:
            st.nonfinite = True
            self.first_nonfinite.setdefault(cu, record.name)
        if want is not None and want.size == val.size:
            st.acc.add(val, want.reshape(val.shape), classifier=False)
            st.hist.add(val, want.reshape(val.shape))

    # ---------------------------------------------------------------- whole-model outputs
    def compare_outputs(self, ref_outs, dev_outs, torch_run, onnx_out) -> list[str]:
        """One input's model outputs against torch FP32 (:class:`~.output_statistics.OutputStatistics`);
        returns the outputs the golden FP64 run is needed for (empty: none)."""
        self.model_outputs.compare(ref_outs, dev_outs, torch_run, onnx_out, self.ref_of, self.shapes, self._step)
        return self.model_outputs.needs_golden()

    def compare_golden(self, golden, names) -> None:
        """The golden run (a TorchRun, None if it failed) for the outputs ``names`` of the input just compared."""
        self.model_outputs.compare_golden(golden.outputs if golden is not None else None, names)

    def finish_outputs(self) -> None:
        self.model_outputs.finish_input()

    def record_run(self, feeds, dev_outs, torch_run) -> None:
        """Keep each input and each unit's outputs: small, and what two machines' runs are compared by."""
        self.runs["inputs"].append({k: np.array(v, copy=True) for k, v in feeds.items()})
        for cu in self.units:
            outs = {}
            for name in self.output_names:
                v = dev_outs[cu].get(name)
                if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
                    outs[name] = v.detach().float().numpy().copy() if v.is_floating_point() else v.numpy().copy()
            self.runs["outputs"].setdefault(cu, []).append(outs)
        if torch_run is not None:
            self.runs["torch"].append({n: np.asarray(o) for n, o in zip(self.output_names, torch_run.outputs)})

    # ---------------------------------------------------------------- rows
    def range_rows(self) -> list[dict]:
        """The ``fp16_range`` table's rows: model inputs, the reference program's activations, its weights."""
        rows = []
        ref_map = self.pairing.ref_map
        weights = const_ranges(self.reference_program)
        # a constant input's max |x| for inputs_max_abs (inf if it holds inf/NaN, as a value would be)
        const_max = {w["const"]: (math.inf if w["nonfinite_frac"] else w["max_abs"]) for w in weights}
        func = next(iter(self.reference_program.functions.values()))
        for name in func.inputs:
            if name in self.ranges:
                rows.append({"index": -1, "op": "", "output": name, "op_type": "input", "kind": "input",
                             "module": None, "inputs_max_abs": math.nan, **self.ranges[name].result(), "used_by": ""})
        for index, op in enumerate(walk_ops(self.reference_program, nested=False)):  # indices of top-level steps
            for v in op.outputs:
                if v.name not in self.ranges:
                    continue
                ins = [self.ranges[i.name].result()["max_abs"] for i in _var_inputs(op) if i.name in self.ranges]
                ins += [const_max.get(c.name, 0.0) for c in _const_inputs(op)]
                rows.append({"index": index, "op": op.name, "output": v.name, "op_type": op.op_type,
                             "kind": "activation", "module": ref_map.module_of(v.name),
                             "inputs_max_abs": max(ins) if ins else math.nan, **self.ranges[v.name].result(),
                             "used_by": ""})
        for c in weights:
            users = c.pop("used_by")
            mods = sorted({m for u in users for m in [ref_map.module_of(u)] if m})
            rows.append({"index": math.nan, "op": ", ".join(users), "output": c.pop("const"), "op_type": "const",
                         "kind": "weight", "module": ", ".join(mods) or None, "inputs_max_abs": math.nan,
                         **{k: c[k] for k in ("max_abs", "min_abs_nonzero", "overflow_frac", "subnormal_frac",
                                              "flush_frac", "nonfinite_frac", "elements")},
                         "used_by": ", ".join(users)})
        return rows


def _as_numpy(v) -> np.ndarray:
    return v.detach().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32)


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
