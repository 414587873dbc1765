"""ipywidgets panels: pick conversion options, convert and diagnose, read the dashboard.

``lab(...)`` returns a :class:`Lab`: an options panel (model, precision incl. mixed with the
op types to keep in FP32, deployment target, convert_to, compute units, runtime, weight
compression, and a path to an existing ``.mlpackage`` to diagnose instead, on its own or against
the chosen model) with a "Convert and diagnose" button, and a dashboard with tabs - Summary,
Per-layer error, Histograms, FP16 range, Compute units, Compression, Messages, Fixes, Steps.
Stateful models (the samples in ``sample_models.STATEFUL``, or a model with Core ML states) get a
"Steps" control: the diagnosis then runs that many decoding steps, and the Steps tab shows the
step x layer heatmap, the state errors and the first bad step. Errors raised while converting or
running are shown in the panel (with their explanation where one is known), never swallowed.
Everything the button does is also callable (``Lab.run()``), so a notebook renders its
results without a click.
"""

from __future__ import annotations

import html
import importlib
import traceback

import ipywidgets as W
from IPython.display import display

import sample_models

from .compression import SPEC_FORMS
from .convert import convert
from .diagnosis import DEFAULT_COMPUTE_UNITS, diagnose
from .emulator.profiles import DEFAULT_NE_GENERATION, NE_GENERATIONS, ne_profile
from .options import COMPUTE_UNITS, TARGETS, ConversionOptions
from .states import MIN_TARGET, target_has_states

YOUR_MODEL = "(your model)"
YOUR_CONFIG = "(your config)"
NO_COMPRESSION = "none"
TABS = ("Summary", "Per-layer error", "Histograms", "FP16 range", "Compute units", "Compression", "Messages",
        "Fixes")
STEPS_TAB = "Steps"
DEFAULT_STEPS = 12


def _stateful_choices() -> dict:
    """Model dropdown label -> (stateful sample, config): "kv_decoder" (its first config) and "kv_decoder (overflow)"."""
    choices = {}
    for name in sample_models.STATEFUL:
        configs = getattr(importlib.import_module(f"sample_models.{name}"), "CONFIGS", (None,))
        for i, config in enumerate(configs):
            choices[name if i == 0 else f"{name} ({config})"] = (name, config)
    return choices


STATEFUL_CHOICES = _stateful_choices()


