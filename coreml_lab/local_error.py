"""Local error: each op of the diagnosed program re-run alone on the reference inputs rounded to its storage dtype.

A layer that only inherits error from its inputs is not to blame; one whose op alone loses
precision is. The re-runs are shared where they provably compute the same
(:func:`~.emulator.lockstep.share_key`), and a unit whose inputs already equal the reference's
takes its own device run as the local run. A compressed weight (a ``constexpr_*`` op's output,
which the uncompressed FP32 reference does not have) enters the re-run as the unit decompressed
it: the op's local error then includes what its compressed weights cost; given the original
weights (``originals``), the op is re-run once more with them, at the same precision, into
``uncompressed``: the precision's share of its local error. A re-run that fails is reported, never dropped:
a note in the Report names the op, the units and the reason.
"""

from __future__ import annotations

import weakref

import torch

from .emulator.lockstep import share_key, var_input_names
from .fp16 import FP16_MAX
from .metrics import ErrorStats, max_abs
from .statistics import Statistics, StepState, is_float


def storage_table(interp) -> dict:
    """var name -> torch dtype it is held in, for every top-level var of an interpreter."""
    table = {}
    for step in interp.main.steps:
        for name, _, storage in step.outputs:
            table[name] = storage
    return table


class LocalErrors:
    """The local re-runs of one diagnosis, recorded into ``stats`` (``OpStats.local``)."""

    def __init__(self, stats: Statistics, interpreters: dict, reuse: bool = True, originals: dict | None = None,
                 uncompressed: dict | None = None):
        self.stats = stats
        self.ref_of = stats.ref_of
        self.interpreters = interpreters  # unit -> emulator interpreter
        self.storage = {cu: storage_table(interp) for cu, interp in interpreters.items()}
        self.reuse = reuse
        #: unit -> var -> decompressed weight (constexpr_* outputs: constants with no reference var)
        self.weights: dict = {cu: {} for cu in interpreters}
        #: compressed weight var -> its uncompressed value; (unit, output var) -> ErrorStats of the op
        #: re-run alone with those (kept by the caller across inputs)
        self.originals = originals or {}
        self.uncompressed = uncompressed if uncompressed is not None else {}

    def measure(self, index: int, step, values: dict, refs: dict, state: StepState, exact: dict,
                same: dict) -> None:
        """The local error of step ``index`` on every unit. ``exact``: per unit, vars bit-identical to
        their reference; ``same``: per unit, the reference step computing exactly this op (or None)."""
        in_names = var_input_names(step)
        units = self.stats.units
        if step.op.op_type.startswith("constexpr_"):
            for cu in units:
                for (name, _, _), v in zip(step.outputs, values[cu]):
                    self.weights[cu][name] = v
        # a unit whose inputs all equal the reference already ran this op on them
        rerun = [cu for cu in units if not (self.reuse and all(n in exact[cu] for n in in_names))]
        for cu in set(units) - set(rerun):
            for (name, _, _), v in zip(step.outputs, values[cu]):
                m = state.measured.get(id(v))
                if m is not None and m.error is not None:
                    self.stats.ops[cu][name].local.merge(m.error)
        self._rerun(index, rerun, in_names, refs, state.ref_sums, {cu: same[cu] for cu in rerun})

    def run_alone(self, step, env: dict) -> list:
        """One op on given inputs (the local run): the step's own kernel under its unit's profile."""
        return step.run(env)

    def _rerun(self, index, units, in_names, refs, ref_sums, same: dict) -> None:
        """Op ``index`` alone on the reference inputs rounded to its storage dtype, on each of ``units``,
        once per distinct run."""
        rounded: dict = {}  # (reference var, dtype) -> rounded value (None: it overflows)
        runs: dict = {}     # share key -> [step, inputs, units, outputs if already known]
        for cu in units:
            cstep = self.interpreters[cu].main.steps[index]
            env = self._inputs(cu, in_names, refs, rounded)
            if env is None:
                continue
            odd = _shape_mismatch(cstep.op, env)
            if odd:
                self.stats.notes.add(
                    f"local error of {cstep.op.op_type} {cstep.op.name!r} on {cu} not measured (its local_* columns "
                    f"are empty): its input {odd[0]!r} (shape {odd[1]}) pairs with a reference value of shape {odd[2]}, "
                    "so the op cannot run alone on reference inputs; its accumulated error is measured as usual")
                continue
            twin = same.get(cu)
            if twin is not None and all(env[n] is refs.get(self.ref_of.get(n)) for n in in_names):
                outs = [refs.get(name) for name, _, _ in twin.outputs]
                if all(o is not None for o in outs):
                    runs.setdefault(("reference", id(twin)), [cstep, env, [], outs])[2].append(cu)
                    continue
            key = share_key(cstep, env, in_names) if self.reuse else None
            runs.setdefault(key if key is not None else (cu,), [cstep, env, [], None])[2].append(cu)
        for cstep, env, members, local_vals in runs.values():
            if local_vals is None:
                try:
                    local_vals = self.run_alone(cstep, env)
                except Exception as exc:  # noqa: BLE001 - e.g. an op whose shapes only line up with device values
                    self.stats.notes.add(
                        f"local error of {cstep.op.op_type} {cstep.op.name!r} on {', '.join(members)} not measured "
                        f"(its local_* columns are empty): the op alone on the reference inputs failed with "
                        f"{type(exc).__name__}: {str(exc)[:160]}")
                    continue
            self._record(cstep, local_vals, refs, ref_sums, members, lambda cu, name: self.stats.ops[cu][name].local)
            swapped = [n for n in in_names if n in self.originals and n in env]
            if swapped:  # the same op with its original weights, at the same precision
                plain = dict(env)
                for n in swapped:
                    plain[n] = torch.as_tensor(self.originals[n]).to(env[n].dtype).reshape(env[n].shape)
                try:
                    plain_vals = self.run_alone(cstep, plain)
                except Exception as exc:  # noqa: BLE001 - reported, as above
                    self.stats.notes.add(f"the uncompressed local error of {cstep.op.name!r} was not measured: "
                                         f"{type(exc).__name__}: {str(exc)[:160]}")
                    continue
                self._record(cstep, plain_vals, refs, ref_sums, members,
                             lambda cu, name: self.uncompressed.setdefault((cu, name), ErrorStats()))

    def _record(self, cstep, local_vals, refs, ref_sums, members, target) -> None:
        """Each float output of a local run against its reference, merged into ``target(unit, var)``."""
        for (name, _, _), lv in zip(cstep.outputs, local_vals):
            r = refs.get(self.ref_of.get(name))
            if is_float(lv) and is_float(r) and r.numel() == lv.numel():
                delta = ErrorStats()
                delta.add(lv, r, classifier=False, ref_sums=ref_sums.get(name))
                for cu in members:
                    target(cu, name).merge(delta)

    def _inputs(self, cu, in_names, refs, rounded) -> dict | None:
        """The op's inputs for a local run on ``cu``; None if one has no reference value or overflows."""
        env = {}
        storage = self.storage[cu]
        for name in in_names:
            key = self.ref_of.get(name)
            r = refs.get(key)
            if r is None and name in self.weights[cu]:
                env[name] = self.weights[cu][name]  # a compressed weight, as the unit decompressed it
                continue
            if r is None:
                return None  # an input without reference value: no local measurement
            dt = storage.get(name)
            if dt is not None and is_float(r) and r.dtype != dt:
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


def _shape_mismatch(op, env: dict) -> tuple | None:
    """(input name, declared shape, reference shape) of the first input whose statically declared
    shape differs from the reference value it is paired with; None when all agree."""
    for name, shape in _static_shapes(op):
        value = env.get(name)
        if isinstance(value, torch.Tensor) and shape != tuple(value.shape) and value.numel() != 1:
            return name, shape, tuple(value.shape)
    return None


#: op -> its inputs' statically declared shapes (a MIL var works its shape out anew on every read)
_STATIC_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_shapes(op) -> tuple:
    shapes = _STATIC_SHAPES.get(op)
    if shapes is None:
        found = []
        for var in op.inputs.values():
            for v in (var if isinstance(var, (list, tuple)) else (var,)):
                shape = getattr(v, "shape", None)
                if shape is not None and all(isinstance(d, int) for d in shape):
                    found.append((v.name, tuple(shape)))
        shapes = _STATIC_SHAPES[op] = tuple(found)
    return shapes

