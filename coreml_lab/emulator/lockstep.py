"""Lockstep runs: one program under several device profiles beside a reference program, op by op.

:class:`Lockstep` runs a reference interpreter (the exact FP32 program) and the diagnosed
program's interpreters (one per compute unit) step by step, handing each step's values to the
caller while the values it is compared with are alive; :class:`SharedRun` is its per-unit half,
the units advancing together.

A diagnosis runs the same program for every compute unit, and re-runs each op on
reference inputs. Much of that work is the same computation twice: the GPU and the
Neural Engine profiles both hold values in FP16, so an elementwise op (add, relu,
reshape ...) fed the same FP16 tensors gives the same tensor on both (convolutions and
matmuls differ: the Neural Engine adds the bias in FP16 and saturates at 2^15). :func:`numeric_signature` says what a step's result
depends on besides its input values; steps with equal signatures and the very same input
tensors are computed once and the result handed to each unit. Sharing is exact:
a shared value is bit for bit what each unit would have computed itself (the
tests run diagnoses with and without sharing and compare every number).
"""

from __future__ import annotations

import weakref
from collections import Counter

import numpy as np
import torch

from .interpreter import Interpreter, Step, release_converted
from .opcall import Const


def var_input_names(step: Step) -> tuple[str, ...]:
    """Names of the step's non-constant inputs, in input order (tuple members included)."""
    return tuple(s for s in step.sources() if isinstance(s, str))


def numeric_signature(step: Step, env) -> tuple | None:
    """Everything ``step``'s result depends on besides its input values (None: never shared).

    The op itself (its constants and parameters), the storage dtype of each output, and the
    precision fields the kernel uses (:attr:`..registry.Kernel.uses`); the compute dtype drops
    out for a ``compute_free_on_fp16`` kernel whose float inputs are all held in FP16. Steps
    with nested blocks (cond, while_loop) run other steps under their own profile and are
    never shared.
    """
    if step.blocks:
        return None
    p, k = step.precision, step.kernel
    uses = k.uses
    compute = p.compute if "compute" in uses and not (k.compute_free_on_fp16 and _float_inputs_fp16(step, env)) \
        else None
    return (id(step.op), tuple(s for _, _, s in step.outputs), compute,
            p.accumulate if "accumulate" in uses else None, step.hazards if "hazards" in uses else None)


def _float_inputs_fp16(step: Step, env) -> bool:
    for s in step.sources():
        if isinstance(s, Const):
            dt = np.asarray(s.value).dtype
            if dt.kind == "f" and dt != np.float16:
                return False
            continue
        v = env[s]
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float16:
            return False
    return True


def share_key(step: Step, env, names: tuple[str, ...]):
    """Key under which two units' runs of ``step`` give the same result (None: not shareable).

    Input values are compared by identity: every value compared is alive in its unit's
    environment, so an id cannot be reused while the key is in use.
    """
    sig = numeric_signature(step, env)
    if sig is None:
        return None
    return sig, tuple(id(env[n]) for n in names)


def same_computation(step: Step, other: Step, paired: dict) -> bool:
    """Whether ``step`` computes exactly what ``other`` (a step of another program) computes,
    given that each of its var inputs holds the value ``paired`` names in the other program.

    Same op type and kernel, same precision, output storage and hazards, paired var inputs,
    and constants of equal value in the dtype the kernel reads them in. Kernels that read
    the declared output type (cast, weight decompression) and steps with nested blocks are
    never the same. An FP16 program run on the CPU computes like its FP32 twin whenever the
    weights are exactly representable in FP16.
    """
    if (step.op.op_type != other.op.op_type or step.kernel is not other.kernel or step.blocks or other.blocks
            or step.kernel.family == "constexpr" or step.op.op_type == "cast"
            or step.precision != other.precision or step.hazards != other.hazards
            or bool(step.coerce) != bool(other.coerce) or step.nan_out != other.nan_out
            or [s for _, _, s in step.outputs] != [s for _, _, s in other.outputs]
            or set(step.inputs) != set(other.inputs)):
        return False
    compute = step.precision.compute_dtype
    for name, src in step.inputs.items():
        osrc = other.inputs[name]
        pairs = zip(src, osrc) if isinstance(src, tuple) and isinstance(osrc, tuple) and len(src) == len(osrc) \
            else [(src, osrc)] if not isinstance(src, tuple) and not isinstance(osrc, tuple) else None
        if pairs is None:
            return False
        for a, b in pairs:
            if isinstance(a, str) or isinstance(b, str):
                if not (isinstance(a, str) and isinstance(b, str) and paired.get(a) == b):
                    return False
            elif not _same_const(a, b, compute):
                return False
    return True


