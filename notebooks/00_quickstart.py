# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # coreml_lab quickstart
#
# A converted Core ML model misbehaves - NaN outputs, a different class than PyTorch, right on a
# Mac and wrong on an iPad. This kit answers *where* and *why*: it converts your model with the
# options you pick, runs it on every compute unit (CPU, GPU, Neural Engine), and compares every
# layer with PyTorch.
#
# Core ML only runs on macOS. On Linux (and, if you ask, on macOS too) the kit's **emulator** runs
# the converted ML Program op by op under a precision profile per compute unit. Emulated numbers
# show precision risk (overflow, underflow, rounding growth); a real device can differ in detail.
# The Neural Engine profile follows published device measurements (`CPU_AND_NE` models A15 and
# later, `ne_profile("M1")` M1 / A14); every fact and its source: docs/device_profiles.md.

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


# %% [markdown]
# ## The sample models
#
# Each one reproduces a pitfall reported from the field.

# %%
pd.DataFrame(sample_models.catalog())[["name", "pitfall", "symptom"]]

# %% [markdown]
# ## The panel
#
# Pick a model and options, press **Convert and diagnose**. The cell below also runs it once, so
# this notebook renders complete without a click (for `make report`).

# %%
panel = lab(sample="fp16_overflow")
report = panel.run()
panel

# %% [markdown]
# ## Reading the dashboard
#
# * **Summary** - one line per compute unit: is the output close to PyTorch, different, or broken
#   (inf/NaN)? Then the ops most to blame and what to try.
# * **Per-layer error** - error of every op along the network, per compute unit, against the exact
#   FP32 program. Where a line jumps, precision is lost.
# * **Histograms** - how the output errors are distributed.
# * **FP16 range** - which values would not fit FP16 (above 65504, or below 2^-24).
# * **Compute units** - where CPU, GPU and Neural Engine disagree.
# * **Messages** - what coremltools said while converting, explained.
# * **Fixes** - suggestions, and a verified search for the ops to keep in FP32.
#
# The same numbers are plain pandas tables and matplotlib figures:

# %%
print(report.summary())

# %%
report.culprits(5)

# %%
report.plot_layer_errors()

# %% [markdown]
# ## Next
#
# * `01_fp16_overflow_nan` - inf/NaN outputs and how to fix them (P1)
# * `02_compute_unit_divergence` - CPU vs GPU vs Neural Engine (P2)
# * `03_deployment_targets` - iOS15 vs iOS16+ and Neural-Engine-hostile outputs (P3, P4)
# * `04_os_versions_and_shared_runs` - the ONNX path, run bundles, comparing machines (P5)
# * `05_bring_your_own_model` - your model in the same panel
