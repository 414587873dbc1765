"""Messages coremltools (and Core ML on devices) emit, captured and explained in plain words.

``capture()`` records every warning and log line emitted while converting.
``explain(text)`` matches a message against the catalogue of known ones and
returns what it means and how to fix it. Device-side log lines (which cannot
be produced on Linux) can be pasted into ``explain`` too.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Explanation:
    key: str
    title: str
    meaning: str
    fix: str
    pitfall: str = ""   # design pitfall id (P1..P5) where one applies


@dataclass
class Message:
    level: str                 # "warning" | "info" | "error"
    text: str
    source: str                # "warnings" | "logging" | "coreml_lab" | "exception" | "coremltools import"
    category: str = ""         # warning class or logger name
    location: str = ""         # file:line for warnings
    explanation: Explanation | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Message:
        exp = d.get("explanation")
        return cls(**{**d, "explanation": Explanation(**exp) if exp else None})

    def __str__(self) -> str:
        head = f"[{self.level}] {self.text}"
        if self.explanation:
            head += f"\n    -> {self.explanation.title}: {self.explanation.fix}"
        return head


_CATALOGUE: list[tuple[re.Pattern, Explanation]] = [
    (re.compile(r"overflow encountered in cast", re.I), Explanation(
        key="fp16_constant_overflow",
        title="FP16 overflow of a constant",
        meaning=("While casting the program to FP16, coremltools turned a constant (or a value folded from "
                 "constants) larger than 65504, FP16's maximum, into inf. Downstream ops then produce inf/NaN "
                 "- typically a mask built from torch.finfo(torch.float32).min or a large scale factor."),
        fix=("Convert with compute_precision=ct.precision.FLOAT32 (ConversionOptions(precision='fp32')), keep "
             "the offending ops in FP32 with ct.transform.FP16ComputePrecision(op_selector=...) "
             "(precision='mixed', see find_fp32_ops), or use constants within FP16 range (e.g. -1e4 or -inf "
             "for masks)."),
        pitfall="P1")),
    (re.compile(r"overflow encountered in (\w+)", re.I), Explanation(
        key="constant_folding_overflow",
        title="Overflow while folding constants",
        meaning=("numpy overflowed while coremltools pre-computed part of the graph from constants; the folded "
                 "value is inf and will propagate at run time."),
        fix="Check the constants feeding that computation; keep them (and the ops using them) in range or in FP32.",
        pitfall="P1")),
    (re.compile(r"FLOAT16.*only valid in specification version\s*>=\s*7", re.I | re.S), Explanation(
        key="fp16_needs_spec7",
        title="FP16 inputs/outputs need specification version 7",
        meaning=("The model uses FLOAT16 multi-array inputs or outputs, which exist only from Core ML "
                 "specification version 7 (iOS16 / macOS13); the model was built for an older version, so Core "
                 "ML refuses to load it."),
        fix=("Raise minimum_deployment_target to iOS16/macOS13 or later (ConversionOptions(target='iOS16')), or "
             "keep FP32 inputs and outputs (ct.TensorType(dtype=np.float32))."),
        pitfall="P4")),
    (re.compile(r"float16 dtype for (inputs|outputs) is only supported for deployment target\s*>=\s*iOS16", re.I),
     Explanation(
        key="fp16_io_needs_ios16",
        title="FP16 inputs/outputs need iOS16 / macOS13",
        meaning=("coremltools refuses FP16-typed inputs or outputs below deployment target iOS16: they need "
                 "specification version 7 (the same limit Core ML reports as 'FLOAT16 ... only valid in "
                 "specification version >= 7')."),
        fix="Set target='iOS16' (or later), or use float32 inputs/outputs.",
        pitfall="P4")),
    (re.compile(r"Strides of Conv needs to be product of at most 2 interleave factors", re.I), Explanation(
        key="conv_stride_interleave",
        title="Device conv-stride limit (seen with iOS16 targets)",
        meaning=("A device's Core ML compiler could not map a convolution's strides onto its hardware "
                 "(strides must factor into at most two interleave factors). Reported on iPads with "
                 "minimum_deployment_target=iOS16: the model was right on a Mac and wrong on the device."),
        fix=("Lower the deployment target to iOS15, or change the strides (e.g. to 2 or 4, or split one large "
             "stride into two convolutions); test on the device classes you ship to. cl.target_matrix "
             "flags the stride patterns."),
        pitfall="P3")),
    (re.compile(r"(Torch|torch) version \S+ has not been tested with coremltools", re.I), Explanation(
        key="untested_torch",
        title="Untested torch version",
        meaning=("coremltools was released before this torch version. Conversion usually works, but new torch "
                 "op variants may be missing or translated differently."),
        fix=("If a conversion fails or an op is wrong even at FP32, try the torch version coremltools names as "
             "tested; otherwise this warning is informational."))),
    (re.compile(r"Output, '([^']*)', of the source model, has been renamed to '([^']*)'", re.I), Explanation(
        key="output_renamed",
        title="Output renamed",
        meaning="Core ML names must be valid identifiers, so coremltools renamed a torch output.",
        fix="Name outputs explicitly with outputs=[ct.TensorType(name='...')] if the name matters.")),
    (re.compile(r"Model is not in eval mode", re.I), Explanation(
        key="not_eval",
        title="Model in training mode",
        meaning="Dropout and batch-norm statistics behave differently in training mode.",
        fix="Call model.eval() before converting (coreml_lab converts an eval-mode copy for you).")),
    (re.compile(r"Tuple detected at graph output", re.I), Explanation(
        key="tuple_output",
        title="Tuple output flattened",
        meaning="The model returns a tuple; Core ML outputs are a flat list of named tensors.",
        fix="Nothing to fix; outputs appear in tuple order.")),
    (re.compile(r"minimum deployment target must be at least iOS15", re.I), Explanation(
        key="mlprogram_needs_ios15",
        title="ML Programs need iOS15 / macOS12",
        meaning="ML Programs (convert_to='mlprogram') exist from iOS15 / macOS12 on.",
        fix="Choose target='iOS15' or later, or convert_to='neuralnetwork' for older OS versions.")),
    (re.compile(r"Core ML states need deployment target", re.I), Explanation(
        key="states_need_ios18",
        title="Core ML states need iOS18 / macOS15",
        meaning=("The model keeps state between calls (a buffer its forward updates in place, such as a KV "
                 "cache). Core ML states (ct.StateType, read_state / coreml_update_state) exist from iOS18 / "
                 "macOS15 on; for an older target the buffer is frozen as a constant, so the converted model "
                 "forgets everything between predictions."),
        fix=("Convert with ConversionOptions(target='iOS18') (or later); for older targets pass the cache in and "
             "out as model inputs and outputs instead of keeping it in a buffer."))),
    (re.compile(r"instead of updating it in place; a Core ML state cannot express", re.I), Explanation(
        key="buffer_reassigned",
        title="Buffer replaced, not updated in place",
        meaning=("forward assigns a new tensor to a buffer (self.buf = ...). Tracing records only the value, so "
                 "Core ML cannot keep it between predictions; a state needs an in-place write."),
        fix="Write into the buffer in place: self.buf[...] = value or self.buf.copy_(value).")),
    (re.compile(r"State only support fp16|StateType named .* not (provided|found)", re.I), Explanation(
        key="state_spec_mismatch",
        title="State spec does not match the model",
        meaning=("coremltools pairs each ct.StateType with a torch buffer by name (named_buffers()) and stores "
                 "states as FP16 only."),
        fix=("Name states after the torch buffers (ConversionOptions(states=('layer.k_cache', ...)) does this "
             "for you) and declare them with dtype=np.float16."))),
    (re.compile(r"_transformer_encoder_layer_fwd|_native_multi_head_attention|_transformer_decoder_only_layer_fwd"),
     Explanation(
        key="mha_fast_path",
        title="torch's fused transformer fast path",
        meaning=("In eval mode under no_grad, nn.TransformerEncoderLayer and nn.MultiheadAttention run torch's fused "
                 "kernels (aten::_transformer_encoder_layer_fwd, aten::_native_multi_head_attention); a trace taken "
                 "then records those fused ops, which coremltools has no translation for."),
        fix=("Pass the nn.Module itself: coreml_lab traces it with the fast path off. Tracing yourself: "
             "torch.backends.mha.set_fastpath_enabled(False) around torch.jit.trace (and restore it after), or "
             "trace in train() mode with dropout=0."))),
    (re.compile(r"unordered_map::at"), Explanation(
        key="trace_vmap",
        title="torch.jit.trace cannot record torch.vmap",
        meaning=("The forward calls torch.vmap or an autograd.Function under a function transform, which the "
                 "TorchScript tracer cannot record. Hugging Face models (transformers >= 4.53) build their causal "
                 "and padding masks that way (transformers.masking_utils)."),
        fix=("Pass the Hugging Face model itself (with its inputs by name) to coreml_lab: it evaluates the masks "
             "by broadcasting while tracing. Tracing yourself: pass an explicit 4D attention mask, or wrap the "
             "model so the mask is computed from plain tensor ops; then return_dict=False, use_cache=False."))),
    (re.compile(r"Unsupported fx node (\w+)"), Explanation(
        key="unsupported_fx_node",
        title="Torch op not supported by coremltools' torch.export frontend",
        meaning="coremltools' torch.export (fx) frontend has no translation for this aten op.",
        fix=("Register a composite with coremltools.converters.mil.frontend.torch.register_torch_op (both frontends "
             "use it; coreml_lab registers aten::diff and aten::new_ones this way), rewrite that part of the model, "
             "or convert through torch.jit.trace (pass the nn.Module; coreml_lab tries tracing first)."))),
    (re.compile(r"convert function for op '([^']+)' not implemented", re.I), Explanation(
        key="unsupported_torch_op",
        title="Torch op not supported by coremltools",
        meaning="coremltools has no translation for this torch op.",
        fix=("Rewrite that part of the model with supported ops, register a composite op "
             "(coremltools.converters.mil.frontend.torch.register_torch_op), or try the torch.export path."))),
    (re.compile(r"Failed to load _MLModelProxy", re.I), Explanation(
        key="no_coreml_framework",
        title="Core ML framework not available",
        meaning="coremltools cannot find Core ML (expected on Linux): models convert but cannot be run by Core ML.",
        fix="Nothing to fix on Linux: coreml_lab's emulator runs the model instead.")),
]


def explain(text: str) -> Explanation | None:
    """The catalogue explanation for a message text, or None if it is not a known message."""
    for pattern, exp in _CATALOGUE:
        if pattern.search(text):
            return exp
    return None


def known_explanations() -> list[Explanation]:
    return [e for _, e in _CATALOGUE]


def make(level: str, text: str, source: str, category: str = "", location: str = "") -> Message:
    return Message(level, text, source, category, location, explain(text))


# Noise that is not a coremltools message: deprecations of torch tracing and temp-dir cleanup.
_IGNORED = (
    re.compile(r"torch\.jit\.trace(_method)?`? is deprecated"),
    re.compile(r"Implicitly cleaning up <TemporaryDirectory"),
    re.compile(r"isinstance\(treespec, LeafSpec\)"),
)


class _ListHandler(logging.Handler):
    def __init__(self, sink: list):
        super().__init__(level=logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001
            text = str(record.msg)
        if record.levelno >= logging.WARNING or record.name.startswith("coremltools"):
            level = "error" if record.levelno >= logging.ERROR else (
                "warning" if record.levelno >= logging.WARNING else "info")
            self.sink.append(make(level, text, "logging", record.name))


@contextlib.contextmanager
def capture() -> Iterator[list]:
    """Collect warnings and log records emitted inside the block into a list of Messages."""
    sink: list[Message] = []
    handler = _ListHandler(sink)
    loggers = [logging.getLogger(), logging.getLogger("coremltools")]
    added = []
    for lg in loggers:
        if handler not in lg.handlers:
            lg.addHandler(handler)
            added.append(lg)
    ct_logger = logging.getLogger("coremltools")
    old_propagate = ct_logger.propagate
    ct_logger.propagate = False  # recorded once, by our handler on it
    def record_warning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if not any(p.search(text) for p in _IGNORED):
            sink.append(make("warning", text, "warnings", category.__name__, f"{filename}:{lineno}"))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record_warning  # in emission order, interleaved with log records
            yield sink
    finally:
        ct_logger.propagate = old_propagate
        for lg in added:
            lg.removeHandler(handler)


_IMPORT_MESSAGES: list[Message] | None = None


def import_messages() -> list[Message]:
    """Messages coremltools logs when it is imported (e.g. the untested-torch warning).

    They are logged once per process, so they are captured once and attached to
    every Conversion. If coremltools was imported before coreml_lab, its own
    version check is run again under capture so the warning is not lost.
    """
    global _IMPORT_MESSAGES
    if _IMPORT_MESSAGES is not None:
        return list(_IMPORT_MESSAGES)
    import sys

    with capture() as sink:
        if "coremltools" not in sys.modules:
            import coremltools  # noqa: F401
        else:
            import torch
            from coremltools import _deps

            check = getattr(_deps, "_warn_if_above_max_supported_version", None)
            max_torch = getattr(_deps, "_TORCH_MAX_VERSION", None)
            if check is not None and max_torch is not None:
                check("Torch", torch.__version__, max_torch)
    for m in sink:
        m.source = "coremltools import"
    _IMPORT_MESSAGES = sink
    return list(sink)
