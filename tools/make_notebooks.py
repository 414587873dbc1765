"""Write notebooks/*.ipynb (without outputs) from the cell lists below.

    python tools/make_notebooks.py          # (re)write the notebooks
    python tools/make_notebooks.py --check  # exit 1 if a notebook differs from this source

Keeping the notebooks' source here lets them be reviewed as code and regenerated after API
changes; the test suite checks the committed notebooks match.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from generated import write_or_check
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"

SETUP = """\
%matplotlib inline
import numpy as np
import pandas as pd
import torch

import coreml_lab as cl
import sample_models
from coreml_lab.emulator import EmulatedModel
from coreml_lab.widgets import lab

pd.set_option("display.max_colwidth", 120)


def check(ok, hint):
    \"\"\"Exercise feedback: prints, never raises (so the notebook also runs unattended).\"\"\"
    if ok is None:
        print("-> make your prediction in the cell above, then run both cells again")
    else:
        print("correct!" if ok else f"not quite: {hint}")"""


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


NOTEBOOKS = {}

NOTEBOOKS["00_quickstart.ipynb"] = [
    md("""
# coreml_lab quickstart

A converted Core ML model misbehaves - NaN outputs, a different class than PyTorch, right on a
Mac and wrong on an iPad. This kit answers *where* and *why*: it converts your model with the
options you pick, runs it on every compute unit (CPU, GPU, Neural Engine), and compares every
layer with PyTorch.

Core ML only runs on macOS. On Linux (and, if you ask, on macOS too) the kit's **emulator** runs
the converted ML Program op by op under a precision profile per compute unit. Emulated numbers
show precision risk (overflow, underflow, rounding growth); a real device can differ in detail.
"""),
    code(SETUP),
    md("## The sample models\n\nEach one reproduces a pitfall reported from the field."),
    code('pd.DataFrame(sample_models.catalog())[["name", "pitfall", "symptom"]]'),
    md("""
## The panel

Pick a model and options, press **Convert and diagnose**. The cell below also runs it once, so
this notebook renders complete without a click (for `make report`).
"""),
    code("""
panel = lab(sample="fp16_overflow")
report = panel.run()
panel"""),
    md("""
## Reading the dashboard

* **Summary** - one line per compute unit: is the output close to PyTorch, different, or broken
  (inf/NaN)? Then the ops most to blame and what to try.
* **Per-layer error** - error of every op along the network, per compute unit, against the exact
  FP32 program. Where a line jumps, precision is lost.
* **Histograms** - how the output errors are distributed.
* **FP16 range** - which values would not fit FP16 (above 65504, or below 2^-24).
* **Compute units** - where CPU, GPU and Neural Engine disagree.
* **Messages** - what coremltools said while converting, explained.
* **Fixes** - suggestions, and a verified search for the ops to keep in FP32.

The same numbers are plain pandas tables and matplotlib figures:
"""),
    code("print(report.summary())"),
    code("report.culprits(5)"),
    code("report.plot_layer_errors()"),
    md("""
## Next

* `01_fp16_overflow_nan` - NaN outputs and how to fix them (P1)
* `02_compute_unit_divergence` - CPU vs GPU vs Neural Engine (P2)
* `03_deployment_targets` - iOS15 vs iOS16+ and Neural-Engine-hostile outputs (P3, P4)
* `04_os_versions_and_shared_runs` - the ONNX path, run bundles, comparing machines (P5)
* `05_bring_your_own_model` - your model in the same panel
"""),
]

NOTEBOOKS["01_fp16_overflow_nan.ipynb"] = [
    md("""
# Pitfall P1: the output is all NaN

**Symptom.** The converted model returns NaN; coremltools may have printed
"overflow encountered in cast" while converting.

**Cause.** ML Programs compute in FP16 by default. FP16's largest value is 65504: anything
larger becomes inf, and inf turns into NaN as soon as it meets another inf (inf - inf, 0 x inf).
Large inputs, large weights, squares, exp and sums are the usual suspects.

**Fixes.** Convert in FP32 (`compute_precision=ct.precision.FLOAT32`), or keep only the
offending ops in FP32 with `ct.transform.FP16ComputePrecision(op_selector=...)`.
"""),
    code(SETUP),
    md("## The model\n\nAn audio classifier that computes the energy of raw PCM frames (|x| up to 20000)."),
    code("""
model, example, description = sample_models.build("fp16_overflow")
print(description)
frames = example[0]
print("max |input| =", float(frames.abs().max()), "(fits FP16)")
with torch.no_grad():
    print("max |frames * frames| =", float((frames * frames).abs().max()), "(does not: > 65504)")"""),
    code("""
