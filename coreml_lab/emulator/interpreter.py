"""Executes a MIL block op by op under a device profile.

A block is compiled once into a list of :class:`Step` (kernel, where each input
comes from, declared output dtypes, device placement and precision, when each
value can be freed). Running a block walks the steps with an environment of
torch tensors; every value is held in the dtype its declaration and the profile
give it, and is dropped after its last use so memory stays bounded. A callback
can watch every op's outputs as they are produced.
"""

from __future__ import annotations

import weakref
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import dtypes
from .opcall import Const, OpCall
from .profiles import FP32_EXACT, DeviceProfile, Precision
from .program import module_path
from .registry import lookup, supported_ops

#: MIL function -> its constants, shared by all interpreters of it (weights are held once per dtype)
_SHARED_CONSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class UnsupportedOpError(NotImplementedError):
    """An op type the emulator has no kernel for."""

    def __init__(self, op, module: str | None):
        self.op_type = op.op_type
        self.op_name = op.name
        self.module = module
        where = f" (torch module {module!r})" if module else ""
        super().__init__(
            f"the emulator cannot execute MIL op {op.op_type!r} named {op.name!r}{where}. "
            f"Supported op types: {', '.join(supported_ops())}"
        )


class OpExecutionError(RuntimeError):
    """A kernel failed; names the op so the user can find it."""


@dataclass
class OpRecord:
    """One op output as it streams past during a run (see ``on_op`` callbacks).

    ``value`` is only guaranteed valid during the callback; copy it to keep it.
    """

    name: str            # output variable name
    op_name: str
    op_type: str
    output_index: int
    dtype: str           # declared MIL dtype
    storage: str         # dtype the device held it in
    module: str | None
    device: str
    value: Any


OnOp = Callable[[OpRecord], None]