def _same_const(a: Const, b: Const, compute: torch.dtype) -> bool:
    va, vb = np.asarray(a.value), np.asarray(b.value)
    if va.shape != vb.shape:
        return False
    if va.dtype.kind == "f" and vb.dtype.kind == "f":
        # kernels read float constants in the compute dtype (a constant already in it is not copied)
        dt = torch.empty(0, dtype=compute).numpy().dtype
        return bool(np.array_equal(va.astype(dt, copy=False), vb.astype(dt, copy=False)))
    return va.dtype == vb.dtype and bool(np.array_equal(va, vb))


def _boundary(step: Step) -> bool:
    """Whether a step applies the Neural Engine's NaN boundary (interpreter: NaN in -> +inf, NaN out -> +0)."""
    return bool(getattr(step, "coerce", ())) or getattr(step, "nan_out", False)


def _nan_free(values) -> bool:
    return not any(isinstance(v, torch.Tensor) and v.is_floating_point() and bool(torch.isnan(v).any())
                   for v in values)


def _interchangeable(hit, step: Step, env, names) -> bool:
    """Whether the result ``hit`` (out, the step that computed it, its env) of a step with an equal
    signature and the same input tensors is also ``step``'s: always when both or neither apply the
    NE's NaN boundary; otherwise only when the boundary changed nothing (no NaN in or out)."""
    out, other, other_env = hit
    if _boundary(other) == _boundary(step):
        return True
    if _boundary(other):
        return not other.boundary_hit
    return _nan_free(out) and _nan_free(other_env[n] for n in names)


class SharedRun:
    """Runs interpreters of one MIL function (one per compute unit) step by step, sharing steps.

    ``start(feeds)``, then ``step(i)`` for each step index in order (it returns
    ``{unit: output values}``), then ``finish()`` for each unit's program outputs.
    :attr:`shared_steps` counts the unit-steps that reused another unit's result, and
    :attr:`reused_steps` those that a ``reuse`` hook supplied.
    """

    def __init__(self, interpreters: dict[str, Interpreter], share: bool = True):
        if not interpreters:
            raise ValueError("a lockstep run needs at least one compute unit's interpreter")
        self.interpreters = interpreters
        self.share = share
        self.plans = {cu: interp.main for cu, interp in interpreters.items()}
        first = next(iter(self.plans.values()))
        for plan in self.plans.values():
            if [s.op for s in plan.steps] != [s.op for s in first.steps]:
                raise ValueError("the compute units' interpreters do not run the same program (each unit must "
                                 "run one program, under its own profile)")
        self.n_steps = len(first.steps)
        self.names = [var_input_names(s) for s in first.steps]
        self.shared_steps = 0
        self.reused_steps = 0
        self.envs: dict = {}

    def start(self, feeds: dict[str, dict]) -> None:
        """Begin a run on each unit's feeds (unit -> input name -> tensor)."""
        self.envs = {cu: {name: feeds[cu][name] for name in plan.input_names} for cu, plan in self.plans.items()}

    def step(self, index: int, reuse=None) -> dict:
        """Run step ``index`` on every unit; ``reuse(unit, step, env)`` may supply its outputs instead."""
        names = self.names[index]
        done: dict = {}
        values = {}
        for cu, plan in self.plans.items():
            step, env = plan.steps[index], self.envs[cu]
            out = reuse(cu, step, env) if reuse is not None else None
            if out is not None:
                self.reused_steps += 1
            else:
                key = share_key(step, env, names) if self.share else None
                hit = done.get(key) if key is not None else None
                out = hit[0] if hit is not None and _interchangeable(hit, step, env, names) else None
                if out is None:
                    out = step.run(env)
                    if key is not None and key not in done:
                        done[key] = (out, step, env)
                else:
                    self.shared_steps += 1
            for (name, _, _), value in zip(step.outputs, out):
                env[name] = value
            values[cu] = out
        return values

    def drop(self, index: int) -> None:
        """Drop the values whose last use was step ``index`` (its inputs no later step reads): once
        the step has run, only its outputs are measured, so they need not stay alive beside them."""
        for cu, plan in self.plans.items():
            env = self.envs[cu]
            for name in plan.steps[index].frees:
                env.pop(name, None)

    def free(self, index: int) -> None:
        """:meth:`drop`, and the converted copies of step ``index``'s large constants (weights widened
        for a unit are held one step at a time, not for the whole run; a local re-run of the step
        uses them too)."""
        self.drop(index)
        for plan in self.plans.values():
            release_converted(plan.steps[index])

    def finish(self) -> dict:
        """Each unit's program outputs (unit -> output name -> value); ends the run."""
        outs = {cu: dict(zip(plan.output_names, plan.outputs_from(self.envs[cu]))) for cu, plan in self.plans.items()}
        self.envs = {}
        return outs