conv16 = cl.convert(model, example, cl.ConversionOptions(precision="fp16"))
feeds = conv16.example_inputs.as_numpy()
for unit in ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"]:
    print(unit, EmulatedModel(conv16.mlmodel, unit).predict(feeds))"""),
    md("CPU_ONLY computes FP16-typed ops in FP32 (types are a minimum), so it survives; GPU and Neural Engine hold values in FP16."),
    md("## Where does FP16 range break?"),
    code("""
report = cl.diagnose(model, example, cl.ConversionOptions(precision="fp16"))
print(report.summary())"""),
    code("report.culprits(3)"),
    code("report.first_nonfinite"),
    code("report.plot_fp16_range()"),
    code("report.plot_layer_errors()"),
    md("""
The `mul` in module `energy` receives values within FP16 range and produces values far above
65504 - that is where overflow starts, and the NaN downstream is its consequence.

## Fix 1: FP32
"""),
    code("""
report32 = cl.diagnose(model, example, cl.ConversionOptions(precision="fp32"))
report32.outputs[["compute_unit", "max_abs_err", "rel_err", "nonfinite_frac"]]"""),
    md("""
FP32 fixes it, but an FP32 model never runs on the Neural Engine.

## Fix 2: keep only the offending ops in FP32

`find_fp32_ops` starts from the culprits and every op whose values leave FP16 range, verifies
each candidate set by converting and re-running, and drops every op the fix does not need.
"""),
    code("""
fix = cl.find_fp32_ops(model, example)
print(fix.message)
print(fix)"""),
    code("print(fix.snippet)"),
    code("""
mixed = cl.diagnose(model, example, cl.ConversionOptions(precision="mixed", fp32_ops=fix.ops))
mixed.outputs[["compute_unit", "max_abs_err", "rel_err", "nonfinite_frac"]]"""),
    md("""
## Exercises

**1.** Feed the model frames scaled down by 1000 (`frames / 1000`, so |x| <= 20). Predict: is the
FP16 output on the Neural Engine NaN or finite? Set `prediction_1` to `"nan"` or `"finite"`.
"""),
    code("prediction_1 = None  # \"nan\" or \"finite\""),
    code("""
quiet = {"frames": (frames / 1000).numpy()}
out = EmulatedModel(conv16.mlmodel, "CPU_AND_NE").predict(quiet)
actual_1 = "nan" if not np.isfinite(next(iter(out.values()))).all() else "finite"
check(None if prediction_1 is None else prediction_1 == actual_1,
      "squares are at most 400 and the mean's running sum over 64 samples stays below 65504")
print("actual:", actual_1)"""),
    md("""
**2.** Keep only the `mul` op type in FP32 (`precision="mixed", fp32_ops=("mul",)`). Predict: does
the Neural Engine output become finite? Set `prediction_2` to `True` or `False`.
"""),
    code("prediction_2 = None  # True or False"),
    code("""
only_mul = cl.diagnose(model, example, cl.ConversionOptions(precision="mixed", fp32_ops=("mul",)),
                       compute_units=("CPU_AND_NE",), progress=False)
actual_2 = bool(only_mul.outputs.nonfinite_frac.max() == 0)
check(None if prediction_2 is None else prediction_2 == actual_2,
      "the mean of the squares is just as large: the next op overflows when it is FP16")
print("actual:", actual_2)"""),
]

NOTEBOOKS["02_compute_unit_divergence.ipynb"] = [
    md("""
# Pitfall P2: Core ML differs from PyTorch, and the compute unit decides how much

**Field report.** A model matched TFLite to 1e-7 but differed from PyTorch after conversion to
Core ML: mean abs diff ~0.0029, max ~0.012 - enough to flip classifications. Loading with
`compute_units=ct.ComputeUnit.CPU_ONLY` brought it to max 3.2e-7, mean 5.7e-8.

**Cause.** The default `ComputeUnit.ALL` runs parts of the model on the GPU and Neural Engine
in FP16: the GPU stores tensors in FP16 and accumulates in FP32; the Neural Engine uses FP16
throughout. The CPU treats FP16 types as a minimum and computes in FP32.

The emulator encodes this as device profiles (data you can inspect and change):
"""),
    code(SETUP),
    code("""
from coreml_lab.emulator import profiles
pd.DataFrame(profiles.describe(profiles.get_profile("ALL")))"""),
    md("## A classifier on a knife's edge\n\nIts weights are exactly representable in FP16, so only the compute units' precision differs."),
    code("""
