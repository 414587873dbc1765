# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Pitfalls P3 and P4: the deployment target and the Neural Engine
#
# **P3.** A model was right on a Mac and wrong on an iPad with
# `minimum_deployment_target=iOS16`; the device log said "Strides of Conv needs to be product of
# at most 2 interleave factors". Lowering the target to iOS15 (or changing the strides) fixed it.
#
# **P4.** Adding output reshapes, slicing or NMS to a model made Core ML run it off the Neural
# Engine; and FP16 inputs/outputs need specification version 7 (iOS16 / macOS13) - below that
# Core ML refuses the model ("FLOAT16 ... only valid in specification version >= 7").
#
# The emulator cannot reproduce a device compiler's limits, so these are checked statically, and
# the conversions for several targets are put side by side.

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
# ## Conv strides across targets

# %%
model, example, description = sample_models.build("conv_strides")
print(description)
matrix = cl.target_matrix(model, example)
matrix[["target", "ok", "spec_version", "output_dtypes", "max_rel_error", "findings"]]

# %%
conv16 = cl.convert(model, example, cl.ConversionOptions(target="iOS16"))
for f in cl.lint(conv16):
    print(f"[{f.severity}] {f.title}\n  {f.message}\n  fix: {f.fix}\n  source: {f.source}\n")

# %% [markdown]
# ## FP16 inputs and outputs need iOS16

# %%
half, half_example, _ = sample_models.build("fp16_io")
cl.target_matrix(half, half_example)[["target", "ok", "error", "explanation", "input_dtypes"]]

# %% [markdown]
# ## Post-processing inside the model

# %%
det, det_example, description = sample_models.build("ne_hostile")
print(description)
det_conv = cl.convert(det, det_example, cl.ConversionOptions())
for f in cl.lint(det_conv):
    print(f"[{f.severity}] {f.title}: {f.message}")

# %% [markdown]
# Under `ComputeUnit.ALL` the emulator places ops the Neural Engine does not run on the GPU:

# %%
placed = EmulatedModel(det_conv.mlmodel, "ALL").ops()
pd.DataFrame([(s.op.op_type, s.device, s.module) for s in placed], columns=["op_type", "device", "module"]) \
    .groupby(["device", "op_type"]).size()


# %% [markdown]
# **Fix:** return the raw head outputs and do reshape / top-k / NMS in app code:

# %%
class HeadOnly(torch.nn.Module):
    def __init__(self, det):
        super().__init__()
        self.backbone, self.head = det.backbone, det.head

    def forward(self, image):
        return self.head(self.backbone(image))

head_conv = cl.convert(HeadOnly(det).eval(), det_example, cl.ConversionOptions())
[f.title for f in cl.lint(head_conv)]

# %% [markdown]
# **Slicing on M1 / A14.** On the M1 / A14 Neural Engine a slice along the last axis with a
# non-zero begin passes its values through a gain of 16, so values above 4,094 become inf (fixed
# on A15 and later, which `CPU_AND_NE` models by default). `ne_profile("M1")` shows it:


# %%
from coreml_lab.emulator import ne_profile


class Tail(torch.nn.Module):
    def forward(self, x):
        return x[..., 1:]


x = torch.tensor([[1000.0, 4000.0, 4094.0, 5000.0]])
conversion_slice = cl.convert(Tail().eval(), (x,), cl.ConversionOptions())
feeds_slice = conversion_slice.example_inputs.as_numpy()
{name: next(iter(EmulatedModel(conversion_slice.mlmodel, unit).predict(feeds_slice).values())).tolist()
 for name, unit in [("CPU_AND_NE (A15 and later)", "CPU_AND_NE"), ("M1", ne_profile("M1"))]}

# %% [markdown]
# ## Exercises
#
# **1.** Change the patch embedding's stride from 8 to 4 (kernel 4). Predict: is the conv-stride
# finding still raised at iOS16? Set `prediction_1` to `True` or `False`.

# %%
prediction_1 = None  # True or False

# %%
small = sample_models.conv_strides.PatchNet().eval()
small.patch = torch.nn.Conv2d(3, 32, kernel_size=4, stride=4)
small.down = torch.nn.Conv2d(32, 32, kernel_size=2, stride=2)
findings = cl.lint(cl.convert(small, example, cl.ConversionOptions(target="iOS16")))
actual_1 = any(f.kind == "conv_stride_interleave" for f in findings)
check(None if prediction_1 is None else prediction_1 == actual_1,
      "4 = 2 x 2 is a product of two factors; the heuristic flags strides above 4 or with more factors")
print("actual:", actual_1)

# %% [markdown]
# **2.** Predict the spec version of the `fp16_io` model converted for iOS17. Set `prediction_2` to an integer.

# %%
prediction_2 = None  # an integer

# %%
actual_2 = cl.convert(half, half_example, cl.ConversionOptions(target="iOS17")).spec_version
check(None if prediction_2 is None else prediction_2 == actual_2, "iOS15 is spec 6, iOS16 spec 7, ...")
print("actual:", actual_2)
