"""Reference runs: torch FP32 (with per-module outputs), torch FP64 "golden", and ONNX Runtime.

The FP64 run separates ordinary FP32 noise from conversion error: an FP32 result
that differs from FP64 by 1e-7 is not a conversion problem. Module outputs are
captured with forward hooks only for the modules asked for (those with a MIL op
carrying their output), so memory stays proportional to what is compared.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TorchRun:
    outputs: list                                    # numpy arrays, in the model's output order
    modules: dict = field(default_factory=dict)      # module path -> numpy array (first tensor output)

    def module_output(self, path: str):
        v = self.modules.get(path)
        return None if v is None else torch.from_numpy(v)

    def take(self, path: str):
        """Generator form of :meth:`module_output` (as :meth:`TorchPump.take`; never waits)."""
        return self.module_output(path)
        yield  # unreachable: makes this a generator


class TorchPump:
    """A torch FP32 forward that drives a consumer generator as module outputs appear.

    The consumer (the reference program, op by op, with everything measured alongside)
    asks for module outputs with ``yield from pump.take(path)``. The forward runs in the
    calling thread; after each hooked module it resumes the consumer until the consumer
    waits for an output torch has not produced yet. So torch and the consumer advance
    together, only outputs produced ahead of their use are held, and no second thread
    competes for the cores. :meth:`run` returns the consumer's result; :attr:`outputs`
    then holds the forward's outputs as a :class:`TorchRun`.
    """

    def __init__(self, model, tensors: Sequence[torch.Tensor], modules: Iterable[str]):
        self.model = model
        self.tensors = [t.float() if t.is_floating_point() and t.dtype != torch.float32 else t for t in tensors]
        self.modules = set(modules)
        self.outputs: TorchRun | None = None
        self._stash: dict = {}
        self._finished = False
        self._consumer = None
        self._waiting_for = None
        self._result = None
        self._done = False

    def take(self, path: str):
        """Generator: the output of module ``path`` (None if it never came), waiting for torch if needed."""
        while path not in self._stash and not self._finished:
            yield path
        return self._stash.pop(path, None)

    def run(self, consumer):
        """Run the forward, resuming ``consumer`` (a generator) as outputs come; returns its result."""
        self._consumer = consumer
        named = dict(self.model.named_modules()) if isinstance(self.model, torch.nn.Module) else {}
        sent: set = set()
        handles = []
        for path in self.modules:
            mod = named.get(path)
            if mod is None:
                continue

            def hook(m, inp, out, path=path):
                if path in sent or self._done:
                    return  # a module called again (only its first output is compared), or nobody waits
                sent.add(path)
                t = _first_tensor(out)
                if t is not None:  # cloned: an in-place op later must not change what we compare
                    self._stash[path] = t.detach().clone()
                    self._pump()

            handles.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self._pump()
                out = self.model(*self.tensors)
        finally:
            for h in handles:
                h.remove()
        self._finished = True
        self._pump()
        self._stash.clear()
        self.outputs = TorchRun([o.detach().cpu().numpy() for o in flatten_outputs(out)])
        return self._result

    def _pump(self) -> None:
        # the consumer runs inside torch's forward: whatever the model's forward switched on around
        # this module (autocast, grad) must not reach the consumer's own arithmetic
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            while not self._done:
                if self._waiting_for is not None and self._waiting_for not in self._stash and not self._finished:
                    return
                try:
                    self._waiting_for = next(self._consumer)
                except StopIteration as stop:
                    self._done = True
                    self._result = stop.value


def drain(gen):
    """Run a consumer generator that never has to wait (no torch forward to drive it); its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def flatten_outputs(out) -> list[torch.Tensor]:
    """Model outputs in the order Core ML flattens them (tuples/lists in order, dict values in order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    flat = []
    for o in out:
        flat.extend(flatten_outputs(o))
    return flat


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        return _first_tensor(list(out.values()))
    return None


def double_copy(model):
    """An FP64 copy of ``model`` for golden runs (the user's model is left as it is).

    Floating parameters and buffers go straight to FP64 (no FP32 copy made first); tied
    weights stay tied.
    """
    memo: dict = {}
    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and id(t) not in memo:
                d = t.detach().double()
                memo[id(t)] = torch.nn.Parameter(d, requires_grad=t.requires_grad) \
                    if isinstance(t, torch.nn.Parameter) else d
    return copy.deepcopy(model, memo).double()


def lazy_double_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An FP64 twin of an eager ``model`` that holds FP64 weights only while they are used.

    A copy of the module tree that shares the user's parameters and buffers; just before each
    module's forward its own (direct) floating weights are swapped for FP64 copies, and back
    after it. So the golden run's extra memory is one module's weights, not the whole
    model's. A forward that reads another module's weights directly sees the FP32 original:
    arithmetic with FP64 activations promotes it exactly (the same values), ops that need one
    dtype (matmul, conv) fail loudly - callers then fall back to :func:`double_copy` - and only
    an expression over such weights alone (``exp(self.child.scale)``) is computed in FP32. The
    user's model is left as it is.
    """
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise TypeError("lazy_double_copy needs an eager torch.nn.Module")
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo)
    for (_, mod), (_, tmod) in zip(model.named_modules(remove_duplicate=False),
                                   twin.named_modules(remove_duplicate=False)):
        own = {n: t for table in (mod._parameters, mod._buffers) for n, t in table.items()
               if t is not None and t.is_floating_point()}
        if own:
            tmod.register_forward_pre_hook(_Materialize(own))
            tmod.register_forward_hook(_Release(own))
    return twin