model, example, description = sample_models.build("cu_classifier")
print(description)
report = cl.diagnose(model, example, cl.ConversionOptions())
report.outputs[["compute_unit", "max_abs_err", "mean_abs_err", "top1_agree"]]"""),
    code("""
with torch.no_grad():
    want = model(*example)[0]
print("PyTorch top-2 logits:", torch.topk(want, 2))
for unit, outs in report.runs["outputs"].items():
    logits = next(iter(outs[0].values()))[0]
    print(f"{unit:12} top-1 = {int(np.argmax(logits))}")"""),
    md("""
Same kind of numbers as the field report: CPU_ONLY matches PyTorch exactly, the GPU and Neural
Engine differ by a few thousandths - and that is enough to change the answer.

## Error grows with depth
"""),
    code("""
deep, deep_example, _ = sample_models.build("deep_residual")
deep_report = cl.diagnose(deep, deep_example, cl.ConversionOptions())
deep_report.plot_layer_errors()"""),
    code("deep_report.plot_compute_unit_divergence()"),
    md("""
## When CPU_ONLY is the right answer

* exact agreement with PyTorch matters more than speed (e.g. a threshold decision near a tie);
* the model is small enough that CPU latency is fine;
* you cannot change the model, and no single op is to blame (`culprits` is empty, as here).

Otherwise keep `ALL` and accept a known, measured difference - or convert sensitive parts in FP32.
"""),
    code("print(report.summary())"),
    md("""
## Exercises

**1.** Rebuild the classifier with a wide margin between its two best classes
(`sample_models.build("cu_classifier", margin=0.05)`). Predict: does the Neural Engine still flip
the top-1 class? Set `prediction_1` to `True` (flips) or `False`.
"""),
    code("prediction_1 = None  # True or False"),
    code("""
wide, wide_example, _ = sample_models.build("cu_classifier", margin=0.05)
wide_report = cl.diagnose(wide, wide_example, cl.ConversionOptions(), compute_units=("CPU_AND_NE",), progress=False)
actual_1 = bool(wide_report.outputs.top1_agree.min() < 1)
check(None if prediction_1 is None else prediction_1 == actual_1,
      "FP16 moves the logits by ~0.004; a 0.05 margin is far larger")
print("actual:", actual_1)"""),
    md("""
**2.** Some Macs run FP16 convolutions on the CPU too. The profile `strict_fp16_cpu()` models that.
Predict: is the deep net's CPU error then still exactly 0? Set `prediction_2` to `True` or `False`.
"""),
    code("prediction_2 = None  # True or False"),
    code("""
conv = cl.convert(deep, deep_example, cl.ConversionOptions())
feeds = conv.example_inputs.as_numpy()
strict = next(iter(EmulatedModel(conv.mlmodel, profiles.strict_fp16_cpu()).predict(feeds).values()))
with torch.no_grad():
    ref = deep(*deep_example).numpy()
actual_2 = bool(np.abs(strict - ref).max() == 0)
check(None if prediction_2 is None else prediction_2 == actual_2,
      "FP16 storage rounds every activation, whichever unit does it")
print("actual:", actual_2, "max abs err", float(np.abs(strict - ref).max()))"""),
]

NOTEBOOKS["03_deployment_targets.ipynb"] = [
    md("""
# Pitfalls P3 and P4: the deployment target and the Neural Engine

**P3.** A model was right on a Mac and wrong on an iPad with
`minimum_deployment_target=iOS16`; the device log said "Strides of Conv needs to be product of
at most 2 interleave factors". Lowering the target to iOS15 (or changing the strides) fixed it.

**P4.** Adding output reshapes, slicing or NMS to a model made Core ML run it off the Neural
Engine; and FP16 inputs/outputs need specification version 7 (iOS16 / macOS13) - below that
Core ML refuses the model ("FLOAT16 ... only valid in specification version >= 7").

The emulator cannot reproduce a device compiler's limits, so these are checked statically, and
the conversions for several targets are put side by side.
"""),
    code(SETUP),
    md("## Conv strides across targets"),
    code("""
model, example, description = sample_models.build("conv_strides")
print(description)
matrix = cl.target_matrix(model, example)
matrix[["target", "ok", "spec_version", "output_dtypes", "max_rel_error", "findings"]]"""),
    code("""
conv16 = cl.convert(model, example, cl.ConversionOptions(target="iOS16"))
for f in cl.lint(conv16):
    print(f"[{f.severity}] {f.title}\\n  {f.message}\\n  fix: {f.fix}\\n  source: {f.source}\\n")"""),
    md("## FP16 inputs and outputs need iOS16"),
    code("""
