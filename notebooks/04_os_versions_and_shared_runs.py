# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Pitfall P5: right on one OS version, wrong on another - and sharing runs
#
# **Field report.** The same ASR model (PyTorch -> ONNX -> Core ML, target macOS 12) was right on
# macOS 12-13 and wrong on 14-15: runtime and optimisation changes between OS versions.
#
# What helps: keep the ONNX intermediate, test a version matrix, and compare *saved runs* from the
# machines involved. A run bundle holds a diagnosis as data (JSON + .npz): open it anywhere.

# %%
# %matplotlib inline
import numpy as np
import pandas as pd
import torch

import coreml_lab as cl
from coreml_lab.exercises import check
import sample_models
from coreml_lab.emulator import EmulatedModel
from coreml_lab.widgets import lab

pd.set_option("display.max_colwidth", 120)

import tempfile
from pathlib import Path

work = Path(tempfile.mkdtemp())

# %% [markdown]
# ## PyTorch -> ONNX, and ONNX Runtime as the reference

# %%
model, example, description = sample_models.build("asr_onnx")
print(description)
onnx_path = sample_models.asr_onnx.export_onnx(work / "asr.onnx")
from coreml_lab.reference import run_onnxruntime
ort_out = run_onnxruntime(onnx_path, {"features": example[0].numpy()})[0]
with torch.no_grad():
    print("ONNX Runtime vs PyTorch: max abs diff", float(np.abs(ort_out - model(*example).numpy()).max()))

# %% [markdown]
# Converting the `.onnx` file itself goes through onnx2torch (optional extra:
# `pip install 'coreml_lab[onnx-import]'`). Without it we convert the same PyTorch module.

# %%
try:
    import onnx2torch  # noqa: F401
    source = onnx_path
except ImportError:
    source = model
    print("onnx2torch not installed: converting the PyTorch module instead")
report_a = cl.diagnose(source, example, cl.ConversionOptions(target="macOS12"))
print(report_a.summary())

# %% [markdown]
# ## Save a run bundle
#
# On a Mac, the same cell with `runtime="coreml"` captures a *measured* bundle (Core ML itself); here the bundle is marked as emulated,
# and its environment names the device profile and Neural Engine generation that modelled each unit
# (`compute_units`: the facts each profile encodes, with their sources).

# %%
import platform

from coreml_lab.environment import profile_lines

runtime = "coreml" if platform.system() == "Darwin" else "emulator"
bundle_a = report_a.save(work / "asr_macOS12.zip")
loaded = cl.load_report(bundle_a)
print(bundle_a, {k: v for k, v in loaded.environment.items() if k != "compute_units"})
print("\n".join(profile_lines(loaded.environment)))

# %% [markdown]
# ## Compare two runs
#
# Stand-in for "the other machine": the same model converted for macOS 14 (a different target
# changes the program - e.g. FP16 outputs from spec 7 on). With real bundles from two Macs, pass
# them to `cl.compare_reports` exactly the same way (or `coreml-lab compare a.zip b.zip`).

# %%
report_b = cl.diagnose(source, example, cl.ConversionOptions(target="macOS14"), progress=False)
bundle_b = report_b.save(work / "asr_macOS14.zip")
diff = cl.compare_reports(cl.load_report(bundle_a), cl.load_report(bundle_b), labels=("macOS12", "macOS14"))
diff

# %%
cl.load_report(bundle_b).plot_error_histograms()

# %% [markdown]
# ## Exercises
#
# **1.** Which compute unit's outputs differ most between the two runs? Set `prediction_1` to a
# compute-unit name.

# %%
prediction_1 = None  # e.g. "CPU_ONLY"

# %%
outs = diff[diff.kind == "output"]
actual_1 = outs.sort_values("max_abs_diff").iloc[-1].compute_unit
check(None if prediction_1 is None else prediction_1 == actual_1,
      "look at the max_abs_diff column: the unit that computes most in FP16 moves most")
print("actual:", actual_1)
