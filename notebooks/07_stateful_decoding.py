# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stateful decoding: the first tokens are right, then the KV cache overflows
#
# **Symptom.** A decoder converted with a KV cache (Core ML states, iOS18) gives the right first
# tokens, then drifts or produces garbage after a few decoding steps. A diagnosis of one call looks
# fine, because the first step is fine.
#
# **Cause.** A decoder reads its whole cache at every step, so what it computes grows with the
# position: at step `p` the attention sums over `p + 1` filled slots. Core ML states hold FP16
# only (coremltools 9: "State only support fp16 dtype"), and the GPU and Neural Engine compute
# FP16-typed ops in FP16, whose largest value is 65504. A softmax written by hand,
# `exp(s) / exp(s).sum(-1)`, without subtracting the row maximum, adds one `e^s` per filled slot:
# with scores around 9, each slot adds about e^9 = 8103, and the sum passes 65504 once 9 slots are
# filled - step 8, counting from 0.
#
# **Fixes.** Keep the ops that overflow in FP32 (`precision="mixed"` with `exp`, `reduce_sum`,
# `real_div`), or let the model use `torch.softmax`: Core ML's `softmax` subtracts the row maximum,
# so no term exceeds 1.

# %%
# %matplotlib inline
import math

import pandas as pd

import coreml_lab as cl
from coreml_lab.exercises import check
import sample_models
from sample_models import kv_decoder

pd.set_option("display.max_colwidth", 120)


# %% [markdown]
# ## The model
#
# `sample_models.kv_decoder`: a small LLaMA-style decoder (2 blocks of RMSNorm + rotary attention +
# MLP) that decodes one token per call. Each attention keeps its keys and values in `k_cache` /
# `v_cache` buffers and writes the new token's slot in place (`self.k_cache[:, :, p:p + 1] = k`).
# In the `"overflow"` configuration block 1 computes its softmax by hand.

# %%
print(sample_models.catalog(stateful=True)[0]["symptom"])
model, example, description = sample_models.build("kv_decoder", config="overflow")
print(description)
steps = kv_decoder.step_inputs(12)  # one input dict per decoding step: {"token": (1, 1), "pos": (1,)}
steps[:2]

# %% [markdown]
# ## Converting: the caches become states
#
# Nobody names the caches: the kit runs the forward once, sees which buffers it wrote in place and
# converts them as `ct.StateType` (deployment target iOS18 or later). The conversion messages say so.

# %%
conversion = cl.convert(model, example, cl.ConversionOptions(target="iOS18"))
for message in conversion.messages:
    if "state" in message.text or "cache" in message.text:
        print("-", message.text)
print("states in the Core ML model:", [s.name for s in conversion.mlmodel.get_spec().description.state])

# %% [markdown]
# coremltools renames each state (`blocks.0.attn.k_cache` becomes `blocks_0_attn_k_cache`: Core ML
# feature names have no dots). "Torch var ... is added again" is coremltools registering the
# buffer as a state variable; it is harmless.
#
# ## Diagnosing 12 decoding steps
#
# `diagnose(..., steps=[...])` runs the steps in order: torch with its own cache, every compute unit
# (and the FP32 reference program) with its own Core ML state, from zeros. It compares each step's
# output, each state and each layer. (`local=False` skips the per-op re-runs on exact inputs that
# `culprits()` uses for its local errors: twice as fast, and the per-step numbers do not need them.)
# First the healthy configuration, where every block uses `torch.softmax`:

# %%
healthy_model, healthy_example, _ = sample_models.build("kv_decoder", config="healthy")
healthy = cl.diagnose(healthy_model, healthy_example, cl.ConversionOptions(target="iOS18"), steps=steps,
                      progress=False, local=False)
print(healthy.first_bad_step)

# %% [markdown]
# No unit has a bad step. Now the overflow configuration:

# %%
report = cl.diagnose(conversion, steps=steps, progress=False, local=False)
print(report.summary())

# %%
report.first_bad()

# %% [markdown]
# `first_bad()` names, per compute unit, the first step whose output or a state is beyond tolerance
# (relative error 1e-2, or any inf / NaN), and the first layer in program order that is beyond it at
# that step: where it starts. CPU_ONLY computes FP16-typed ops in FP32 and has no bad step.

