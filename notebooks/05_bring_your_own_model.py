# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Bring your own model
#
# Any of these works as `model`:
#
# * a `torch.nn.Module` (traced; if tracing fails, `torch.export` is used and the messages say so),
# * a TorchScript file (`.pt`, `.ts`) or an `ExportedProgram` / `.pt2` file,
# * an `.onnx` file (needs `pip install 'coreml_lab[onnx-import]'`),
# * an existing `.mlpackage` (loaded, not converted - give example inputs with its input names).
#
# **Example inputs matter.** FP16 problems depend on value ranges: use real data (a real image,
# real audio at its real scale), not `torch.rand`. Pass several inputs with `inputs=[...]` to
# aggregate statistics over a small dataset.

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
# Point `MODEL_PATH` at a file, or import your own builder (`from my_project.models import build`).
# The default below is a small model defined here so that the notebook runs as it is.

# %%
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
example_inputs = (torch.rand(1, 3, 64, 64),)

# %%
panel = lab(model, example_inputs)
panel.run()
panel

# %% [markdown]
# ## Several inputs

# %%
dataset = [{"image": torch.rand(1, 3, 64, 64) * scale} for scale in (0.5, 1.0, 2.0)]
report = cl.diagnose(model, example_inputs, cl.ConversionOptions(), inputs=dataset)
report.outputs[["compute_unit", "max_abs_err", "rel_err", "elements"]]

# %% [markdown]
# ## Exercise
#
# **1.** Multiply the inputs by 1000 (e.g. unnormalised pixel values). Predict: does any compute
# unit become non-finite? Set `prediction_1` to `True` or `False`.

# %%
prediction_1 = None  # True or False

# %%
big = cl.diagnose(model, example_inputs, cl.ConversionOptions(), inputs=[{"image": torch.rand(1, 3, 64, 64) * 1000}],
                  progress=False)
actual_1 = bool((big.outputs.nonfinite_frac > 0).any())
check(None if prediction_1 is None else prediction_1 == actual_1,
      "the convs stay below about a thousand, and average pooling accumulates in a wide register on "
      "every compute unit, the Neural Engine included (4,096 values of 1,000 average to 1,000 on the "
      "device), so nothing leaves FP16 range; the kit's old profile summed in FP16 and got this wrong")
print("actual:", actual_1)
