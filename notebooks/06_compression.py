# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Pitfall C1: the compressed model is wrong, and one layer is why
#
# **Symptom.** The model converts and matches PyTorch. After `coremltools.optimize.coreml`
# compresses its weights (palettization, linear quantization, pruning) its outputs are off, even
# at int8, which is usually close to lossless.
#
# **Cause.** Compression rounds every weight of a tensor with a shared table: a 16-entry lookup table
# (4-bit palettization) or one scale per tensor or per output channel (int8). A layer with an
# *outlier* input channel, 40x larger weights than the rest (as after an activation outlier was
# folded into the weights), spends that table's range on the outlier and rounds all other weights
# coarsely. Its weight SNR hardly tells: the outlier dominates the weight's energy. What the layer's
# output loses does.
#
# **Fixes.** Leave that layer uncompressed, or compress it with more bits, with coremltools'
# `op_name_configs`: `cl.find_uncompressed_ops` finds the layers and verifies the config.

# %%
# %matplotlib inline
import pandas as pd

import coreml_lab as cl
from coreml_lab.exercises import check
import sample_models
from coreml_lab.compressed_weights import describe
from sample_models.compression_outlier import OUTLIER_LAYER

pd.set_option("display.max_colwidth", 140)
pd.set_option("display.width", 200)


# %% [markdown]
# ## The model
#
# Four 64x64 linear blocks, each followed by tanh and a per-channel gain. In `blocks.2`, input
# channel 5's weights are 40x larger and the gain before it is 40x smaller: the same function as
# without the outlier, but a very different weight tensor.

# %%
model, example, description = sample_models.build("compression_outlier")
print(description)
for i, block in enumerate(model.blocks):
    col = block.weight.detach().abs().amax(dim=0)
    print(f"blocks.{i}: largest |w| per input channel: max {float(col.max()):.2f}, median {float(col.median()):.2f}")

# %% [markdown]
# ## Compress: int8 per channel
#
# `ConversionOptions(compression=...)` takes a short spec (`"int8-per-channel"`, `"palettize4"`,
# `"prune50"`, joint forms like `"prune50+palettize4"`) or coremltools' own `OptimizationConfig`, and
# compresses after conversion with `coremltools.optimize.coreml`. `describe` lists what the
# compressed program holds (`coreml_lab.compressed_weights.describe`).

# %%
options = cl.ConversionOptions(precision="fp16", target="iOS18", compression="int8-per-channel")
conversion = cl.convert(model, example, options)
plain = cl.convert(model, example, options.replace(precision="fp32", compression=None))
describe(conversion, plain)[["op", "module", "mode", "nbits", "granularity", "weight_snr_db", "max_abs_weight_error"]]

# %% [markdown]
# ## Diagnose: which layer's compression costs most?
#
# `diagnose` compares the compressed program op by op with the FP32 conversion of the same model
# *without* compression. For each compressed weight, `report.compression` holds its weight error
# and its layer's error: `local_rel_err` is what the layer loses when it runs alone on exact inputs
# with its compressed weights (what its compression adds here), `uncompressed_local_rel_err` the
# same op re-run with its original weights at the same precision (FP16's share alone), and
# `upstream_rel_err` the error that arrives at its input from the layers before.

# %%
report = cl.diagnose(model, example, options, progress=False)
print(report.summary())

# %%
report.compression[report.compression.compute_unit == "CPU_AND_NE"][
    ["op", "module", "compression", "weight_snr_db", "local_rel_err", "uncompressed_local_rel_err",
     "upstream_rel_err", "rel_err"]]

# %%
report.culprits(3)[["op", "module", "compute_unit", "reason"]]

# %%
report.plot_compression()

# %% [markdown]
# `blocks.2` alone loses ~20x more than the other layers (and ~500x more than FP16 alone costs it:
# the dashes), while error arriving at its input is small. Every layer after it inherits that
# error: blocks.3 is locally fine (bar below tolerance) with a large error arriving from upstream;
# it is not to blame.
#
# ## Fix: find the layers to leave uncompressed, verified
#
# `find_uncompressed_ops` measures each layer's *sensitivity* (the output error with only that
# layer compressed), then leaves the most sensitive ones uncompressed (or at 8 bits where that is
# enough) until the output error is within `tolerance`, and verifies the config by compressing
# with it and running again.

