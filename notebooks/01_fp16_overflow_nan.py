# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Pitfall P1: the output is all inf or NaN
#
# **Symptom.** The converted model returns inf or NaN; coremltools may have printed
# "overflow encountered in cast" while converting.
#
# **Cause.** ML Programs compute in FP16 by default. FP16's largest value is 65504: anything
# larger becomes inf, and inf turns into NaN as soon as it meets another inf (inf - inf, 0 x inf).
# Large inputs, large weights, squares, exp and sums are the usual suspects.
#
# **Fixes.** Convert in FP32 (`compute_precision=ct.precision.FLOAT32`), or keep only the
# offending ops in FP32 with `ct.transform.FP16ComputePrecision(op_selector=...)`.

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
# ## The model
#
# An audio classifier that computes the energy of raw PCM frames (|x| up to 20000).

# %%
model, example, description = sample_models.build("fp16_overflow")
print(description)
frames = example[0]
print("max |input| =", float(frames.abs().max()), "(fits FP16)")
with torch.no_grad():
    print("max |frames * frames| =", float((frames * frames).abs().max()), "(does not: > 65504)")

# %%
conv16 = cl.convert(model, example, cl.ConversionOptions(precision="fp16"))
feeds = conv16.example_inputs.as_numpy()
for unit in ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"]:
    print(unit, EmulatedModel(conv16.mlmodel, unit).predict(feeds))

# %% [markdown]
# CPU_ONLY computes FP16-typed ops in FP32 (types are a minimum), so it survives; GPU and Neural Engine hold values in FP16.
# The outputs are ±inf, not NaN: each logit gets one +inf or −inf term. The Neural Engine never
# outputs NaN at all (it turns a NaN input into +inf and inf − inf into +0), so on a device look
# for inf, or for a finite value that is wrong.

# %% [markdown]
# ## Where does FP16 range break?

# %%
report = cl.diagnose(model, example, cl.ConversionOptions(precision="fp16"))
print(report.summary())

# %%
report.culprits(3)

# %%
report.first_nonfinite

# %%
report.plot_fp16_range()

# %%
report.plot_layer_errors()

# %% [markdown]
# The `mul` in module `energy` receives values within FP16 range and produces values far above
# 65504 - that is where overflow starts, and the inf in the outputs is its consequence.
#
# ## Fix 1: FP32

# %%
report32 = cl.diagnose(model, example, cl.ConversionOptions(precision="fp32"))
report32.outputs[["compute_unit", "max_abs_err", "rel_err", "nonfinite_frac"]]

# %% [markdown]
# FP32 fixes it, but an FP32 model never runs on the Neural Engine.
#
# ## Fix 2: keep only the offending ops in FP32
#
# `find_fp32_ops` starts from the culprits and every op whose values leave FP16 range, verifies
# each candidate set by converting and re-running, and drops every op the fix does not need.

# %%
fix = cl.find_fp32_ops(model, example)
print(fix.message)
print(fix)

# %%
print(fix.snippet)

# %%
mixed = cl.diagnose(model, example, cl.ConversionOptions(precision="mixed", fp32_ops=fix.ops))
mixed.outputs[["compute_unit", "max_abs_err", "rel_err", "nonfinite_frac"]]

# %% [markdown]
# ## Exercises
#
# **1.** Feed the model frames scaled down by 1000 (`frames / 1000`, so |x| <= 20). Predict: is the
# FP16 output on the Neural Engine non-finite or finite? Set `prediction_1` to `"nonfinite"` or `"finite"`.

# %%
prediction_1 = None  # "nonfinite" or "finite"

# %%
quiet = {"frames": (frames / 1000).numpy()}
out = EmulatedModel(conv16.mlmodel, "CPU_AND_NE").predict(quiet)
actual_1 = "nonfinite" if not np.isfinite(next(iter(out.values()))).all() else "finite"
check(None if prediction_1 is None else prediction_1 == actual_1,
      "squares are at most 400, and the Neural Engine accumulates their mean in a wide register, "
      "far below 65504")
print("actual:", actual_1)

# %% [markdown]
# **2.** Keep only the `mul` op type in FP32 (`precision="mixed", fp32_ops=("mul",)`). Predict: does
# the Neural Engine output become finite? Set `prediction_2` to `True` or `False`.

# %%
prediction_2 = None  # True or False

# %%
only_mul = cl.diagnose(model, example, cl.ConversionOptions(precision="mixed", fp32_ops=("mul",)),
                       compute_units=("CPU_AND_NE",), progress=False)
actual_2 = bool(only_mul.outputs.nonfinite_frac.max() == 0)
check(None if prediction_2 is None else prediction_2 == actual_2,
      "the mean of the squares is just as large: the next op overflows when it is FP16")
print("actual:", actual_2)

# %% [markdown]
# **3.** A `Linear(2, 1)` with weights 1 gets [20000, 20000]: its output, 40,000, fits FP16 (65,504).
# Predict: is it finite on the Neural Engine? Set `prediction_3` to `"finite"` or `"inf"`. (Then
# compare CPU_ONLY and the GPU, and try a ReLU fed a NaN.)

# %%
prediction_3 = None  # "finite" or "inf"

# %%
lin = torch.nn.Linear(2, 1, bias=False)
with torch.no_grad():
    lin.weight.fill_(1.0)
x = torch.tensor([[20000.0, 20000.0]])
conversion_lin = cl.convert(lin.eval(), (x,), cl.ConversionOptions(precision="fp16"))
feeds_lin = conversion_lin.example_inputs.as_numpy()
outs = {u: float(next(iter(EmulatedModel(conversion_lin.mlmodel, u).predict(feeds_lin).values())).item())
        for u in ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"]}
actual_3 = "finite" if np.isfinite(outs["CPU_AND_NE"]) else "inf"
check(None if prediction_3 is None else prediction_3 == actual_3,
      "the Neural Engine's multiply-accumulate output saturates at 2^15: 32,752 is its largest finite "
      "output, 32,768 and above are +inf (ane-guide; ANEForge on M2 Pro and M5). Keep matmul/linear/conv "
      "outputs below 32,768, e.g. scale the input down")
print(outs)
relu = torch.nn.ReLU()
xn = torch.tensor([[float("nan"), -1.0, 2.0]])
conversion_relu = cl.convert(relu.eval(), (xn,), cl.ConversionOptions(precision="fp16"))
feeds_relu = conversion_relu.example_inputs.as_numpy()
print({u: next(iter(EmulatedModel(conversion_relu.mlmodel, u).predict(feeds_relu).values())).tolist()
       for u in ["CPU_ONLY", "CPU_AND_NE"]})  # NaN on CPU_ONLY, +inf on the Neural Engine