class Step:
    """One compiled op."""

    __slots__ = ("op", "kernel", "inputs", "outputs", "device", "precision", "hazards", "module",
                 "blocks", "frees", "call", "interpreter", "coerce", "nan_out", "boundary_hit")

    def sources(self):
        """Every input source in input order, tuple members included: a var name or a ``Const``."""
        for src in self.inputs.values():
            yield from (src if isinstance(src, tuple) else (src,))

    def run(self, env) -> list:
        call = self.call
        self.boundary_hit = False  # whether the NE's NaN boundary changed a value in this run
        if self.coerce:
            coerced = _nan_to_inf(env, self.coerce)
            self.boundary_hit = coerced is not env
            env = coerced
        call.env = env
        try:
            result = self.kernel.fn(call)
        except (UnsupportedOpError, OpExecutionError):
            raise
        except Exception as exc:
            where = f" (torch module {self.module!r})" if self.module else ""
            raise OpExecutionError(
                f"emulating MIL op {self.op.op_type!r} named {self.op.name!r}{where} on "
                f"{self.device} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            call.env = None
        # a kernel returns the value of a single-output op, a sequence for several outputs
        results = [result] if len(self.outputs) == 1 else list(result)
        if len(results) != len(self.outputs):
            raise OpExecutionError(
                f"kernel for {self.op.op_type!r} returned {len(results)} values, op {self.op.name!r} "
                f"declares {len(self.outputs)} outputs"
            )
        out = []
        for value, (_, _declared, storage) in zip(results, self.outputs):
            if isinstance(value, np.ndarray) or isinstance(value, np.generic):
                value = dtypes.to_torch(value)
            if isinstance(value, torch.Tensor) and storage is not None and value.dtype != storage:
                value = value.to(storage)
            if self.nan_out and isinstance(value, torch.Tensor) and value.is_floating_point():
                zeroed = _indeterminate_to_zero(value)
                self.boundary_hit = self.boundary_hit or zeroed is not value
                value = zeroed
            out.append(value)
        return out


# -- Neural Engine op boundary (profiles.NE_RULES): NaN enters as +inf, never leaves


def _nan_to_inf(env, names):
    """``env`` with NaN replaced by +inf in the values ``names`` (a view; the values stay untouched)."""
    over = None
    for name in names:
        v = env[name]
        if isinstance(v, torch.Tensor) and v.is_floating_point() and _has_nan(v):
            over = over if over is not None else {}
            over[name] = torch.where(torch.isnan(v), torch.tensor(torch.inf, dtype=v.dtype), v)
    return env if over is None else ChainMap(over, env)


def _has_nan(value: torch.Tensor) -> bool:
    """Whether ``value`` holds a NaN; one FP32 sum (no temporary) settles the common all-finite case."""
    if value.numel() == 0 or bool(torch.isfinite(value.sum(dtype=torch.float32))):
        return False
    return bool(torch.isnan(value).any())


def _indeterminate_to_zero(value: torch.Tensor) -> torch.Tensor:
    """An indeterminate result (NaN) as the Neural Engine returns it: +0."""
    if _has_nan(value):
        return torch.where(torch.isnan(value), torch.zeros((), dtype=value.dtype), value)
    return value


class BlockPlan:
    """A compiled MIL block (the main function, or a body of cond / while_loop)."""

    def __init__(self, block, interpreter: Interpreter):
        self.block = block
        self.interpreter = interpreter
        self.input_names = [v.name for v in block.inputs.values()] if isinstance(block.inputs, dict) \
            else [v.name for v in block.inputs]
        self.output_names = [v.name for v in block.outputs]
        self.consts = interpreter.consts  # shared: nested blocks may use outer consts
        self.steps: list[Step] = []
        self._compile()

    # names referenced by this block (and its nested blocks) but defined outside it
    def free_names(self) -> set[str]:
        defined = set(self.input_names)
        used = set()
        for step in self.steps:
            defined.update(name for name, _, _ in step.outputs)
        for step in self.steps:
            used |= _step_uses(step)
        used |= {n for n in self.output_names if n not in self.consts}
        return used - defined

    def _compile(self) -> None:
        interp = self.interpreter
        boundary_outputs: set[str] = set()  # values produced behind the NE's input boundary (no NaN)
        for op in self.block.operations:
            if op.op_type == "const":
                val = op.outputs[0].val
                self.consts[op.outputs[0].name] = Const(val)
                continue
            module = interp.module_of(op)
            kernel = lookup(op.op_type)
            if kernel is None:
                raise UnsupportedOpError(op, module)
            step = Step()
            step.op = op
            step.kernel = kernel
            step.module = module
            step.inputs = {}
            for name, var in op.inputs.items():
                if isinstance(var, (list, tuple)):
                    step.inputs[name] = tuple(self._source(v) for v in var)
                else:
                    step.inputs[name] = self._source(var)
            is_fp16 = _is_fp16_op(op)
            if kernel.exact:
                step.device, step.precision, step.hazards = _placement_exact(interp.profile, op, kernel, is_fp16)
            else:
                step.device, step.precision, step.hazards = interp.profile.place(op.op_type, kernel.family, is_fp16)
            step.outputs = []
            for v in op.outputs:
                declared = dtypes.var_dtype(v)
                step.outputs.append((v.name, declared, _storage_dtype(declared, step.precision)))
            step.blocks = [BlockPlan(b, interp) for b in op.blocks]
            rules = _device_rules(interp.profile, step.device) if is_fp16 else frozenset()
            step.coerce = ()
            step.nan_out = False
            if "nan_to_inf_at_input" in rules:
                step.coerce = tuple(dict.fromkeys(
                    s for s in step.sources() if isinstance(s, str) and s not in boundary_outputs))
                boundary_outputs.update(v.name for v in op.outputs)
            if "indeterminate_to_zero" in rules and not kernel.exact and not op.blocks:
                step.nan_out = True
            step.interpreter = interp
            step.call = OpCall(step)
            step.frees = ()
            self.steps.append(step)
        self._plan_frees()

    def _source(self, var):
        if var.op is not None and var.op.op_type == "const":
            return self.consts[var.name]
        return var.name

    def _plan_frees(self) -> None:
        keep = set(self.output_names)
        last_use: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for name in _step_uses(step):
                last_use[name] = i
        local = set(self.input_names)
        for step in self.steps:
            local.update(name for name, _, _ in step.outputs)
        frees: dict[int, list[str]] = {}
        for name, i in last_use.items():
            if name in local and name not in keep:
                frees.setdefault(i, []).append(name)
        for i, step in enumerate(self.steps):
            # outputs never used downstream are freed right after the op
            unused = [n for n, _, _ in step.outputs if n not in last_use and n not in keep]
            step.frees = tuple(frees.get(i, ())) + tuple(unused)

    def run(self, inputs: list, parent_env=None, on_op: OnOp | None = None) -> list:
        local: dict = dict(zip(self.input_names, inputs))
        env = ChainMap(local, parent_env) if parent_env is not None else local
        for _ in self.execute(env, local, parent_env is None, on_op):
            pass
        return self.outputs_from(env)

    def outputs_from(self, env) -> list:
        results = []
        for name in self.output_names:
            if name in self.consts:
                results.append(self.consts[name].tensor(None))
            else:
                results.append(env[name])
        return results

    def execute(self, env, local: dict, is_main: bool, on_op: OnOp | None = None):
        """Run every step, yielding ``(step, output values)`` after each (values freed after the yield)."""
        on_op = on_op if on_op is not None else self.interpreter.on_op
        peak = len(local)
        for step in self.steps:
            values = step.run(env)
            for (name, _declared, _), value in zip(step.outputs, values):
                local[name] = value
            if on_op is not None:
                for i, ((name, declared, _storage), value) in enumerate(zip(step.outputs, values)):
                    on_op(OpRecord(
                        name=name, op_name=step.op.name, op_type=step.op.op_type, output_index=i,
                        dtype=declared,
                        storage=dtypes.name_of_torch(value.dtype) if isinstance(value, torch.Tensor) else declared,
                        module=step.module, device=step.device,
                        value=value.numpy() if isinstance(value, torch.Tensor) else value,
                    ))
            if len(local) > peak:
                peak = len(local)
            yield step, values
            for name in step.frees:
                local.pop(name, None)
        if is_main:
            self.interpreter.last_peak_live = peak


#: a converted copy of a constant at least this large is dropped once a lockstep run has passed
#: its step (:func:`release_converted`): an FP16 program's weights widened to FP32 for the CPU or
#: the GPU are not held beside the FP16 ones for the whole run
RELEASE_MIN_BYTES = 1 << 20


def release_converted(step: Step, min_bytes: int = RELEASE_MIN_BYTES) -> None:
    """Drop the dtype-converted copies of ``step``'s large constants (made again when next needed)."""
    for src in step.sources():
        if isinstance(src, Const):
            src.release(min_bytes)


def _step_uses(step: Step) -> set[str]:
    names = {s for s in step.sources() if isinstance(s, str)}
    for plan in step.blocks:
        names |= plan.free_names()
    return names


def _is_fp16_op(op) -> bool:
    """An op is FP16-typed if it declares an FP16 float output, or (no float output) FP16 float inputs."""
    float_outs = [dtypes.var_dtype(v) for v in op.outputs if dtypes.is_float(dtypes.var_dtype(v))]
    if float_outs:
        return "fp16" in float_outs
    for var in op.inputs.values():
        for v in (var if isinstance(var, (list, tuple)) else (var,)):
            if dtypes.var_dtype(v) == "fp16":
                return True
    return False


#: the device rules a shape/index kernel follows (the M1 width-slice gain)
_EXACT_RULES = {"slice_by_index": frozenset({"width_slice_gain_16"}),
                "slice_by_size": frozenset({"width_slice_gain_16"})}


def _placement_exact(profile: DeviceProfile, op, kernel, is_fp16: bool):
    """Shape/index ops: placed like any op (for the record) but never change values (except
    where a device rule says so, _EXACT_RULES)."""
    device, precision, hazards = profile.place(op.op_type, kernel.family, is_fp16)
    storage = precision.storage if is_fp16 else "fp32"
    rules = hazards & _EXACT_RULES.get(op.op_type, frozenset())
    return device, Precision(storage, storage, storage) if storage == "fp16" else FP32_EXACT, rules


def _device_rules(profile: DeviceProfile, device: str) -> frozenset:
    """The rules (hazards and NE_RULES) of the device an op was placed on."""
    return profile.device(device).hazards


def _storage_dtype(declared: str, precision: Precision) -> torch.dtype | None:
    if declared == "fp16":
        return precision.storage_dtype
    if dtypes.is_float(declared):
        return dtypes.torch_dtype(declared)
    try:
        return dtypes.torch_dtype(declared)
    except TypeError:
        return None  # strings, lists: left as they are


class Interpreter:
    """Compiles a MIL function once for a profile and runs it."""

    def __init__(self, function, profile: DeviceProfile, module_of: Callable | None = None,
                 on_op: OnOp | None = None):
        self.profile = profile
        self.module_of = module_of or module_path
        self.on_op = on_op
        self.active_on_op = on_op
        # constants (and their converted copies) are shared by every interpreter of this function
        self.consts: dict[str, Const] = _SHARED_CONSTS.setdefault(function, {})
        #: most values alive at once in the last run of the main block (memory stays bounded)
        self.last_peak_live = 0
        self.main = BlockPlan(function, self)

    def run(self, inputs: dict[str, torch.Tensor], on_op: OnOp | None = None) -> dict[str, Any]:
        values = [inputs[name] for name in self.main.input_names]
        self.active_on_op = on_op if on_op is not None else self.on_op  # nested blocks report too
        try:
            outs = self.main.run(values, on_op=self.active_on_op)
        finally:
            self.active_on_op = self.on_op
        return dict(zip(self.main.output_names, outs))

    def iterate(self, inputs: dict[str, torch.Tensor], on_op: OnOp | None = None):
        """Run the main block step by step, yielding ``(step, output values)``; outputs land in
        :attr:`last_outputs` when the iteration ends. Lets two runs advance in lockstep."""
        local = {name: inputs[name] for name in self.main.input_names}
        self.active_on_op = on_op if on_op is not None else self.on_op
        try:
            yield from self.main.execute(local, local, True, self.active_on_op)
        finally:
            self.active_on_op = self.on_op
        self.last_outputs = dict(zip(self.main.output_names, self.main.outputs_from(local)))

    def run_step(self, step: Step, values: dict) -> list:
        """Run one compiled top-level step on given input values (var name -> tensor)."""
        return step.run(values)

    def steps(self):
        """Every compiled step, nested blocks included, in program order."""
        def walk(plan):
            for s in plan.steps:
                yield s
                for b in s.blocks:
                    yield from walk(b)
        yield from walk(self.main)