class Lockstep:
    """Runs a reference interpreter and the diagnosed interpreters (one program, one per unit) op by op.

    The diagnosed units advance together through :class:`SharedRun`, so a step several units
    compute identically runs once (``reuse``), and a unit's step that provably computes what its
    paired reference step computed (:func:`same_computation`, on the very reference tensors)
    takes the reference's values. :meth:`run` calls ``on_step(index, step, {unit: output values},
    refs)`` after each diagnosed step, where ``refs`` maps the reference vars paired (``ref_of``)
    with the step's outputs (and inputs, with ``with_inputs`` or where a step may take the
    reference's values) to their values, and ``on_reference(step, name, value)`` (a generator)
    for every reference value. Reference values are kept only until their last use.
    """

    def __init__(self, ref_interp: Interpreter, dev_interps: dict[str, Interpreter], with_inputs: bool,
                 ref_of: dict, reuse: bool = True):
        self.ref = ref_interp
        self.ref_of = ref_of
        self.units = SharedRun(dev_interps, share=reuse)
        self.steps = list(next(iter(dev_interps.values())).main.steps)
        #: per unit, per step: the reference step computing exactly the same (None: none, or not reused)
        self.same = {cu: same_steps(interp, ref_interp, ref_of) if reuse else [None] * len(self.steps)
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

    def run(self, ref_feeds: dict, dev_feeds: dict, on_step, on_reference, unit_feeds: dict | None = None):
        """Generator (``on_reference`` is one: it may wait for torch); returns (reference outputs,
        each unit's outputs). ``unit_feeds`` (unit -> name -> tensor) adds feeds of one unit alone,
        such as its own state buffers."""
        ref_iter = self.ref.iterate(ref_feeds)
        remaining = Counter(self.uses)
        store = {k: v for k, v in ref_feeds.items() if remaining.get(k)}
        ref_open = True
        ref_of = self.ref_of
        index = 0

        def take_reference(cu, step, env):
            same = self.same[cu][index]
            if same is None or any(env[n] is not store.get(ref_of.get(n)) for n in self.units.names[index]):
                return None
            outs = [store.get(name) for name, _, _ in same.outputs]
            return None if any(o is None for o in outs) else outs

        self.units.start({cu: {**dev_feeds, **(unit_feeds or {}).get(cu, {})} for cu in self.units.interpreters})
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
                    yield from on_reference(rstep, name, v)
                release_converted(rstep)
            values = self.units.step(index, take_reference)
            self.units.drop(index)  # its dead inputs go before its outputs are measured (memory peak)
            on_step(index, step, values, {k: store.get(k) for k in keys})
            self.units.free(index)
            for k in keys:
                remaining[k] -= 1
                if remaining[k] <= 0:
                    store.pop(k, None)
        for rstep, rvalues in ref_iter:
            for (name, _, _), v in zip(rstep.outputs, rvalues):
                yield from on_reference(rstep, name, v)
            release_converted(rstep)
        return self.ref.last_outputs, self.units.finish()


#: dev interpreter -> reference interpreter -> per dev step, the reference step computing the same
_SAME_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def same_steps(dev_interp: Interpreter, ref_interp: Interpreter, ref_of: dict) -> list:
    """For each top-level step of ``dev_interp``, the step of ``ref_interp`` that computes exactly
    the same (None if none); constants are compared once per pair of interpreters."""
    per_ref = _SAME_STEPS.setdefault(dev_interp, weakref.WeakKeyDictionary())
    found = per_ref.get(ref_interp)
    if found is None:
        producer = {name: s for s in ref_interp.main.steps for name, _, _ in s.outputs}
        found = []
        for step in dev_interp.main.steps:
            wanted = [ref_of.get(name) for name, _, _ in step.outputs]
            candidate = producer.get(wanted[0]) if wanted else None
            ok = candidate is not None and [n for n, _, _ in candidate.outputs] == wanted \
                and same_computation(step, candidate, ref_of)
            found.append(candidate if ok else None)
        per_ref[ref_interp] = found
    return found