half, half_example, _ = sample_models.build("fp16_io")
cl.target_matrix(half, half_example)[["target", "ok", "error", "explanation", "input_dtypes"]]"""),
    md("## Post-processing inside the model"),
    code("""
det, det_example, description = sample_models.build("ne_hostile")
print(description)
det_conv = cl.convert(det, det_example, cl.ConversionOptions())
for f in cl.lint(det_conv):
    print(f"[{f.severity}] {f.title}: {f.message}")"""),
    md("Under `ComputeUnit.ALL` the emulator places ops the Neural Engine does not run on the GPU:"),
    code("""
placed = EmulatedModel(det_conv.mlmodel, "ALL").ops()
pd.DataFrame([(s.op.op_type, s.device, s.module) for s in placed], columns=["op_type", "device", "module"]) \\
    .groupby(["device", "op_type"]).size()"""),
    md("**Fix:** return the raw head outputs and do reshape / top-k / NMS in app code:"),
    code("""
class HeadOnly(torch.nn.Module):
    def __init__(self, det):
        super().__init__()
        self.backbone, self.head = det.backbone, det.head

    def forward(self, image):
        return self.head(self.backbone(image))

head_conv = cl.convert(HeadOnly(det).eval(), det_example, cl.ConversionOptions())
[f.title for f in cl.lint(head_conv)]"""),
    md("""
## Exercises

**1.** Change the patch embedding's stride from 8 to 4 (kernel 4). Predict: is the conv-stride
finding still raised at iOS16? Set `prediction_1` to `True` or `False`.
"""),
    code("prediction_1 = None  # True or False"),
    code("""
small = sample_models.conv_strides.PatchNet().eval()
small.patch = torch.nn.Conv2d(3, 32, kernel_size=4, stride=4)
small.down = torch.nn.Conv2d(32, 32, kernel_size=2, stride=2)
findings = cl.lint(cl.convert(small, example, cl.ConversionOptions(target="iOS16")))
actual_1 = any(f.kind == "conv_stride_interleave" for f in findings)
check(None if prediction_1 is None else prediction_1 == actual_1,
      "4 = 2 x 2 is a product of two factors; the heuristic flags strides above 4 or with more factors")
print("actual:", actual_1)"""),
    md("**2.** Predict the spec version of the `fp16_io` model converted for iOS17. Set `prediction_2` to an integer."),
    code("prediction_2 = None  # an integer"),
    code("""
actual_2 = cl.convert(half, half_example, cl.ConversionOptions(target="iOS17")).spec_version
check(None if prediction_2 is None else prediction_2 == actual_2, "iOS15 is spec 6, iOS16 spec 7, ...")
print("actual:", actual_2)"""),
]

NOTEBOOKS["04_os_versions_and_shared_runs.ipynb"] = [
    md("""
# Pitfall P5: right on one OS version, wrong on another - and sharing runs

**Field report.** The same ASR model (PyTorch -> ONNX -> Core ML, target macOS 12) was right on
macOS 12-13 and wrong on 14-15: runtime and optimisation changes between OS versions.

What helps: keep the ONNX intermediate, test a version matrix, and compare *saved runs* from the
machines involved. A run bundle holds a diagnosis as data (JSON + .npz): open it anywhere.
"""),
    code(SETUP + "\nimport tempfile\nfrom pathlib import Path\nwork = Path(tempfile.mkdtemp())"),
    md("## PyTorch -> ONNX, and ONNX Runtime as the reference"),
    code("""
model, example, description = sample_models.build("asr_onnx")
print(description)
onnx_path = sample_models.asr_onnx.export_onnx(work / "asr.onnx")
from coreml_lab.reference import run_onnxruntime
ort_out = run_onnxruntime(onnx_path, {"features": example[0].numpy()})[0]
with torch.no_grad():
    print("ONNX Runtime vs PyTorch: max abs diff", float(np.abs(ort_out - model(*example).numpy()).max()))"""),
    md("""
Converting the `.onnx` file itself goes through onnx2torch (optional extra:
`pip install 'coreml_lab[onnx-import]'`). Without it we convert the same PyTorch module.
"""),
    code("""
try:
    import onnx2torch  # noqa: F401
    source = onnx_path
except ImportError:
    source = model
    print("onnx2torch not installed: converting the PyTorch module instead")