# %%
fix = cl.find_uncompressed_ops(model, example, options, tolerance=0.02, progress=False)
print(fix)
fix.sensitivity[["rank", "op", "module", "mode", "nbits", "error_alone"]]

# %%
fix.plot_sensitivity()

# %%
print(fix.snippet)

# %% [markdown]
# The fix names `blocks.2` first and adds `blocks.0` (the next most sensitive) to reach 0.02.
# Verify with a diagnosis of the fixed config (`fix.config` is a coremltools `OptimizationConfig`,
# which `compression=` takes as is): the outputs are within tolerance and no layer is blamed.

# %%
fixed = cl.diagnose(model, example, options.replace(compression=fix.config), progress=False)
print(fixed.summary(tolerance=0.02))
print(f"uncompressed FP16 conversion: {fix.error_uncompressed:.3g} (the floor no compression fix goes below)")
fixed.compression[fixed.compression.compute_unit == "CPU_AND_NE"][["module", "compression", "local_rel_err"]]

# %% [markdown]
# ## Palettization: the weight SNR does not say it
#
# At 4-bit palettization (one 16-entry table per tensor) every layer's weight SNR is about the
# same, ~20 dB: `blocks.2`'s outlier channel gets table entries of its own and counts most in its
# SNR, while the other 63 channels share the few entries left. The layer's local error shows it.

# %%
palettized = cl.diagnose(model, example, options.replace(compression="palettize4"), progress=False,
                         compute_units=("CPU_AND_NE",))
palettized.compression[["module", "compression", "weight_snr_db", "local_rel_err"]]

# %%
palettized.culprits(1)[["module", "reason"]]

# %% [markdown]
# ## Exercises
#
# **1.** Magnitude pruning (`"prune50"`) zeroes the half of each weight tensor with the smallest
# magnitude. Predict: is `blocks.2`'s local error under `prune50` more than twice the median of the
# other layers' (as it is under int8 and palettization)? Set `prediction_1` to `True` or `False`.

# %%
prediction_1 = None  # True or False

# %%
pruned = cl.diagnose(model, example, options.replace(compression="prune50"), progress=False,
                     compute_units=("CPU_ONLY",)).compression.set_index("module")
others = pruned.local_rel_err.drop(OUTLIER_LAYER).median()
actual_1 = bool(pruned.local_rel_err[OUTLIER_LAYER] > 2 * others)
check(None if prediction_1 is None else prediction_1 == actual_1,
      "pruning keeps the largest weights exactly (the outlier channel among them) and has no shared range "
      "to spend: every layer loses about the same, and blocks.2's weight SNR is even the best")
print("actual:", actual_1, pruned[["weight_snr_db", "local_rel_err"]].round(3).to_dict("index"))

# %% [markdown]
# **2.** With more palettization bits the table has more entries to share. Predict: with
# `"palettize6"` or `"palettize8"`, which is the fewest bits at which no layer is blamed for its
# compressed weights any more (tolerance 0.01)? Set `prediction_2` to `6` or `8`.

# %%
prediction_2 = None  # 6 or 8

# %%
blamed = {}
for nbits in (6, 8):
    r = cl.diagnose(model, example, options.replace(compression=f"palettize{nbits}"), progress=False,
                    compute_units=("CPU_ONLY",))
    blamed[nbits] = list(r.culprits()[r.culprits().reason.str.contains("compressed weights")].module)
actual_2 = min(n for n, mods in blamed.items() if not mods) if any(not m for m in blamed.values()) else None
check(None if prediction_2 is None else prediction_2 == actual_2,
      "64 entries still leave blocks.2's ordinary weights a coarse grid; 256 entries are fine")
print("actual:", actual_2, blamed)
