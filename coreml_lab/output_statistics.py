"""Model outputs measured: each unit against torch FP32, and against the FP64 golden run where it is needed.

The golden run (torch in FP64) tells FP32 noise from conversion error. It costs about four
torch FP32 forwards on a convolutional model (torch has no fast FP64 convolution on CPU) and,
on the sample models, changes the output errors of a unit by less than 0.1% relative unless
torch FP32 and the FP32 program disagree: both are then within FP32 noise of FP64, so torch
FP32 is as good a reference. ``golden="auto"`` (the default of :func:`~.diagnosis.diagnose`)
therefore runs it after the lockstep, for an input whose FP32 program and torch FP32 outputs
disagree beyond :data:`GOLDEN_TOLERANCE`, and compares only the outputs concerned; ``True``
runs it on every input, ``False`` never. The ``golden`` column of the Report's ``outputs``
says, per output, whether it has a golden comparison and why not.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .culprits import fmt as _fmt
from .metrics import ErrorHistogram, ErrorStats

#: FP32 program vs torch FP32 (``rel_err`` = max |a - r| / max |r|) beyond which they are told apart
#: by the golden run. Torch FP32 against FP64 measured 0.7e-7 to 3.7e-7 on the twelve samples, and
#: the FP32 program against torch FP32 as much where the conversion is right; 1e-5 is 25x above
#: that and 50x under FP16's unit roundoff (4.9e-4), below which an FP16 unit's error never falls.
GOLDEN_TOLERANCE = 1e-5

GOLDEN_MODES = ("auto", True, False)


def check_golden(golden) -> None:
    if not any(golden is m or (isinstance(golden, str) and golden == m) for m in GOLDEN_MODES):
        raise ValueError(f"golden must be 'auto' (the FP64 run only where the FP32 program and torch FP32 "
                         f"disagree), True (always) or False (never); got {golden!r}")


class OutputStatistics:
    """Per model output: every unit against torch FP32 (or the FP32 program without torch), the
    references among themselves, and the golden comparisons with why each was made or not."""

    def __init__(self, units: list[str], output_names: list[str], golden="auto"):
        check_golden(golden)
        self.units, self.output_names, self.golden = units, output_names, golden
        self.outputs = defaultdict(ErrorStats)             # (unit, output) -> vs torch FP32
        self.outputs_golden = defaultdict(ErrorStats)      # (unit, output) -> vs torch FP64
        self.output_hist = defaultdict(ErrorHistogram)
        self.references = defaultdict(ErrorStats)          # (reference, against, output) -> error
        self.disagreement = defaultdict(ErrorStats)        # output -> FP32 program vs torch FP32
        self.golden_inputs = defaultdict(int)              # output -> inputs with a golden comparison
        self.inputs = 0                                    # inputs whose outputs were compared
        self.golden_failed: str | None = None              # why the FP64 run failed, if it did
        self._pending: dict = {}                           # this input: output -> (r32, t, onnx, units' values)

    def compare(self, ref_outs, dev_outs, torch_run, onnx_out, ref_of, shapes: dict, step=None) -> None:
        """One input's outputs: every unit against torch FP32 (the FP32 program without torch), and
        the FP32 program against torch FP32; kept until :meth:`compare_golden` (or the next input)."""
        self.inputs += 1
        tvals = torch_run.outputs if torch_run is not None else None
        self._pending = {}
        for i, name in enumerate(self.output_names):
            t = tvals[i] if tvals is not None and i < len(tvals) else None
            r32 = ref_outs.get(ref_of.get(name, name))
            r32 = r32.detach().numpy() if hasattr(r32, "detach") else r32
            want = t if t is not None else r32
            units = {}
            for cu in self.units:
                d = dev_outs[cu].get(name)
                d = d.detach().numpy() if hasattr(d, "detach") else d
                if not isinstance(d, np.ndarray) or not np.issubdtype(d.dtype, np.number):
                    continue
                units[cu] = d
                shapes[("output", name)] = tuple(d.shape)
                if want is not None and np.size(want) == d.size:
                    w = np.reshape(want, d.shape)
                    self.outputs[(cu, name)].add(d, w)
                    if step is not None:
                        step[(cu, "output", name)].add(d, w)
                    self.output_hist[(cu, name)].add(d, w)
            onnx = onnx_out[i] if onnx_out is not None and i < len(onnx_out) else None
            if t is not None:
                if isinstance(r32, np.ndarray) and r32.size == np.size(t):
                    self.disagreement[name].add(r32, np.reshape(t, r32.shape))
                self._pending[name] = (r32, t, onnx, units)

    def needs_golden(self) -> list[str]:
        """The outputs of the input just compared that the golden run is for (empty: no run)."""
        if self.golden is False or self.golden_failed:
            return []
        if self.golden is True:
            return list(self._pending)
        return [name for name, (r32, t, _, _) in self._pending.items() if _disagree(r32, t)]

    def compare_golden(self, golden_outputs, names) -> None:
        """The golden run's outputs (None: none) for ``names``, against every unit and the references."""
        for i, name in enumerate(self.output_names):
            if name not in names or name not in self._pending:
                continue
            g = golden_outputs[i] if golden_outputs is not None and i < len(golden_outputs) else None
            if g is None:
                continue
            r32, t, onnx, units = self._pending[name]
            self.golden_inputs[name] += 1
            for cu, d in units.items():
                if np.size(g) == d.size:
                    self.outputs_golden[(cu, name)].add(d, np.reshape(g, d.shape))
            if np.size(t) == np.size(g):
                self.references[("torch fp32", "torch fp64", name)].add(t, np.reshape(g, np.shape(t)))
            self._add_references(name, r32, onnx, g, "torch fp64")
            del self._pending[name]

    def finish_input(self) -> None:
        """The references of the outputs without a golden comparison: against torch FP32."""
        for name, (r32, t, onnx, _) in self._pending.items():
            self._add_references(name, r32, onnx, t, "torch fp32")
        self._pending = {}

    def _add_references(self, name, r32, onnx, base, against: str) -> None:
        if isinstance(r32, np.ndarray) and r32.size == np.size(base):
            self.references[("fp32 program (emulated, exact)", against, name)].add(r32, np.reshape(base, r32.shape))
        if onnx is not None and np.size(onnx) == np.size(base):
            self.references[("onnxruntime", against, name)].add(onnx, np.reshape(base, np.shape(onnx)))

    # ---------------------------------------------------------------- in the user's terms
    def status(self, name: str) -> str:
        """Whether output ``name`` has a golden comparison, and why not (the ``golden`` column)."""
        n, done = self.inputs, self.golden_inputs.get(name, 0)
        if done:
            why = "always (golden=True)" if self.golden is True else \
                f"FP32 program and torch FP32 disagree (rel err {_fmt(self._rel(name))} > {GOLDEN_TOLERANCE:g})"
            return f"FP64 on {done} of {n} input(s): {why}" if done < n else f"FP64: {why}"
        if self.golden_failed:
            return "none: the FP64 run failed"
        if name not in self.disagreement:
            return "none: no torch model to run in FP64"
        if self.golden is False:
            return "none: golden=False"
        return (f"none: FP32 program agrees with torch FP32 within FP32 noise (rel err {_fmt(self._rel(name))} "
                f"<= {GOLDEN_TOLERANCE:g}); errors are against torch FP32")

    def _rel(self, name: str) -> float:
        st = self.disagreement.get(name)
        return st.result()["rel_err"] if st is not None and st.n else float("nan")

    def note(self) -> str | None:
        """One line for the Report's notes: which outputs have a golden comparison, and why the others not."""
        if not self.disagreement or self.golden is True or self.golden_failed:
            return None  # nothing to compare, every output compared, or the failure's own note says it
        with_golden = [n for n in self.output_names if self.golden_inputs.get(n)]
        if self.golden is False:
            return "golden=False: no FP64 run; output errors are against torch FP32 (golden columns are empty)"
        if not with_golden:
            return ("no FP64 golden run: the FP32 program agrees with torch FP32 within FP32 noise (rel err <= "
                    f"{GOLDEN_TOLERANCE:g}), so torch FP32 is as good a reference (golden=True runs it anyway)")
        others = "" if len(with_golden) == len(self.output_names) else \
            "; the other outputs' golden columns are empty (within FP32 noise)"
        return (f"FP64 golden run for {', '.join(map(repr, with_golden))}, where the FP32 program and torch FP32 "
                f"disagree beyond FP32 noise (rel err > {GOLDEN_TOLERANCE:g}){others}")


def _disagree(r32, t) -> bool:
    """FP32 program and torch FP32 outputs told apart beyond FP32 noise (inf/NaN in either included)."""
    if not isinstance(r32, np.ndarray) or r32.size != np.size(t):
        return False  # not comparable here: the FP64 run could not settle it either
    st = ErrorStats()
    st.add(r32, np.reshape(t, r32.shape))
    res = st.result()
    return bool(res["nonfinite_frac"] > 0 or not res["rel_err"] <= GOLDEN_TOLERANCE)