report_a = cl.diagnose(source, example, cl.ConversionOptions(target="macOS12"))
print(report_a.summary())"""),
    md("## Save a run bundle\n\nOn a Mac, the same cell with `runtime=\"coreml\"` captures a *measured* bundle (Core ML itself); here the bundle is marked as emulated."),
    code("""
import platform
runtime = "coreml" if platform.system() == "Darwin" else "emulator"
bundle_a = report_a.save(work / "asr_macOS12.zip")
loaded = cl.load_report(bundle_a)
print(bundle_a, loaded.environment)"""),
    md("""
## Compare two runs

Stand-in for "the other machine": the same model converted for macOS 14 (a different target
changes the program - e.g. FP16 outputs from spec 7 on). With real bundles from two Macs, pass
them to `cl.compare_reports` exactly the same way (or `coreml-lab compare a.zip b.zip`).
"""),
    code("""
report_b = cl.diagnose(source, example, cl.ConversionOptions(target="macOS14"), progress=False)
bundle_b = report_b.save(work / "asr_macOS14.zip")
diff = cl.compare_reports(cl.load_report(bundle_a), cl.load_report(bundle_b), labels=("macOS12", "macOS14"))
diff"""),
    code("cl.load_report(bundle_b).plot_error_histograms()"),
    md("""
## Exercises

**1.** Which compute unit's outputs differ most between the two runs? Set `prediction_1` to a
compute-unit name.
"""),
    code("prediction_1 = None  # e.g. \"CPU_ONLY\""),
    code("""
outs = diff[diff.kind == "output"]
actual_1 = outs.sort_values("max_abs_diff").iloc[-1].compute_unit
check(None if prediction_1 is None else prediction_1 == actual_1,
      "look at the max_abs_diff column: the unit that computes most in FP16 moves most")
print("actual:", actual_1)"""),
]

NOTEBOOKS["05_bring_your_own_model.ipynb"] = [
    md("""
# Bring your own model

Any of these works as `model`:

* a `torch.nn.Module` (traced; if tracing fails, `torch.export` is used and the messages say so),
* a TorchScript file (`.pt`, `.ts`) or an `ExportedProgram` / `.pt2` file,
* an `.onnx` file (needs `pip install 'coreml_lab[onnx-import]'`),
* an existing `.mlpackage` (loaded, not converted - give example inputs with its input names).

**Example inputs matter.** FP16 problems depend on value ranges: use real data (a real image,
real audio at its real scale), not `torch.rand`. Pass several inputs with `inputs=[...]` to
aggregate statistics over a small dataset.
"""),
    code(SETUP),
    md("""
Point `MODEL_PATH` at a file, or import your own builder (`from my_project.models import build`).
The default below is a small model defined here so that the notebook runs as it is.
"""),
    code("""
MODEL_PATH = None  # e.g. "models/classifier.pt"


class MyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))

    def forward(self, image):
        return self.body(image)


torch.manual_seed(0)
model = MODEL_PATH or MyModel().eval()
example_inputs = (torch.rand(1, 3, 64, 64),)"""),
    code("""
panel = lab(model, example_inputs)
panel.run()
panel"""),
    md("## Several inputs"),
    code("""
dataset = [{"image": torch.rand(1, 3, 64, 64) * scale} for scale in (0.5, 1.0, 2.0)]
report = cl.diagnose(model, example_inputs, cl.ConversionOptions(), inputs=dataset)
report.outputs[["compute_unit", "max_abs_err", "rel_err", "elements"]]"""),
    md("""
## Exercise

**1.** Multiply the inputs by 1000 (e.g. unnormalised pixel values). Predict: does any compute
unit become non-finite? Set `prediction_1` to `True` or `False`.
"""),
    code("prediction_1 = None  # True or False"),
    code("""
big = cl.diagnose(model, example_inputs, cl.ConversionOptions(), inputs=[{"image": torch.rand(1, 3, 64, 64) * 1000}],
                  progress=False)
actual_1 = bool((big.outputs.nonfinite_frac > 0).any())
check(None if prediction_1 is None else prediction_1 == actual_1,
      "the convs stay in the thousands, but the average pooling sums 4096 of them: on the Neural "
      "Engine (FP16 sums) that passes 65504")
print("actual:", actual_1)"""),
]


def build(name: str):
    nb = new_notebook(cells=NOTEBOOKS[name])
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i:02d}"  # stable ids: regenerating gives the same file
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    files = {NB_DIR / name: (lambda name=name: nbformat.writes(build(name))) for name in NOTEBOOKS}
    return write_or_check(files, args.check, "python tools/make_notebooks.py")

if __name__ == "__main__":
    sys.exit(main())