def _error_html(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    tip = ""
    if explanation is not None:
        tip = (f"<p><b>{html.escape(explanation.title)}</b>: {html.escape(explanation.meaning)}<br/>"
               f"<b>Fix:</b> {html.escape(explanation.fix)}</p>")
    tb = "".join(traceback.format_exception_only(type(exc), exc))
    return (f"<div class='cl-error' style='border:1px solid #d62728;padding:6px;color:#8b0000'>"
            f"<b>Error:</b> <pre style='white-space:pre-wrap'>{html.escape(tb)}</pre>{tip}</div>")


class Lab:
    """Options panel + dashboard. ``widget`` is the whole UI; ``report`` the last diagnosis."""

    def __init__(self, model=None, example_inputs=None, sample: str = "healthy", options: ConversionOptions | None = None,
                 package: str = "", steps: list | None = None):
        self.user_model, self.user_inputs = model, example_inputs
        opts = options or ConversionOptions()
        choices = ([YOUR_MODEL] if model is not None else []) + list(sample_models.SAMPLES) + list(STATEFUL_CHOICES)
        self.model_choice = W.Dropdown(options=choices, value=YOUR_MODEL if model is not None else sample,
                                       description="Model")
        self.precision = W.ToggleButtons(options=["fp16", "fp32", "mixed"], value=opts.precision,
                                         description="Precision")
        self.fp32_ops = W.SelectMultiple(options=[], description="Keep FP32", rows=6,
                                         layout=W.Layout(width="320px"))
        self.target = W.Dropdown(options=list(TARGETS), value=opts.target, description="Target")
        self.convert_to = W.Dropdown(options=["mlprogram", "neuralnetwork"], value=opts.convert_to,
                                     description="Convert to")
        units = ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL"]
        self.compute_units = W.SelectMultiple(options=[u for u in units if u in COMPUTE_UNITS],
                                              value=list(DEFAULT_COMPUTE_UNITS), description="Units", rows=4)
        self.runtime = W.Dropdown(options=["auto", "emulator", "coreml"], value="auto", description="Runtime")
        # weight compression after conversion (ConversionOptions(compression=...)): the short specs,
        # or the OptimizationConfig the panel was opened with
        self._own_compression = opts.compression if opts.compression is not None and \
            opts.compression.spec not in SPEC_FORMS else None
        compressions = [NO_COMPRESSION, *SPEC_FORMS] + ([YOUR_CONFIG] if self._own_compression is not None else [])
        current = NO_COMPRESSION if opts.compression is None else (
            YOUR_CONFIG if self._own_compression is not None else opts.compression.spec)
        self.compression = W.Dropdown(options=compressions, value=current, description="Compression")
        #: an existing .mlpackage to diagnose (its own program in exact FP32 is the reference) ...
        self.package = W.Text(value=str(package or ""), placeholder="path/to/model.mlpackage (optional)",
                              description="Package", layout=W.Layout(width="420px"))
        #: ... or against the chosen model, the one it came from
        self.with_source = W.Checkbox(value=False, description="against the chosen model", indent=False)
        # the Neural Engine generation the emulated CPU_AND_NE / ALL model (profiles.NE_GENERATIONS)
        self.ne_chip = W.Dropdown(
            options=[(f"{g.name}: {g.chips}" + (" (default)" if g.name == DEFAULT_NE_GENERATION else ""), g.name)
                     for g in NE_GENERATIONS.values()],
            value=DEFAULT_NE_GENERATION, description="NE chip", layout=W.Layout(width="420px"))
        self.button = W.Button(description="Convert and diagnose", button_style="primary", icon="play",
                               layout=W.Layout(width="220px"))
        self.status = W.HTML(value="")
        self.progress = W.Output()
        self.error = W.HTML(value="")
        self.tabs = W.Tab(children=[W.Output() for _ in TABS])
        for i, t in enumerate(TABS):
            self.tabs.set_title(i, t)
        self._build_steps(steps)
        self.report = None
        self.fix = None
        self.compression_fix = None
        self.button.on_click(lambda _: self.run())
        self.model_choice.observe(lambda _: self._refresh_op_types(), names="value")
        self.precision.observe(lambda _: self._sync_mixed(), names="value")
        self._sync_mixed()
        self._refresh_op_types()
        self._sync_steps()  # after _refresh_op_types, which finds whether your model has states
        self.model_choice.observe(lambda _: self._sync_steps(), names="value")
        options_box = W.VBox([
            W.HBox([self.model_choice, self.target, self.convert_to]),
            W.HBox([self.precision, self.runtime, self.ne_chip]),
            W.HBox([self.compression]),
            W.HBox([self.compute_units, self.fp32_ops]),
            W.HBox([self.package, self.with_source]),
            self.steps,
            W.HBox([self.button, self.status]),
        ])
        self.widget = W.VBox([W.HTML("<h3 style='margin:0'>coreml_lab</h3>"), options_box, self.error,
                              self.progress, self.tabs])

    def selected_units(self) -> list:
        """The compute units picked, CPU_AND_NE / ALL modelling the chosen Neural Engine generation."""
        units = list(self.compute_units.value) or ["CPU_ONLY"]
        if self.ne_chip.value == DEFAULT_NE_GENERATION:
            return units
        return [ne_profile(self.ne_chip.value, u) if u in ("CPU_AND_NE", "ALL") else u for u in units]

    # ------------------------------------------------------------------ state
    def _ipython_display_(self):  # pragma: no cover - notebook display
        display(self.widget)

    def _model(self):
        if self.model_choice.value in STATEFUL_CHOICES:
            return self._stateful_sample()[:2]
        if self.model_choice.value == YOUR_MODEL:
            return self.user_model, self.user_inputs
        model, inputs, _ = sample_models.build(self.model_choice.value)
        return model, inputs

    def _sync_mixed(self):
        self.fp32_ops.disabled = self.precision.value != "mixed"

    def _refresh_op_types(self):
        """Offer the op types of the FP32 conversion of the chosen model for 'Keep FP32'."""
        try:
            model, inputs = self._model()
            with self.progress:  # coremltools' progress bars show in the panel, then go
                conv = convert(model, inputs, ConversionOptions(precision="fp32", target=self.target.value))
            self.fp32_ops.options = list(conv.op_types())
            self._has_states = bool(conv.mlmodel.get_spec().description.state)
        except Exception as exc:  # noqa: BLE001 - shown, not swallowed
            self.error.value = _error_html(exc)
        finally:
            self.progress.clear_output()

    def options(self) -> ConversionOptions:
        mixed = self.precision.value == "mixed"
        compression = {NO_COMPRESSION: None, YOUR_CONFIG: self._own_compression}.get(self.compression.value,
                                                                                   self.compression.value)
        return ConversionOptions(precision=self.precision.value, fp32_ops=tuple(self.fp32_ops.value) if mixed else (),
                                 target=self.target.value, convert_to=self.convert_to.value,
                                 compute_units="ALL", compression=compression)

    # ------------------------------------------------------------------ actions
    def run(self):
        """Convert and diagnose with the panel's options; fill the dashboard. Returns the Report."""
        self.error.value = ""
        self.status.value = "<i>converting and running...</i>"
        self.button.disabled = True
        self.progress.clear_output()
        try:
            model, inputs = self._model()
            if model is None:
                raise ValueError("no model: pass model= and example_inputs= to lab(), or pick a sample")
            units = self.selected_units()
            package = self.package.value.strip()
            with self.progress:
                feeds = self.step_feeds()  # None unless the model is stateful
                steps = {} if feeds is None else {"steps": feeds}
                if package and self.with_source.value:  # the package against the model it came from
                    report = diagnose(model, inputs, compute_units=units, runtime=self.runtime.value, mlmodel=package)
                elif package:  # the package on its own, fed the chosen model's example inputs
                    report = diagnose(package, inputs, compute_units=units, runtime=self.runtime.value, **steps)
                else:
                    report = diagnose(model, inputs, self.options(), compute_units=units, runtime=self.runtime.value,
                                      **steps)
            self.report = report
            self._fill(report)
            self._fill_steps(report)
            self.status.value = ("<b style='color:#2ca02c'>done</b>" if report.ok else
                                 "<b style='color:#d62728'>conversion failed - see Summary</b>")
            if not report.ok:
                self.error.value = _error_html(_ReportError(report))
            return report
        except Exception as exc:
            self.error.value = _error_html(exc)
            self.status.value = "<b style='color:#d62728'>error</b>"
            raise
        finally:
            self.button.disabled = False
            self.progress.clear_output()

    def find_fix(self, time_budget: float = 120.0):
        """Search ops to keep in FP32 (verified), show it in the Fixes tab. Returns the fix."""
        from .fixes import find_fp32_ops

        out = self.tabs.children[TABS.index("Fixes")]
        try:
            model, inputs = self._model()
            self.fix = find_fp32_ops(model, inputs, self.options(), time_budget=time_budget)
        except Exception as exc:
            self.error.value = _error_html(exc)
            raise
        with out:
            display(W.HTML(f"<p><b>{html.escape(self.fix.message)}</b></p>"
                           f"<pre>{html.escape(self.fix.snippet)}</pre>"))
        return self.fix

    def find_uncompressed(self, tolerance: float = 2e-2, time_budget: float = 120.0):
        """Search the compressed layers to leave uncompressed (verified), show it in the Compression tab."""
        from .compression_fix import find_uncompressed_ops

        out = self.tabs.children[TABS.index("Compression")]
        try:
            model, inputs = self._model()
            with self.progress:
                self.compression_fix = find_uncompressed_ops(model, inputs, self.options(), tolerance=tolerance,
                                                             time_budget=time_budget)
        except Exception as exc:
            self.error.value = _error_html(exc)
            raise
        finally:
            self.progress.clear_output()
        fix = self.compression_fix
        with out:
            display(W.HTML(f"<p><b>{html.escape(fix.message)}</b></p>"))
            display(fix.plot_sensitivity())
            display(W.HTML(f"<pre>{html.escape(fix.snippet)}</pre>"))
        return fix

    # ------------------------------------------------------------------ dashboard
    def _fill(self, report) -> None:
        import matplotlib

        outs = {t: self.tabs.children[i] for i, t in enumerate(TABS)}
        for o in outs.values():
            o.clear_output()
        with outs["Summary"]:
            display(W.HTML(f"<pre class='cl-summary'>{html.escape(report.summary())}</pre>"))
            if report.ok:
                display(report.outputs[["compute_unit", "output", "max_abs_err", "mean_abs_err", "rel_err",
                                         "nonfinite_frac", "top1_agree"]])
        if report.ok:
            with matplotlib.rc_context({"figure.max_open_warning": 0}):
                with outs["Per-layer error"]:
                    display(report.plot_layer_errors())
                    display(report.culprits(10))
                with outs["Histograms"]:
                    display(report.plot_error_histograms())
                with outs["FP16 range"]:
                    display(report.plot_fp16_range())
                with outs["Compute units"]:
                    display(report.plot_compute_unit_divergence())
                with outs["Compression"]:
                    self._fill_compression(report)
        with outs["Messages"]:
            rows = [f"<li><code>{html.escape(m.text[:300])}</code>"
                    + (f"<br/><b>{html.escape(m.explanation.title)}</b>: {html.escape(m.explanation.fix)}"
                       if m.explanation else "") + "</li>" for m in report.messages]
            display(W.HTML("<ul>" + "".join(rows) + "</ul>" if rows else "<i>no messages</i>"))
        with outs["Fixes"]:
            from .suggestions import suggest_fixes

            tips = suggest_fixes(report, verify=False) if report.ok else []
            items = "".join(f"<li><b>{html.escape(t.title)}</b>: <code>{html.escape(t.change)}</code> - "
                            f"{html.escape(t.effect)}</li>" for t in tips)
            display(W.HTML(f"<ul>{items}</ul>" if items else "<i>nothing to suggest</i>"))
            button = W.Button(description="Find FP32 ops (verified)", icon="wrench")
            button.on_click(lambda _: self.find_fix())
            display(button)


    def _fill_compression(self, report) -> None:
        table = report.compression
        if table is None or not len(table):
            display(W.HTML("<i>no compressed weights: pick a compression in the panel</i>"))
            return
        display(report.plot_compression())
        display(table[["compute_unit", "op", "module", "compression", "weight_snr_db", "weight_max_abs_err",
                       "local_rel_err", "upstream_rel_err", "rel_err"]])
        button = W.Button(description="Find layers to leave uncompressed (verified)", icon="wrench",
                          layout=W.Layout(width="340px"))
        button.on_click(lambda _: self.find_uncompressed())
        display(button)

    # ------------------------------------------------------------------ steps (stateful models)
    def _build_steps(self, steps: list | None) -> None:
        """The Steps control (shown for stateful models) and the Steps tab."""
        self.user_steps = None if steps is None else list(steps)
        self._has_states = False
        self.steps = W.BoundedIntText(value=DEFAULT_STEPS, min=1, max=DEFAULT_STEPS, description="Steps",
                                      tooltip="decoding steps to diagnose, one after the other (Core ML states)",
                                      layout=W.Layout(width="180px"))
        self.steps_summary = W.HTML(value="<i>run a diagnosis of a stateful model to see its steps</i>")
        self.steps_plots = W.Output()
        self.tabs.children = (*self.tabs.children, W.VBox([self.steps_summary, self.steps_plots]))
        self.tabs.set_title(len(self.tabs.children) - 1, STEPS_TAB)

    def _stateful_sample(self):
        """``(model, example_inputs, sample module)`` of the chosen stateful sample configuration."""
        name, config = STATEFUL_CHOICES[self.model_choice.value]
        module = importlib.import_module(f"sample_models.{name}")
        model, inputs, _ = sample_models.build(name, **({} if config is None else {"config": config}))
        return model, inputs, module

    def is_stateful(self) -> bool:
        """Whether the chosen model is decoded step by step: a stateful sample, your model with Core ML states, or
        your model with ``steps=`` given to ``lab()``."""
        if self.model_choice.value in STATEFUL_CHOICES:
            return True
        return self.model_choice.value == YOUR_MODEL and (self._has_states or self.user_steps is not None)

    def _sync_steps(self) -> None:
        """Show the Steps control for stateful models (bounded by the cache size or the steps given); a stateful
        sample needs a target with states."""
        stateful = self.is_stateful()
        self.steps.disabled = not stateful
        self.steps.layout.display = None if stateful else "none"
        if self.model_choice.value in STATEFUL_CHOICES:
            self.steps.max = getattr(importlib.import_module(f"sample_models.{STATEFUL_CHOICES[self.model_choice.value][0]}"),
                                     "MAX_LEN", DEFAULT_STEPS)
            if not target_has_states(self.target.value):
                self.target.value = MIN_TARGET
        elif self.user_steps:
            self.steps.max = len(self.user_steps)
        self.steps.value = min(self.steps.value, self.steps.max)

    def step_feeds(self) -> list | None:
        """The input dicts of the steps to diagnose (``Steps`` of them), or None: one call, no steps."""
        if not self.is_stateful():
            return None
        if self.model_choice.value in STATEFUL_CHOICES:
            return self._stateful_sample()[2].step_inputs(self.steps.value)
        return None if self.user_steps is None else self.user_steps[:self.steps.value]

    def _fill_steps(self, report) -> None:
        """The Steps tab: the first bad step per compute unit, the step x layer heatmap, the state errors."""
        self.steps_plots.clear_output()
        if not report.ok or report.steps is None or not len(report.steps):
            hint = ("pick a stateful model (e.g. kv_decoder), or pass steps=[{...}, ...] (one input dict per "
                    "decoding step) to lab()") if not self.is_stateful() else "the diagnosis has no per-step numbers"
            self.steps_summary.value = f"<i>no steps: {html.escape(hint)}</i>"
            return
        line = next((ln for ln in report.summary().splitlines() if ln.startswith("- First bad step")), "")
        self.steps_summary.value = (f"<pre class='cl-first-bad-step' style='white-space:pre-wrap'>"
                                     f"{html.escape(line[2:])}</pre>" + report.first_bad().to_html(index=False))
        with self.steps_plots:
            display(report.plot_step_errors())
            display(report.plot_state_errors())


class _ReportError(Exception):
    def __init__(self, report):
        super().__init__(report.error)
        self.explanation = report.error_explanation


def lab(model=None, example_inputs=None, sample: str = "healthy", options: ConversionOptions | None = None,
        package: str = "", steps: list | None = None) -> Lab:
    """The interactive panel and dashboard; display it in a notebook cell. ``package``: a path to an
    existing ``.mlpackage`` to diagnose (the panel's Package field). ``steps``: input dicts, one per decoding
    step, for your stateful model (the Steps control picks how many)."""
    return Lab(model, example_inputs, sample, options, package, steps)


__all__ = ["lab", "Lab"]