class _Materialize:
    """Forward pre-hook: the module's own weights in FP64 (setattr: RNNs track their weights)."""

    def __init__(self, own: dict):
        self.own = own

    def __call__(self, module, args):
        for n, t in self.own.items():
            d = t.detach().double()
            setattr(module, n, torch.nn.Parameter(d, requires_grad=False) if isinstance(t, torch.nn.Parameter) else d)


class _Release:
    """Forward hook: the shared originals back (the FP64 copies are freed)."""

    def __init__(self, own: dict):
        self.own = own

    def __call__(self, module, args, output):
        for n, t in self.own.items():
            setattr(module, n, t)


class GoldenRun:
    """The FP64 golden runs of one diagnosis: ``run(tensors)`` -> :class:`TorchRun`. The FP64 twin is
    made at the first run, weights per module (:func:`lazy_double_copy`), or a full copy
    (:func:`double_copy`) for TorchScript or a forward that reads another module's weights."""

    def __init__(self, model):
        self.model, self.twin, self.lazy = model, None, False

    def __call__(self, tensors) -> TorchRun:
        while True:
            if self.twin is None:
                try:
                    self.twin, self.lazy = lazy_double_copy(self.model), True
                except TypeError:  # not an eager module (TorchScript)
                    self.twin, self.lazy = double_copy(self.model), False
            try:
                return run_torch(self.model, tensors, dtype=torch.float64, double_model=self.twin)
            except Exception:
                if not self.lazy:
                    raise
                self.twin, self.lazy = double_copy(self.model), False  # it reads weights across modules


def snapshot(buffers: dict) -> dict:
    """Copies of torch buffers (name -> tensor)."""
    return {name: b.detach().clone() for name, b in buffers.items()}


@contextlib.contextmanager
def buffers_holding(buffers: dict, values: dict):
    """torch buffers hold ``values`` inside the block (a golden run of a decoding step already taken
    starts from the state the step found), and what they held before afterwards."""
    after = snapshot(buffers)
    with torch.no_grad():
        for name, b in buffers.items():
            b.copy_(values[name])
        try:
            yield
        finally:
            for name, b in buffers.items():
                b.copy_(after[name])


def run_torch(model, tensors: Sequence[torch.Tensor], modules: Iterable[str] = (),
              dtype: torch.dtype = torch.float32, double_model=None) -> TorchRun:
    """Run ``model`` with hooks on ``modules``; ``dtype=torch.float64`` runs a double copy (golden),
    ``double_model`` if given (made once with :func:`double_copy`)."""
    if dtype == torch.float64:
        model = double_model if double_model is not None else double_copy(model)
        tensors = [t.double() if t.is_floating_point() else t for t in tensors]
    else:
        tensors = [t.float() if t.is_floating_point() and t.dtype != torch.float32 else t for t in tensors]
    captured: dict[str, np.ndarray] = {}
    handles = []
    wanted = set(modules)
    if wanted and isinstance(model, torch.nn.Module):
        named = dict(model.named_modules())
        for path in wanted:
            mod = named.get(path)
            if mod is None:
                continue

            def hook(m, inp, out, path=path):
                t = _first_tensor(out)
                if t is not None and path not in captured:  # first call only (a reused module is ambiguous)
                    captured[path] = t.detach().cpu().numpy().copy()
                elif path in captured:
                    captured[path] = None  # called more than once: no single reference tensor

            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(*tensors)
    finally:
        for h in handles:
            h.remove()
    return TorchRun([o.detach().cpu().numpy() for o in flatten_outputs(out)],
                    {k: v for k, v in captured.items() if v is not None})


def feed_tensors(feed: dict, example) -> list[torch.Tensor]:
    """A feed (name -> array) as torch tensors in the example inputs' order and dtypes."""
    return [torch.from_numpy(np.array(feed[n])).to(t.dtype) for n, t in zip(example.names, example.tensors)]


def reference_outputs(reference, example, feeds: Sequence[dict]) -> list[list[np.ndarray]]:
    """torch FP32 outputs of ``reference`` for each feed (the target of every output comparison)."""
    outs = []
    for feed in feeds:
        with torch.no_grad():
            outs.append([o.detach().numpy() for o in flatten_outputs(reference(*feed_tensors(feed, example)))])
    return outs


def run_onnxruntime(onnx_path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ONNX Runtime (CPU) for an .onnx file."""
    import onnxruntime as ort  # only ONNX sources need it (heavy import)

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ValueError(f"ONNX Runtime needs inputs {names}; missing {missing}")
    return sess.run(None, {n: feeds[n] for n in names})