# %%
report.plot_step_errors()

# %% [markdown]
# The heatmap is one compute unit (the first to go wrong): a row per layer, a column per step. Steps
# 0-7 are at FP16 rounding level everywhere; from step 8 on `blocks.1.attn` holds inf (red crosses), and
# what reads it - its output projection `blocks.1.attn.o`, the MLP, the head - inherits the error.

# %%
report.plot_state_errors()

# %% [markdown]
# The states stay right: the cache holds keys and values, which are small. What goes wrong is the
# attention that reads them, and the output follows it. Here is the arithmetic of its denominator:

# %%
per_slot = math.exp(kv_decoder.SINK_LOGIT)
pd.DataFrame({"step": range(12), "filled slots": range(1, 13),
              "sum of exp (about)": [per_slot * (p + 1) for p in range(12)],
              "fits FP16 (<= 65504)": [per_slot * (p + 1) <= 65504 for p in range(12)]})

# %% [markdown]
# ## Fix 1: keep the softmax's ops in FP32
#
# Only `exp`, `reduce_sum` and `real_div` need FP32; the states stay FP16 (they must), and everything
# else still runs in FP16.

# %%
mixed_options = cl.ConversionOptions(target="iOS18", precision="mixed", fp32_ops=("exp", "reduce_sum", "real_div"))
fixed = cl.diagnose(model, example, mixed_options, steps=steps, progress=False, local=False)
print(fixed.first_bad_step)
assert all(step is None for step in fixed.first_bad_step.values()), fixed.first_bad_step

# %% [markdown]
# ## Fix 2: use `torch.softmax`
#
# Core ML's `softmax` subtracts the row maximum before `exp`, so the largest term is 1 and the sum is
# at most the number of slots. That is the healthy configuration above: `first_bad_step` was None on
# every unit, all in FP16. In your own model, replace `e = s.exp(); e / e.sum(-1, keepdim=True)` by
# `torch.softmax(s, dim=-1)`.
#
# ## Exercises
#
# **1.** Build the overflow configuration with a cache of 32 slots instead of 16
# (`build("kv_decoder", config="overflow", max_len=32)`) and decode the same 12 steps. Predict the
# first bad step on the Neural Engine: set `prediction_1` to a step number, or `None` if you think no
# step goes wrong. (Then try `max_len=8`: how many steps can it decode?)

# %%
prediction_1 = "?"  # a step number 0-11, or None

# %%
long_model, long_example, _ = sample_models.build("kv_decoder", config="overflow", max_len=32)
long_report = cl.diagnose(long_model, long_example, cl.ConversionOptions(target="iOS18"),
                          steps=kv_decoder.step_inputs(12, max_len=32), compute_units=("CPU_AND_NE",),
                          progress=False, local=False)
actual_1 = long_report.first_bad_step["CPU_AND_NE"]
check(None if prediction_1 == "?" else prediction_1 == actual_1,
      "the empty slots are masked with -1e4, and exp(-1e4) is 0: they add nothing to the sum. What "
      "overflows is the number of filled slots, 9 at step 8, whatever the size of the cache")
print("actual:", actual_1)

# %% [markdown]
# **2.** Name the states yourself: `ConversionOptions(states=(...))` takes torch buffer names, and makes
# exactly those buffers states (`states=()` keeps every buffer a constant). Convert with block 1's
# caches named explicitly and predict the name Core ML gives the state of `blocks.1.attn.v_cache`:
# set `prediction_2` to that string.

# %%
prediction_2 = None  # the Core ML state name of blocks.1.attn.v_cache

# %%
named = ("blocks.0.attn.k_cache", "blocks.0.attn.v_cache", "blocks.1.attn.k_cache", "blocks.1.attn.v_cache")
named_conversion = cl.convert(model, example, cl.ConversionOptions(target="iOS18", states=named))
state_names = [s.name for s in named_conversion.mlmodel.get_spec().description.state]
print(state_names)
actual_2 = state_names[named.index("blocks.1.attn.v_cache")]  # the states keep the order they are named in
check(None if prediction_2 is None else prediction_2 == actual_2,
      "Core ML feature names have no dots: coremltools replaces them with underscores")
print("actual:", actual_2)
