"""Report: the numbers of a diagnosis as DataFrames, the culprits, a verdict, and the plots.

Column reference (stable; notebooks and users rely on them):

``layers`` - one row per (compute unit, MIL op output) of the diagnosed program:
    compute_unit, runtime ("emulator" | "coreml"), index (program order), op (MIL op name),
    output (var name), op_type, module (torch module path; "" = the model itself; None =
    unknown), module_output (the torch module whose output this var carries, if any),
    device (CPU / GPU / NE under the profile), shape, max_abs (largest finite |value| on the
    device), max_abs_err, mean_abs_err, rel_err, snr_db, psnr_db, cosine, nonfinite_frac
    (accumulated error against the exact FP32 program, see :mod:`coreml_lab.metrics`),
    nonfinite_onset (inf/NaN appear here while the op's inputs were finite),
    local_max_abs_err, local_rel_err, local_snr_db (the op alone on exact inputs rounded to
    its storage dtype), torch_rel_err (FP32 program vs torch at module outputs: translation
    error), inputs (input var names), reference (matched FP32-program var, None if none),
    int_mismatch_frac (integer outputs such as top-k indices: fraction that differs from the
    reference), int_mismatch_onset (they start to differ here while integer inputs agree),
    compression (the compression of the weights the op reads, e.g. "palettize 4-bit per_tensor";
    "" for an op reading none).
``outputs`` - one row per (compute unit, model output): compute_unit, runtime, output, shape,
    the metrics of :mod:`coreml_lab.metrics` against torch FP32 (max_abs_err, mean_abs_err,
    rel_err, snr_db, psnr_db, cosine, nonfinite_frac, top1_agree, elements), against the
    FP64 golden run (golden_max_abs_err, golden_rel_err; NaN where it was not run), and golden
    (whether the output has a golden comparison, on how many inputs, and why not: by default
    only where the FP32 program and torch FP32 disagree beyond FP32 noise, see
    :mod:`coreml_lab.output_statistics`).
``fp16_range`` - one row per model input (kind "input", index -1), per op output of the FP32
    program (kind "activation") and per float weight/constant (kind "weight"): index, op,
    output, op_type, kind, module,
    inputs_max_abs, max_abs, min_abs_nonzero, overflow_frac (|x| > 65504),
    subnormal_frac (0 < |x| < 2^-14), flush_frac (0 < |x| < 2^-24), nonfinite_frac,
    elements, used_by.
``references`` - the references among themselves, per output: reference, against ("torch fp64"
    where the golden run was made, else "torch fp32"), output and the metrics: "torch fp32" vs
    FP64 (the FP32 noise floor), "fp32 program (emulated, exact)" (conversion error at FP32),
    "onnxruntime" (ONNX sources).
``first_nonfinite`` - per compute unit, the first op (program order) whose output has inf/NaN.
``divergence`` - per pair of compute units and op output: max_abs_diff, rel_diff, nonfinite_frac.
``compression`` - one row per (compute unit, compressed weight) of a compressed conversion (empty
    otherwise): compute_unit, op (the consuming op), op_type, module, weight, compression (in
    words), mode, nbits, granularity, block, sparsity, weight_snr_db, weight_max_abs_err (against
    the uncompressed weight), local_rel_err (the consuming op alone, its compressed weights
    included), upstream_rel_err (the error arriving at its other inputs), rel_err, index
    (see :mod:`coreml_lab.compression_report`).
``steps`` - a multi-step diagnosis (``diagnose(..., steps=[...])``), one row per (step,
    compute unit, name): step (0-based), compute_unit, name (model output, Core ML state, or
    torch module path of a layer; "(model)" = ops of the model itself), kind ("output" |
    "state" | "layer"), index (program index of a layer's first op; -1 otherwise),
    max_abs_err, rel_err, nonfinite_frac - outputs against torch FP32, states against torch's
    own cache (its buffer; the reference program's state where torch has none), layers against
    the exact FP32 program. Empty without ``steps``.
``first_bad_step`` - compute unit -> the first step whose outputs or states are beyond
    tolerance (None: every step within); :meth:`Report.first_bad` names the layer too.
``culprits(n)`` - see :meth:`Report.culprits`.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from . import bundle, htmlreport, report_tables
from . import culprits as culprit_rules
from .culprits import fmt, pct
from .environment import environment, profile_lines
from .metrics import degenerate_reference


@dataclass
class Report:
    LAYER_COLUMNS = report_tables.LAYER_COLUMNS
    OUTPUT_COLUMNS = report_tables.OUTPUT_COLUMNS
    RANGE_COLUMNS = report_tables.RANGE_COLUMNS
    REFERENCE_COLUMNS = report_tables.REFERENCE_COLUMNS
    ONSET_COLUMNS = report_tables.ONSET_COLUMNS
    DIVERGENCE_COLUMNS = report_tables.DIVERGENCE_COLUMNS
    CULPRIT_COLUMNS = culprit_rules.COLUMNS
    STEP_COLUMNS = report_tables.STEP_COLUMNS

    layers: pd.DataFrame
    outputs: pd.DataFrame
    fp16_range: pd.DataFrame
    references: pd.DataFrame = field(default_factory=pd.DataFrame)
    first_nonfinite: pd.DataFrame = field(default_factory=pd.DataFrame)
    divergence: pd.DataFrame = field(default_factory=pd.DataFrame)
    torch_layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    histograms: dict = field(default_factory=dict, repr=False)
    options: Any = None
    compute_units: list = field(default_factory=list)
    runtime: str = "emulator"
    n_inputs: int = 0
    conversion: Any = field(default=None, repr=False)
    messages: list = field(default_factory=list, repr=False)
    layer_source: str = "none"
    error: str | None = None
    error_explanation: Any = None
    notes: list = field(default_factory=list)
    #: per input: the feeds, each compute unit's outputs, torch's outputs (see bundle.compare_reports)
    runs: dict = field(default_factory=lambda: {"inputs": [], "outputs": {}, "torch": []}, repr=False)
    #: where the run happened (OS, versions, runtime); "measured" is True for Core ML runs
    environment: dict = field(default_factory=dict)
    #: per compressed weight: its weight error and what its layer loses (empty without compression)
    compression: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: what the errors are measured against: "framework" (the source model and its FP32 conversion) or
    #: "package program (exact FP32)" (an existing package on its own: no framework reference exists)
    reference: str = "framework"
    #: per decoding step (``diagnose(steps=...)``), see the module docstring
    steps: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=Report.STEP_COLUMNS))

    # ---------------------------------------------------------------- construction
    @classmethod
    def failed(cls, options, exc, compute_units, runtime: str = "emulator") -> Report:
        """A report for a model that did not convert: empty tables, the error and its explanation."""
        return cls(layers=pd.DataFrame(columns=cls.LAYER_COLUMNS), outputs=pd.DataFrame(columns=cls.OUTPUT_COLUMNS),
                   fp16_range=pd.DataFrame(columns=cls.RANGE_COLUMNS), options=options,
                   compute_units=list(compute_units), runtime=runtime, messages=list(getattr(exc, "messages", [])),
                   error=str(exc), error_explanation=getattr(exc, "explanation", None))

    @classmethod
    def from_statistics(cls, stats, *, conversion, runtime: str, n_inputs: int, profiles: dict | None = None) -> Report:
        """The Report of a diagnosis from its :class:`~.statistics.Statistics` (every table, the
        histograms, notes and runs); ``conversion`` is the diagnosed one, ``profiles`` (label ->
        DeviceProfile) the profiles that modelled its units (named in the environment)."""
        return cls(options=conversion.options, compute_units=list(stats.units), runtime=runtime, n_inputs=n_inputs,
                   conversion=conversion, messages=list(conversion.messages),
                   layer_source=stats.pairing.layer_map.source, environment=environment(runtime, profiles),
                   **report_tables.tables(stats, runtime))

    @property
    def ok(self) -> bool:
        return self.error is None

    # ---------------------------------------------------------------- steps
    @property
    def first_bad_step(self) -> dict:
        """Compute unit -> first step whose outputs or states exceed relative error 1e-2 or hold inf/NaN
        (None: every step within); empty without ``steps``. See :meth:`first_bad`."""
        return {r.compute_unit: (None if pd.isna(r.step) else int(r.step)) for r in self.first_bad().itertuples()}

    def first_bad(self, tolerance: float = 1e-2) -> pd.DataFrame:
        """Per compute unit: the first bad step, what went wrong there (the output or state beyond
        ``tolerance``), and the first layer in program order beyond it at that step (where it starts)."""
        cols = ["compute_unit", "step", "name", "kind", "rel_err", "layer", "layer_rel_err"]
        steps = self.steps
        if not len(steps):
            return pd.DataFrame(columns=cols)
        bad = (steps["nonfinite_frac"] > 0) | ~(steps["rel_err"] <= tolerance)
        rows = []
        for cu in self.compute_units:
            mine = steps[steps["compute_unit"] == cu]
            hits = mine[bad[mine.index] & mine["kind"].isin(["output", "state"])].sort_values("step", kind="stable")
            if not len(hits):
                rows.append({"compute_unit": cu, "step": None, "name": None, "kind": None, "rel_err": math.nan,
                             "layer": None, "layer_rel_err": math.nan})
                continue
            first = hits.iloc[0]
            layers = mine[(mine["step"] == first.step) & (mine["kind"] == "layer") & bad[mine.index]]
            layer = layers.sort_values("index", kind="stable").iloc[0] if len(layers) else None
            rows.append({"compute_unit": cu, "step": int(first.step), "name": first["name"], "kind": first.kind,
                         "rel_err": first.rel_err, "layer": None if layer is None else layer["name"],
                         "layer_rel_err": math.nan if layer is None else layer.rel_err})
        return pd.DataFrame(rows, columns=cols).astype({"step": object})

    def _step_lines(self, tolerance: float) -> list[str]:
        if not len(self.steps):
            return []
        n = int(self.steps["step"].max()) + 1
        parts = []
        for r in self.first_bad(tolerance).itertuples():
            if pd.isna(r.step):
                parts.append(f"{r.compute_unit} none (all {n} steps within tolerance)")
            else:
                where = f", starting in layer {r.layer!r}" if isinstance(r.layer, str) else ""
                parts.append(f"{r.compute_unit} step {int(r.step)} ({r.kind} {r.name!r} rel err {fmt(r.rel_err)}{where})")
        return [f"- First bad step of {n}: " + "; ".join(parts)]

    # ---------------------------------------------------------------- culprits
    def culprits(self, n: int = 10, tolerance: float = 1e-2) -> pd.DataFrame:
        """The ops most to blame, best first; only ops whose evidence passes ``tolerance``.

        Reasons, strongest first: non-finite values start at the op (its inputs finite);
        FP16 overflow starts at the op (inputs within 65504, output not); the FP32 program
        already differs from torch there (translation error); values flush to zero in FP16;
        the op alone loses more than ``tolerance`` relative (local error); the error grows
        here more than 10x over its inputs' error. An op with a large accumulated but small
        local error is not blamed; an op reading compressed weights whose local error exceeds
        ``tolerance`` is blamed with the compression mode and weight SNR in the reason.
        Columns: compute_unit, op, op_type, module, reason, score, index, output, rel_err,
        local_rel_err, nonfinite_frac. The rules, their scores and thresholds are the table :data:`.culprits.RULES`.
        """
        return culprit_rules.culprits(self.layers, self.fp16_range, n, tolerance, compression=self.compression)

    # ---------------------------------------------------------------- verdict
    def summary(self, tolerance: float = 1e-2) -> str:
        """A short plain-text verdict to paste into a chat."""
        opts = self.options
        head = (f"coreml_lab diagnosis ({self.runtime}; {opts.precision if opts else '?'}, target "
                f"{opts.target if opts else '?'}; {self.n_inputs} input(s))")
        if self.reference != "framework":
            head = (f"coreml_lab diagnosis ({self.runtime}; an existing package against its own program in exact "
                    f"FP32, no framework reference; {self.n_inputs} input(s))")
        if not self.ok:
            lines = [head, f"Conversion FAILED: {self.error.splitlines()[0][:300]}"]
            if self.error_explanation is not None:
                lines.append(f"Why: {self.error_explanation.meaning}")
                lines.append(f"Fix: {self.error_explanation.fix}")
            return "\n".join(lines)
        lines = [head]
        for cu in self.compute_units:
            rows = self.outputs[self.outputs["compute_unit"] == cu]
            if not len(rows):
                continue
            worst = rows.sort_values("rel_err", ascending=False).iloc[0]
            verdict = _verdict(worst, tolerance, "PyTorch" if self.reference == "framework" else "its exact FP32 run")
            agree = rows["top1_agree"].dropna()
            top1 = f", top-1 agreement {agree.min():.0%}" if len(agree) else ""
            lines.append(f"- {cu}: {verdict} (max abs err {fmt(worst.max_abs_err)}, mean {fmt(worst.mean_abs_err)}, "
                         f"rel {fmt(worst.rel_err)}{top1})")
        fp32 = self.references[self.references["reference"].str.startswith("fp32 program")] \
            if len(self.references) else self.references
        if len(fp32):
            against = " and ".join(sorted({str(a) for a in fp32.get("against", pd.Series(["torch fp64"]))}))
            lines.append(f"- FP32 conversion vs {against.replace('fp', 'FP')}: rel err {fmt(fp32['rel_err'].max())}"
                         f"{' (translation error!)' if fp32['rel_err'].max() > 1e-3 else ' (conversion itself is right)'}")
        lines += self._step_lines(tolerance)
        if len(self.first_nonfinite):
            r = self.first_nonfinite.iloc[0]
            lines.append(f"- First inf/NaN on {r.compute_unit}: {r.op_type} {r.op!r} in module {r.module!r}")
        culprits = self.culprits(3, tolerance)
        outputs_ok = len(self.outputs) and all(
            not (r.nonfinite_frac > 0 or r.rel_err > tolerance) for r in self.outputs.itertuples())
        if len(culprits):
            lines.append("Most to blame" + (" (the outputs stay within tolerance: these do not reach them):"
                                            if outputs_ok else ":"))
            for c in culprits.itertuples():
                lines.append(f"  {c.op_type} {c.op!r} (module {c.module!r}, {c.compute_unit}): {c.reason.split('; ')[0]}")
        else:
            lines.append(f"No op exceeds tolerance {tolerance:g}.")
        lines += self._hints(tolerance, culprits)
        lines += profile_lines(self.environment)  # which Neural Engine generation modelled each unit
        lines += [f"Note: {note}" for note in self.notes]  # what could not be measured, and why
        explained = [m for m in self.messages if getattr(m, "explanation", None) is not None
                     and m.source != "coremltools import"]
        for m in explained[:3]:
            lines.append(f"Converter said: {m.text[:100]!r} -> {m.explanation.title}")
        return "\n".join(lines)

    def _hints(self, tolerance: float, culprits) -> list[str]:
        """What to try next, from the pattern of the numbers."""
        hints = []
        by_cu = {r.compute_unit: r for r in self.outputs.sort_values("rel_err").itertuples()}
        cpu = by_cu.get("CPU_ONLY")
        others = [r for cu, r in by_cu.items() if cu != "CPU_ONLY"]
        broken = any(r.nonfinite_frac > 0 for r in others)
        differ = any(r.rel_err > tolerance or (r.top1_agree == r.top1_agree and r.top1_agree < 1) for r in others)
        cpu_ok = cpu is not None and cpu.nonfinite_frac == 0 and cpu.rel_err <= tolerance and \
            not (cpu.top1_agree == cpu.top1_agree and cpu.top1_agree < 1)
        if (broken or differ) and getattr(self.options, "compression", None) is not None and len(culprits) \
                and culprits["reason"].str.contains("compressed weights").any():
            hints.append("Try: cl.find_uncompressed_ops(model, example_inputs, options) to leave the costliest "
                         "compressed layers uncompressed (or at more bits), verified.")
        elif (broken or differ) and self.options is not None and self.options.precision != "fp32":
            ops = sorted({c.op_type for c in culprits.itertuples()}) if len(culprits) else []
            keep = f" or keep {ops} in FP32 (precision='mixed', fp32_ops={tuple(ops)!r})" if ops else ""
            hints.append(f"Try: precision='fp32'{keep}.")
        if differ and not broken and cpu_ok and not len(culprits):
            hints.append("No single op is to blame: FP16 rounding on GPU/NE adds up. If exact agreement matters, "
                         "load with compute_units=CPU_ONLY (it matches PyTorch here).")
        return hints

    # ---------------------------------------------------------------- sharing
    def save(self, path):
        """Write a run bundle (directory, or zip if ``path`` ends with .zip); see :mod:`coreml_lab.bundle`."""
        return bundle.save_report(self, path)

    @classmethod
    def load(cls, path) -> Report:
        """Read a bundle written by :meth:`save` back into a Report (tables, histograms, runs)."""
        return cls(**bundle.read_bundle(path))

    def to_html(self, title: str = "coreml_lab diagnosis") -> str:
        """One self-contained HTML page with the verdict, tables and figures."""
        return htmlreport.render(self, title)

    # ---------------------------------------------------------------- plots
    def plot_layer_errors(self, metric: str = "rel_err", **kw):
        return _plots().layer_errors(self, metric, **kw)

    def plot_error_histograms(self, **kw):
        return _plots().error_histograms(self, **kw)

    def plot_layer_histogram(self, layer: str, **kw):
        return _plots().layer_histogram(self, layer, **kw)

    def plot_fp16_range(self, **kw):
        return _plots().fp16_range(self, **kw)

    def plot_compute_unit_divergence(self, **kw):
        return _plots().compute_unit_divergence(self, **kw)

    def plot_compression(self, **kw):
        """Per compressed layer: its local error beside what arrives from upstream, and its weight SNR."""
        return _plots().compression(self, **kw)

    def plot_step_errors(self, compute_unit: str | None = None, metric: str = "rel_err", **kw):
        """A step x layer heatmap of ``metric`` (``diagnose(steps=...)``)."""
        return _plots().step_errors(self, compute_unit, metric, **kw)

    def plot_state_errors(self, metric: str = "rel_err", **kw):
        """Each state's error along the steps, one panel per compute unit."""
        return _plots().state_errors(self, metric, **kw)

    def _repr_html_(self) -> str:  # pragma: no cover - notebook display
        return "<pre>" + html.escape(self.summary()) + "</pre>"


def _plots():
    """The plots module, imported when a figure is first drawn: it loads matplotlib, which a
    diagnosis without figures (the CLI, a CI gate) does not need."""
    from . import plots
    return plots


def _verdict(row, tolerance: float, reference: str = "PyTorch") -> str:
    if row.nonfinite_frac and row.nonfinite_frac > 0:
        return f"BROKEN: {pct(row.nonfinite_frac)} of output values are inf/NaN"
    why = degenerate_reference(row.max_abs_err, row.rel_err)
    if why and (row.rel_err > tolerance or (row.top1_agree == row.top1_agree and row.top1_agree < 1)):
        return f"NO SIGNAL TO COMPARE: {why}"
    if row.top1_agree == row.top1_agree and row.top1_agree < 1:
        return "DIFFERENT: the top-1 class changes"
    if row.rel_err > tolerance:
        return "DIFFERENT beyond tolerance"
    return f"close to {reference}"


def load_report(path) -> Report:
    """Read a bundle written by :meth:`Report.save` back into a Report (tables, histograms, runs)."""
    return Report.load(path)
